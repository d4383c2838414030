"""Planning a run: the manifest, run.json, and the (clip, method) tasks still to do (resume, reruns).

A run directory belongs to one *configuration* at a time, identified by its fingerprint: the settings
that decide what a row says (`FINGERPRINT_FIELDS`: model, engine, prompt, method, budget and every other
compression knob, baseline, sampling, max_new_tokens). Execution knobs (batch size, actors, CPUs/GPUs,
device, dtype, timeouts, --limit, storage options) are not part of it. The code version is *not* part of
it by default (a commit that does not change answers must not force a new run; every row records its
``code_version`` anyway); ``--fingerprint-code-version`` puts it in.

    rerun, same fingerprint       resume: rows already written are kept; error rows are retried, and so
                                  are the rows of inputs whose bytes changed (size + ETag/mtime from the
                                  listing); ``--only-new`` runs only (input, method) pairs without any row
    rerun, other fingerprint      refused (exit 2; run.json untouched), naming the fields that differ
    ... with ``--new-config``     rows of the new configuration are written beside the old ones; row ids
                                  carry the configuration key (``clip:method@key``), so the two never mix,
                                  and the run's table (`current_config_rows`) holds the current one's rows
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import storage
from .config import AnnotateConfig, code_version
from .layout import RunLayout

FINGERPRINT_FIELDS = ("model", "engine", "prompt", "method", "budget", "compression", "baseline", "frames", "fps",
                      "max_frames", "max_pixels_per_frame", "max_new_tokens")
_KEY_RE = re.compile(r"^[0-9a-f]{8}$")


class ConfigMismatch(ValueError):
    """A rerun whose configuration differs from the run's (the CLI prints it and exits 2)."""


# ------------------------------------------------------------------------------------------ fingerprints


def fingerprint(cfg: AnnotateConfig | dict[str, Any], version: str | None = None) -> dict[str, Any]:
    """The settings that decide a run's rows, JSON-normalised (see the module docstring)."""
    c = cfg if isinstance(cfg, dict) else asdict(cfg)
    fp = {k: c.get(k) for k in FINGERPRINT_FIELDS}
    fp["compression"] = _effective_compression(c)
    if c.get("fingerprint_code_version"):
        fp["code_version"] = version or code_version()
    return json.loads(json.dumps(fp, sort_keys=True, default=str))


def _effective_compression(c: dict[str, Any]) -> dict[str, Any]:
    """Every CompressionConfig knob of the main method (defaults filled in, so a CLI run and an API run with
    the same effective settings agree); the raw dict if it does not validate (the job reports that)."""
    extra = dict(c.get("compression") or {})
    try:
        from meda_engine.config import CompressionConfig

        full = asdict(CompressionConfig(method=c.get("method") or "meda", budget=c.get("budget"), **extra))
    except Exception:  # noqa: BLE001 - invalid settings fail later, with the engine's message
        return extra
    full.pop("method", None), full.pop("budget", None)
    return full


def config_key(fp: dict[str, Any]) -> str:
    """8 hex digits naming a fingerprint (the suffix of its rows' ids)."""
    return hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:8]


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``field: old -> new`` for each field that differs (compression knobs one by one)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{d}" for d in fingerprint_diff(a, b)]
        elif a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def row_id(clip_id: str, method: str, key: str) -> str:
    return f"{clip_id}:{method}@{key}"


def key_of_row(rid: str, legacy_key: str | None = None) -> str | None:
    """The configuration key of a row id; ``legacy_key`` for ids written before keys existed (``clip:method``)."""
    _, sep, tail = rid.rpartition("@")
    return tail if sep and _KEY_RE.match(tail) else legacy_key


def read_run_json(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    fs, out_root = storage.filesystem_for(output, **(storage_options or {}))
    path = RunLayout(out_root).run_json
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def current_config_rows(df, output: str, storage_options: dict[str, Any] | None = None):
    """The rows of ``df`` (a run's rows) made with the run's current configuration (all of them for a run
    directory without run.json)."""
    info = read_run_json(output, storage_options)
    if not info or not info.get("config_key") or not len(df):
        return df
    keys = df.row_id.map(lambda r: key_of_row(str(r), info.get("legacy_key")))
    return df[keys == info["config_key"]].reset_index(drop=True)


# ------------------------------------------------------------------------------------------ existing rows


@dataclass
class ExistingRows:
    status: dict[str, str] = field(default_factory=dict)  # row_id -> status of its latest row (this config)
    created: dict[str, Any] = field(default_factory=dict)  # row_id -> created_at of that row
    moved: int = 0  # unreadable (partial) files moved aside
    other_config: int = 0  # rows of other configurations in the directory


def read_done_rows(cfg: AnnotateConfig, key: str | None = None, legacy_key: str | None = None) -> ExistingRows:
    """The rows already under OUTPUT/rows of configuration ``key`` (all, when None): each row_id's latest
    status. Unreadable (partial) files, which a job killed while writing leaves, are moved to
    OUTPUT/_partial (same relative path) and counted."""
    opts = cfg.storage_options()
    fs, out_root = storage.filesystem_for(cfg.output, **opts)
    layout = RunLayout(out_root)
    root = layout.rows
    fs.invalidate_cache(root)  # another process (or Ray's workers) may have written since we last listed
    found = ExistingRows()
    if not fs.exists(root):
        return found
    import pyarrow.parquet as pq

    latest: dict[str, tuple[Any, str]] = {}
    for path in sorted(p for p in fs.find(root) if p.endswith(".parquet")):
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=["row_id", "status", "created_at"])
        except Exception:
            target = layout.partial_target(path)
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.mv(path, target)
            found.moved += 1
            continue
        for rid, status, created in zip(*(table.column(c).to_pylist() for c in ("row_id", "status", "created_at"))):
            if key is not None and key_of_row(rid, legacy_key) != key:
                found.other_config += 1
                continue
            if rid not in latest or (created is not None and (latest[rid][0] is None or created >= latest[rid][0])):
                latest[rid] = (created, status)
    found.status = {rid: status for rid, (_, status) in latest.items()}
    found.created = {rid: created for rid, (created, _) in latest.items()}
    return found


# ------------------------------------------------------------------------------------------ the plan


def plan_run(cfg: AnnotateConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Check the configuration against the run's, write the manifest and run.json; return (manifest,
    pending tasks, run info). Raises ConfigMismatch (nothing written) for a rerun with another configuration
    without ``cfg.new_config``."""
    opts = cfg.storage_options()
    fs, out_root = storage.filesystem_for(cfg.output, **opts)
    layout = RunLayout(out_root)
    version = code_version()
    fp = fingerprint(cfg, version)
    key = config_key(fp)
    info = read_run_json(cfg.output, opts)
    if info is not None:
        if cfg.run_id and cfg.run_id != info["run_id"]:
            raise ValueError(f"{cfg.output} holds run {info['run_id']}; use another output for run {cfg.run_id}")
        if "config_key" not in info:  # a run directory from before fingerprints: its rows are `clip:method`
            old_fp = fingerprint(info.get("config") or {}, info.get("code_version"))
            info.update(fingerprint=old_fp, config_key=config_key(old_fp), legacy_key=config_key(old_fp))
        if info["config_key"] != key:
            if not cfg.new_config:
                raise ConfigMismatch(
                    f"{cfg.output} holds run {info['run_id']} made with another configuration "
                    f"({'; '.join(fingerprint_diff(info['fingerprint'], fp))}); use another --output for a "
                    f"new run, or pass --new-config to add this configuration's rows beside the old ones "
                    f"(kept apart by row_id)")
            print(f"[meda] {cfg.output}: switching to a new configuration {key} (was {info['config_key']}; "
                  f"{'; '.join(fingerprint_diff(info['fingerprint'], fp))}); old rows are kept apart",
                  file=sys.stderr, flush=True)
    else:
        info = {"run_id": cfg.run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6],
                "created": time.time()}
    configs = info.setdefault("configs", {})
    if info.get("config_key") and info["config_key"] not in configs:
        configs[info["config_key"]] = {"fingerprint": info.get("fingerprint")}
    configs.setdefault(key, {"fingerprint": fp, "first_used": time.time()})
    info.update(config=asdict(cfg), fingerprint=fp, config_key=key, code_version=version, updated=time.time())

    unreadable: list[str] = []
    manifest = storage.build_manifest(cfg.input, unreadable=unreadable, **opts)
    manifest.sort(key=lambda r: r["clip_id"])
    if cfg.limit is not None:
        manifest = manifest[: cfg.limit]
    if unreadable:
        print(f"[meda] warning: {len(unreadable)} director{'y' if len(unreadable) == 1 else 'ies'} under "
              f"{cfg.input} could not be listed (permissions?); their files are not in this run: "
              f"{', '.join(unreadable[:5])}{' ...' if len(unreadable) > 5 else ''}", file=sys.stderr, flush=True)

    # Inputs whose bytes changed since their rows were made: compare with what the previous manifest says
    # the rows were made from (`rows_version`; set to the current `source_version` once a run completes).
    previous = _read_manifest_versions(layout.manifest, opts)
    changed: set[str] = set()
    for item in manifest:
        made_from = previous.get(item["clip_id"])
        now = item.get("source_version")
        if made_from and now and made_from != now:
            changed.add(item["clip_id"])
        item["rows_version"] = made_from or now  # stale until this run redoes the input's rows

    existing = read_done_rows(cfg, key, info.get("legacy_key"))
    tasks, n_retried, n_redone_changed, n_skipped_errors = [], 0, 0, 0
    for i, item in enumerate(manifest):
        for method in cfg.methods_for(i):
            rid = row_id(item["clip_id"], method, key)
            if info.get("legacy_key") == key and rid not in existing.status:
                rid = f"{item['clip_id']}:{method}"  # keep a pre-fingerprint run's ids (and resume it)
            status = existing.status.get(rid)
            if status is not None:
                if cfg.only_new:
                    n_skipped_errors += status != "ok"
                    continue
                if status != "ok":
                    n_retried += 1  # a transient read error, a config error, an input repaired since, ...
                elif item["clip_id"] in changed:
                    n_redone_changed += 1  # succeeded, but on bytes that have changed since
                else:
                    continue
            tasks.append({
                "row_id": rid,
                "clip_id": item["clip_id"],
                "uri": item["uri"],
                "kind": item.get("kind") or "",  # unknown: decided from the bytes
                "prompt": item.get("prompt") or cfg.prompt,
                "expected_answer": None if item.get("answer") is None else str(item["answer"]),
                "method": method,
                # per-input sampling from the manifest (columns `fps` / `frames`), else the run's
                "sample_fps": float(item["fps"]) if item.get("fps") not in (None, "") else (cfg.fps or 0.0),
                "sample_frames": int(item["frames"]) if item.get("frames") not in (None, "") else cfg.frames,
                # per-input answer length (column `max_new_tokens`), else the run's
                "max_new_tokens": (int(item["max_new_tokens"]) if item.get("max_new_tokens") not in (None, "")
                                   else cfg.max_new_tokens),
            })

    fs.makedirs(out_root, exist_ok=True)
    with fs.open(layout.run_json, "w") as f:
        json.dump(info, f, indent=1, default=str)
    write_manifest(manifest, cfg)
    info.update(
        n_inputs=len(manifest), n_done_before=sum(s == "ok" for s in existing.status.values()),
        n_pending=len(tasks), n_retried_errors=n_retried, n_changed_inputs=len(changed),
        n_redone_changed=n_redone_changed, n_errors_kept=n_skipped_errors, n_partial_moved=existing.moved,
        n_other_config_rows=existing.other_config, n_unreadable_dirs=len(unreadable),
        unreadable_dirs=unreadable[:100], stale_clips=sorted(changed - _clips(tasks)),
    )
    return manifest, tasks, info


def _clips(tasks: list[dict[str, Any]]) -> set[str]:
    return {t["clip_id"] for t in tasks}


def finish_manifest(manifest: list[dict[str, Any]], cfg: AnnotateConfig, stale: Any = ()) -> None:
    """After a run that completed: the rows of every input but the ``stale`` ones (changed, not redone:
    ``--only-new``) now reflect its current bytes."""
    stale = set(stale)
    for item in manifest:
        if item["clip_id"] not in stale:
            item["rows_version"] = item.get("source_version")
    write_manifest(manifest, cfg)


def _read_manifest_versions(url: str, opts: dict[str, Any]) -> dict[str, str]:
    """clip_id -> the version of the bytes its rows were made from, per the run's previous manifest."""
    fs, path = storage.filesystem_for(url, **opts)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return {}
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            rows = pq.read_table(f).to_pylist()
    except Exception:  # noqa: BLE001 - an unreadable manifest (killed write) only loses change detection
        return {}
    return {r["clip_id"]: r.get("rows_version") or r.get("source_version") for r in rows
            if r.get("rows_version") or r.get("source_version")}


def write_manifest(manifest: list[dict[str, Any]], cfg: AnnotateConfig) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem_for(RunLayout(cfg.output).manifest, **cfg.storage_options())
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    table = pa.Table.from_pylist([{k: (None if v is None else str(v)) for k, v in r.items()} for r in manifest])
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
