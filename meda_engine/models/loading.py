"""Find a checkpoint (hub id, local directory or ``s3://`` prefix) and load its parts.

* a local directory is used in place;
* ``s3://bucket/prefix`` (or any fsspec URL) is copied once into a local cache directory keyed by the
  URL, and reused when every object's size and ETag still match (a ``.complete`` marker is written
  last, so an interrupted copy is redone);
* anything else is a Hugging Face hub id, resolved by ``huggingface_hub.snapshot_download``, which
  honours ``HF_HUB_OFFLINE=1`` (then only the local hub cache is used).

GGUF checkpoints (`resolve_source`): a ``.gguf`` file, a directory holding one (and no
``config.json``, or a named ``gguf_file``), a hub id with ``gguf_file`` (only that file is downloaded,
not every quantisation in the repo), or the short form ``owner/repo/name.gguf``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import gguf as gguf_support


class CheckpointNotFoundError(FileNotFoundError):
    """The model source could not be resolved to a local checkpoint directory."""


def default_cache_dir() -> Path:
    root = os.environ.get("MEDA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "meda")
    return Path(root) / "checkpoints"


def _is_url(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def _copy_remote(url: str, cache_dir: Path, storage_options: dict | None) -> Path:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    listing = fs.find(root, detail=True)
    if not listing:
        raise CheckpointNotFoundError(f"no objects under {url}")
    manifest = {
        os.path.relpath(path, root): [int(info.get("size") or 0), str(info.get("ETag") or info.get("etag") or "")]
        for path, info in sorted(listing.items())
        if info.get("type", "file") == "file"
    }
    if "config.json" not in manifest and not any(gguf_support.is_gguf_name(k) for k in manifest):
        raise CheckpointNotFoundError(
            f"{url} holds no config.json and no .gguf file; is it a Hugging Face checkpoint directory?"
        )
    target = cache_dir / hashlib.sha256(url.encode()).hexdigest()[:24]
    marker = target / ".complete"
    if marker.exists() and json.loads(marker.read_text()) == manifest:
        return target
    target.mkdir(parents=True, exist_ok=True)
    if marker.exists():
        marker.unlink()
    for rel in manifest:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        fs.get_file(f"{root}/{rel}", str(tmp))
        os.replace(tmp, dest)
    marker.write_text(json.dumps(manifest))
    return target


def resolve_checkpoint(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                       revision: str | None = None, storage_options: dict | None = None) -> Path:
    """A local directory holding the checkpoint named by ``source``."""
    source = os.fspath(source)
    if source.startswith("file://"):
        source = source[len("file://"):]
    local = Path(source).expanduser()
    if local.is_file() and gguf_support.is_gguf_name(local.name):
        return local.parent
    if local.is_dir():
        if not (local / "config.json").exists() and not any(gguf_support.is_gguf_name(p.name) for p in local.iterdir()):
            raise CheckpointNotFoundError(f"{local} has no config.json and no .gguf file")
        return local
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if _is_url(source):
        return _copy_remote(source, cache, storage_options)
    if source.startswith(("/", ".", "~")):
        raise CheckpointNotFoundError(f"no checkpoint directory at {source}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(source, revision=revision, local_files_only=offline))
    except LocalEntryNotFoundError as e:
        raise CheckpointNotFoundError(
            f"{source!r} is not a local directory and is not in the hub cache"
            + (" (HF_HUB_OFFLINE is set)" if offline else "")
        ) from e
    except Exception as e:  # network errors, unknown repo ids
        raise CheckpointNotFoundError(f"could not fetch {source!r} from the Hugging Face hub: {e}") from e


@dataclass(frozen=True)
class Checkpoint:
    """A resolved model source: a local directory, and the GGUF file in it when the weights are GGUF.

    ``gguf_file`` is a name inside ``path`` (what transformers' ``from_pretrained(path, gguf_file=...)``
    takes); ``gguf`` is that file's header (`meda_engine.models.gguf.GGUFInfo`)."""

    path: Path
    gguf_file: str | None = None
    gguf: gguf_support.GGUFInfo | None = None

    def info(self, source: str) -> dict[str, Any]:
        """What the engine reports as its model info."""
        if self.gguf is not None:
            return {"source": source, "path": str(self.path), **self.gguf.to_dict()}
        return {"source": source, "path": str(self.path), "format": "hf", "quantization": None}


def _split_hub_gguf(source: str) -> tuple[str, str] | None:
    """``owner/repo/sub/name.gguf`` -> (``owner/repo``, ``sub/name.gguf``)."""
    parts = source.split("/")
    if len(parts) >= 3 and gguf_support.is_gguf_name(parts[-1]) and not source.startswith(("/", ".", "~")):
        return "/".join(parts[:2]), "/".join(parts[2:])
    return None


def resolve_source(source: str | os.PathLike, *, gguf_file: str | None = None,
                   cache_dir: str | os.PathLike | None = None, revision: str | None = None,
                   storage_options: dict | None = None) -> Checkpoint:
    """Resolve ``source`` (and an optional ``gguf_file`` name in it) to a local `Checkpoint`.

    A directory with a ``config.json`` is a Hugging Face checkpoint unless ``gguf_file`` is given; a
    directory without one must hold exactly one ``.gguf`` file (or name it)."""
    source = os.fspath(source)
    if source.startswith("file://"):
        source = source[len("file://"):]
    local = Path(source).expanduser()
    if gguf_file is None and not local.exists() and not _is_url(source):
        split = _split_hub_gguf(source)
        if split is not None:
            source, gguf_file = split
            local = Path(source)
    if local.is_file():
        if not gguf_support.is_gguf_name(local.name):
            raise CheckpointNotFoundError(f"{local} is a file but not a .gguf checkpoint")
        if gguf_file is not None and gguf_file != local.name:
            raise CheckpointNotFoundError(f"source {local} is a GGUF file; gguf_file={gguf_file!r} names another")
        return Checkpoint(local.parent, local.name, gguf_support.read_gguf_info(local))
    if gguf_file is not None and not local.is_dir() and not _is_url(source) and not source.startswith(("/", ".", "~")):
        return _hub_gguf(source, gguf_file, cache_dir=cache_dir, revision=revision)
    path = resolve_checkpoint(source, cache_dir=cache_dir, revision=revision, storage_options=storage_options)
    if gguf_file is None and (path / "config.json").exists():
        return Checkpoint(path)
    try:
        found = gguf_support.find_gguf_file(path, gguf_file)
    except gguf_support.GGUFError as e:
        raise CheckpointNotFoundError(str(e)) from e
    if found is None:
        raise CheckpointNotFoundError(f"{path} has no config.json and no .gguf file")
    return Checkpoint(path, found.name, gguf_support.read_gguf_info(found))


def _hub_gguf(repo_id: str, gguf_file: str, *, cache_dir, revision) -> Checkpoint:
    from huggingface_hub import hf_hub_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        file = Path(hf_hub_download(repo_id, gguf_file, revision=revision, local_files_only=offline))
    except Exception as e:  # not cached offline, network errors, unknown repo or file
        raise CheckpointNotFoundError(
            f"could not get {gguf_file!r} from hub repo {repo_id!r}" + (" (HF_HUB_OFFLINE is set)" if offline else "")
            + f": {e}"
        ) from e
    # hf_hub_download keeps the repo's layout under a snapshot dir: the file's name relative to it
    root = file.parents[len(Path(gguf_file).parts) - 1]
    return Checkpoint(root, gguf_file, gguf_support.read_gguf_info(file))


def load_preprocessor_config(path: Path) -> dict[str, Any]:
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        f = path / name
        if f.exists():
            return json.loads(f.read_text())
    return {}
