"""Find a checkpoint (hub id, local directory or ``s3://`` prefix) and load its parts.

* a local directory is used in place;
* ``s3://bucket/prefix`` (or any fsspec URL) is copied once into a local cache directory keyed by the
  URL, and reused when every object's size and ETag still match (a ``.complete`` marker is written
  last, so an interrupted copy is redone);
* anything else is a Hugging Face hub id, resolved by ``huggingface_hub.snapshot_download``, which
  honours ``HF_HUB_OFFLINE=1`` (then only the local hub cache is used).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


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
    if "config.json" not in manifest:
        raise CheckpointNotFoundError(f"{url} holds no config.json; is it a Hugging Face checkpoint directory?")
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
    if local.is_dir():
        if not (local / "config.json").exists():
            raise CheckpointNotFoundError(f"{local} has no config.json")
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


def load_preprocessor_config(path: Path) -> dict[str, Any]:
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        f = path / name
        if f.exists():
            return json.loads(f.read_text())
    return {}
