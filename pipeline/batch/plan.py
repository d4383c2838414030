"""Planning a run: the manifest, run.json, and the (clip, method) tasks still to do (resume)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from typing import Any

from .. import storage
from .config import AnnotateConfig, code_version
from .layout import RunLayout


def read_done_rows(cfg: AnnotateConfig) -> tuple[set[str], int]:
    """row_ids already written under OUTPUT/rows, and how many unreadable (partial) files were
    moved aside (a job killed while writing a file leaves one)."""
    fs, root = storage.filesystem_for(RunLayout(cfg.output).rows, **cfg.storage_options())
    if not fs.exists(root):
        return set(), 0
    import pyarrow.parquet as pq

    done: set[str] = set()
    moved = 0
    for path in sorted(p for p in fs.find(root) if p.endswith(".parquet")):
        try:
            with fs.open(path, "rb") as f:
                done.update(pq.read_table(f, columns=["row_id"]).column("row_id").to_pylist())
        except Exception:
            target = RunLayout.partial_target(path)
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.mv(path, target)
            moved += 1
    return done, moved


def plan_run(cfg: AnnotateConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Write the manifest; return (manifest, pending tasks, run info)."""
    opts = cfg.storage_options()
    fs, out_root = storage.filesystem_for(cfg.output, **opts)
    run_file = RunLayout(out_root).run_json
    if fs.exists(run_file):
        with fs.open(run_file, "r") as f:
            info = json.load(f)
        if cfg.run_id and cfg.run_id != info["run_id"]:
            raise ValueError(f"{cfg.output} holds run {info['run_id']}; use another output for run {cfg.run_id}")
    else:
        info = {"run_id": cfg.run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]}
    info.update(config=asdict(cfg), code_version=code_version(), updated=time.time())
    fs.makedirs(out_root, exist_ok=True)
    with fs.open(run_file, "w") as f:
        json.dump(info, f, indent=1, default=str)

    manifest = storage.build_manifest(cfg.input, **opts)
    manifest.sort(key=lambda r: r["clip_id"])
    if cfg.limit is not None:
        manifest = manifest[: cfg.limit]
    _write_manifest(manifest, RunLayout(cfg.output).manifest, opts)
    done, _ = read_done_rows(cfg)
    tasks = []
    for i, item in enumerate(manifest):
        for method in cfg.methods_for(i):
            row_id = f"{item['clip_id']}:{method}"
            if row_id not in done:
                tasks.append({
                    "row_id": row_id,
                    "clip_id": item["clip_id"],
                    "uri": item["uri"],
                    "kind": item.get("kind") or "",  # unknown: decided from the bytes
                    "prompt": item.get("prompt") or cfg.prompt,
                    "expected_answer": None if item.get("answer") is None else str(item["answer"]),
                    "method": method,
                    # per-input sampling from the manifest (columns `fps` / `frames`), else the run's
                    "sample_fps": float(item["fps"]) if item.get("fps") not in (None, "") else (cfg.fps or 0.0),
                    "sample_frames": int(item["frames"]) if item.get("frames") not in (None, "") else cfg.frames,
                })
    info["n_inputs"], info["n_done_before"], info["n_pending"] = len(manifest), len(done), len(tasks)
    return manifest, tasks, info


def _write_manifest(manifest: list[dict[str, Any]], url: str, opts: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem_for(url, **opts)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    table = pa.Table.from_pylist([{k: (None if v is None else str(v)) for k, v in r.items()} for r in manifest])
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)

