"""Driver-side checks of a run's model, input and output, before anything is written or Ray starts.

    cfg = preflight(cfg)   # -> cfg with local paths made absolute, or PreflightError (one line, names the flag)

* ``--model``: a local directory with a readable ``config.json`` or exactly one ``.gguf`` file, a ``.gguf``
  file, an ``s3://`` (any fsspec URL) prefix holding a ``config.json`` or a ``.gguf`` file, or a hub id
  that looks like ``owner/name`` (or ``owner/repo/file.gguf``). The hub is never contacted here.
* ``--input``: a manifest (.parquet/.csv/.jsonl, non-empty) or a prefix / file with at least one object
  (locally: at least one media file). A missing bucket is named.
* ``--output``: a directory or a prefix, new or existing (resume); never an existing file.

Local relative paths are resolved on the driver, so workers of a ``--ray-address`` cluster (whose
working directory differs) see what the user typed. Import-light: no torch, no Ray; fsspec / s3fs only
for URLs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from meda_engine.config import ConfigError

from .config import AnnotateConfig

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
HUB_GGUF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(/[^/]+)+\.gguf", re.IGNORECASE)
GGUF_MAGIC = b"GGUF"


class PreflightError(ConfigError):
    """The model, input or output of a run is unusable; the message (one line) names the flag."""


def _fail(flag: str, message: str):
    raise PreflightError(f"{flag}: {message}")


def is_url(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def resolve_local(path: str) -> str:
    """An absolute local path for a local one (``~`` and ``file://`` too); URLs are returned unchanged."""
    if is_url(path):
        return path
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.abspath(os.path.expanduser(path))


def model_kind(source: str) -> str:
    """``url``, ``local`` or ``hub``: how ``--model`` will be loaded (`meda_engine.models.loading`).

    A path that exists, starts with ``/ . ~``, or whose first component is a directory here (``models/nope``
    when ``./models`` exists) is local; otherwise ``owner/name`` (or ``owner/repo/file.gguf``) is a hub id."""
    if is_url(source):
        return "url"
    if source.startswith(("file://", "/", ".", "~")) or os.path.exists(os.path.expanduser(source)):
        return "local"
    first = source.split("/", 1)[0]
    if "/" in source and os.path.isdir(first):
        return "local"
    if HUB_ID.fullmatch(source) or HUB_GGUF.fullmatch(source):
        return "hub"
    return "local"


def resolve_model(source: str) -> str:
    """``--model`` as the workers should see it: a local path made absolute, a URL or hub id unchanged."""
    return resolve_local(source) if model_kind(source) == "local" else source


def preflight(cfg: AnnotateConfig) -> AnnotateConfig:
    """Check the run's model, input and output on the driver; return ``cfg`` with local paths absolute.

    Raises `PreflightError` (a `ConfigError`, so a ValueError) with a one-line message naming the flag.
    Nothing is written."""
    opts = cfg.storage_options()
    model = resolve_model(cfg.model)
    if cfg.engine != "fake":  # the stand-in engine loads no model
        check_model(model, opts)
    inp = resolve_local(cfg.input)
    check_input(inp, opts)
    out = resolve_local(cfg.output)
    check_output(out, opts)
    if (model, inp, out) == (cfg.model, cfg.input, cfg.output):
        return cfg
    return dataclasses.replace(cfg, model=model, input=inp, output=out)


# ---------------------------------------------------------------------------------------------------------
# The model


def check_model(source: str, opts: dict[str, Any]) -> None:
    kind = model_kind(source)
    if kind == "hub":
        return  # owner/name: loaded (or found in the hub cache) by each actor; not contacted here
    if kind == "url":
        names = _listing("--model", source, opts, recursive=True)
        if not any(n.rsplit("/", 1)[-1] == "config.json" or n.lower().endswith(".gguf") for n in names):
            _fail("--model", f"{source} holds no config.json and no .gguf file; is it a checkpoint directory?")
        return
    path = source
    if os.path.isfile(path):
        if not path.lower().endswith(".gguf"):
            _fail("--model", f"{path} is a file but not a .gguf checkpoint "
                  f"(give a checkpoint directory or a .gguf file)")
        _check_gguf(path)
        return
    if not os.path.isdir(path):
        _fail("--model", f"no checkpoint at {path} (no such file or directory; a hub id looks like owner/name)")
    config = os.path.join(path, "config.json")
    if os.path.exists(config):
        try:
            with open(config, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            _fail("--model", f"{config} is not readable JSON: {_one_line(e)}")
        if not isinstance(data, dict):
            _fail("--model", f"{config} is not a JSON object")
        return
    try:
        ggufs = sorted(n for n in os.listdir(path)
                       if n.lower().endswith(".gguf") and os.path.isfile(os.path.join(path, n)))
    except OSError as e:
        _fail("--model", f"cannot list {path}: {_one_line(e)}")
    if not ggufs:
        _fail("--model", f"{path} has no config.json and no .gguf file; is it a checkpoint directory?")
    if len(ggufs) > 1:
        _fail("--model", f"{path} holds several .gguf files ({', '.join(ggufs)}); give the file's path")
    _check_gguf(os.path.join(path, ggufs[0]))


def _check_gguf(path: str) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        _fail("--model", f"cannot read {path}: {_one_line(e)}")
    if magic != GGUF_MAGIC:
        _fail("--model", f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")


# ---------------------------------------------------------------------------------------------------------
# Input and output


def check_input(url: str, opts: dict[str, Any]) -> None:
    from .. import storage

    if not is_url(url):
        if not os.path.exists(url):
            _fail("--input", f"nothing at {url} (no such file or directory)")
        if os.path.isfile(url):
            if storage.manifest_format(url):
                if os.path.getsize(url) == 0:
                    _fail("--input", f"the manifest {url} is empty")
            elif not _is_media(url):
                _fail("--input", f"{url} is neither a manifest ({', '.join(sorted(storage.MANIFEST_FORMATS))}) "
                      f"nor a media file")
            return
        if not _has_media(url):
            _fail("--input", f"no media files under {url}")
        return
    fs, path = _filesystem("--input", url, opts)
    if storage.manifest_format(url):
        try:
            info = fs.info(path)
        except FileNotFoundError:
            _missing("--input", url, fs, path)
        except OSError as e:
            _fail("--input", f"cannot read {url}: {_one_line(e)}")
        if info.get("type") == "directory":
            _fail("--input", f"{url} is a prefix, not a manifest file")
        if not info.get("size"):
            _fail("--input", f"the manifest {url} is empty")
        return
    _listing("--input", url, opts, recursive=False)


def check_output(url: str, opts: dict[str, Any]) -> None:
    if not is_url(url):
        if os.path.isfile(url):
            _fail("--output", f"{url} is an existing file; the output is a run directory (give a directory path)")
        if os.path.isdir(url):
            if not os.access(url, os.W_OK | os.X_OK):
                _fail("--output", f"{url} is not writable")
            return
        parent = os.path.dirname(url)
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
        if parent and not os.path.isdir(parent):
            _fail("--output", f"cannot create {url}: {parent} is a file")
        if parent and not os.access(parent, os.W_OK | os.X_OK):
            _fail("--output", f"cannot create {url}: {parent} is not writable")
        return
    fs, path = _filesystem("--output", url, opts)
    try:
        if fs.isfile(path.rstrip("/")):
            _fail("--output", f"{url} is an existing object; the output is a run prefix (e.g. {url.rstrip('/')}/)")
    except PreflightError:
        raise
    except Exception as e:
        _fail("--output", f"cannot reach {url}: {_one_line(e)}")
    bucket = _bucket(url, path)
    if bucket is not None and not _bucket_exists(fs, bucket):
        _fail("--output", f"bucket {bucket!r} of {url} does not exist (or these credentials cannot see it)")


def _listing(flag: str, url: str, opts: dict[str, Any], *, recursive: bool) -> list[str]:
    """Names under a URL prefix; fails (naming the bucket if that is what is missing) when there are none."""
    fs, path = _filesystem(flag, url, opts)
    root = path.rstrip("/")
    try:
        names = list(fs.find(root)) if recursive else list(fs.ls(root, detail=False))
    except FileNotFoundError:
        names = []
    except PermissionError as e:
        _fail(flag, f"access denied to {url}: {_one_line(e)}")
    except Exception as e:  # OSError, botocore's NoCredentialsError / EndpointConnectionError, ...
        _fail(flag, f"cannot list {url}: {_one_line(e)}")
    if not names:
        _missing(flag, url, fs, path)
    return names


def _filesystem(flag: str, url: str, opts: dict[str, Any]):
    from .. import storage

    try:
        return storage.filesystem_for(url, **opts)
    except Exception as e:  # an unknown protocol, a missing driver (s3fs, gcsfs), bad options
        _fail(flag, f"cannot open {url}: {_one_line(e)}")


def _missing(flag: str, url: str, fs, path: str):
    bucket = _bucket(url, path)
    if bucket is not None and not _bucket_exists(fs, bucket):
        _fail(flag, f"bucket {bucket!r} of {url} does not exist (or these credentials cannot see it)")
    _fail(flag, f"nothing at {url}")


def _bucket(url: str, path: str) -> str | None:
    if url.split("://", 1)[0] in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
        return path.split("/", 1)[0]
    return None


def _bucket_exists(fs, bucket: str) -> bool:
    try:
        return bool(fs.exists(bucket))
    except Exception:
        return False


def _is_media(path: str) -> bool:
    from .. import storage

    name = os.path.basename(path.rstrip("/"))
    extensions = set().union(*storage.KIND_EXTENSIONS.values())
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions


def _has_media(directory: str) -> bool:
    for _, _, files in os.walk(directory):
        if any(_is_media(f) for f in files):
            return True
    return False


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]
