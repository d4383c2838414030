"""The distributed plan (``--plan distributed``; ``auto`` for large manifests): the driver's plan (plan.py)
computed one clip-id range at a time in Ray tasks, so that what the driver holds and does does not grow with
the corpus (a few numbers and a sample of clip ids per chunk, a few counts per range).

Every decision of the plan is its own clip's: change detection (the previous manifest's version of that
clip), the anti-join (the rows whose id names that clip), duplicates (rows of the same clip id). Only
``--limit`` and the baseline sample are by *rank* in clip-id order, and ranges of clip ids keep the rank:
a range's offset is the size of the ranges before it. So the corpus is range-partitioned by clip id (as a
distributed sort partitions: bounds are quantiles of a sample) and each range runs `plan.plan_slice`, the
driver plan's own function, on its inputs and rows:

    chunks     the manifest in chunks: runs of Parquet row groups (read by the workers), a CSV / JSONL file
               whole (read by one worker), or slices of a prefix's listing (which the driver holds anyway)
    normalise  one task per chunk: clip ids, prompts, kinds, versions (storage.normalize_manifest_table),
               the rows' input order; written to stage-plan/in/; returns its size and a sample of clip ids
    bounds     on the driver: P - 1 quantiles of the samples, P ranges of about PARTITION_ROWS inputs
    route      one task per chunk, per group of row files (row_id/status/created_at of this configuration;
               unreadable files moved to _partial/ as on the driver) and per previous manifest shard: each
               row to the range of its clip id, as pieces under stage-plan/pNNNNN/
    sort       one task per range: the first of duplicate clip ids wins (input order), sorted by clip id
    offsets    on the driver: each range's rank offset; --limit cuts the ranges
    plan       one task per range: plan_slice; writes the range's manifest shard and task shards
               (part-<range>-<k>.parquet); returns its counts and its stale clips
    finish     on the driver: run.json, the manifest swapped in, the stage removed

The same functions run in-process, one call after another, when Ray is not up (the tests compare the two
plans' outputs). The check after a run for rows lost with their batch (`lost_row_ids`) is the same route +
per-range anti-join, over the rows written since planning.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from .. import storage
from .config import AnnotateConfig
from .layout import RunLayout
from . import plan as P

CHUNK_ROWS = 200_000  # manifest rows per normalise task (Parquet: whole row groups, so about this many)
PARTITION_ROWS = 200_000  # inputs per clip-id range (one plan task, one manifest shard)
SAMPLE_PER_CHUNK = 512  # clip ids each chunk returns for the range bounds
ROW_FILES_PER_TASK = 512  # row files each route task reads
ORDER = "__meda_input_order"  # the rows' input order while the plan runs (chunk << 32 | row): first wins


@dataclass
class Chunk:
    """One normalise task's part of the manifest: Parquet ``row_groups`` (first row ``offset``), the whole file
    (``row_groups`` None, no ``table``), or a slice of the listing (``table``)."""

    index: int
    row_groups: list[int] | None = None
    offset: int = 0
    table: Any = None


def _map(fn: Callable, calls: list[tuple]) -> list:
    """``fn(*args)`` for each args of ``calls``: Ray tasks when Ray is up (the results are small), else here."""
    try:
        import ray

        up = ray.is_initialized()
    except ImportError:  # pragma: no cover - ray is a dependency
        up = False
    if not up or not calls:
        return [fn(*a) for a in calls]
    remote = ray.remote(num_cpus=1, max_retries=3)(fn)
    return ray.get([remote.remote(*a) for a in calls])


# ------------------------------------------------------------------------------------------ files


def _write(table, url: str, opts: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem_for(url, **opts)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def _read_dir(url: str, opts: dict[str, Any], prefix: str = ""):
    """The Parquet files under ``url`` whose names start with ``prefix``, in name order, as one table (None if
    there are none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem_for(url, **opts)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return None
    names = sorted(p for p in fs.ls(path, detail=False)
                   if p.rsplit("/", 1)[-1].startswith(prefix) and p.endswith(".parquet"))
    tables = []
    for name in names:
        with fs.open(name, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def _rmtree(url: str, opts: dict[str, Any]) -> None:
    fs, path = storage.filesystem_for(url, **opts)
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ------------------------------------------------------------------------------------------ ranges


def range_bounds(samples: list[str], n_total: int, rows_per_range: int | None = None) -> list[str]:
    """The lower bounds of ranges 1..P-1 (range 0 starts below everything): quantiles of the sorted sample,
    P = ceil(n_total / rows_per_range), repeated values dropped."""
    rows_per_range = PARTITION_ROWS if rows_per_range is None else rows_per_range
    n_ranges = max(1, math.ceil(n_total / max(1, rows_per_range)))
    s = sorted(samples)
    if n_ranges == 1 or not s:
        return []
    bounds = [s[min(len(s) - 1, (k * len(s)) // n_ranges)] for k in range(1, n_ranges)]
    return sorted(set(bounds))


def split_by_range(table, clip, bounds: list[str]) -> list[tuple[int, Any]]:
    """``table``'s rows by the range of ``clip`` (a string column beside it: range j holds bounds[j-1] <= clip <
    bounds[j]), each range's rows sorted by clip (stable: the table's order on ties). Nulls go last."""
    import pyarrow.compute as pc

    order = pc.sort_indices(clip)
    table, clip = table.take(order), clip.take(order)
    n = table.num_rows
    cuts = [0] + [int(pc.sum(pc.less(clip, b)).as_py() or 0) for b in bounds] + [n]
    return [(j, table.slice(cuts[j], cuts[j + 1] - cuts[j])) for j in range(len(cuts) - 1) if cuts[j + 1] > cuts[j]]


def clip_of_row_ids(row_ids):
    """The clip id of each row id (``clip:method@key``, or ``clip:method`` from before keys)."""
    import pyarrow.compute as pc

    clip = pc.struct_field(pc.extract_regex(row_ids, r"^(?P<clip>.*):[^:]*$"), [0])
    return pc.coalesce(clip, row_ids)


# ------------------------------------------------------------------------------------------ tasks (workers)


def _normalize(source: str, chunk: Chunk, stage: str, opts: dict[str, Any]) -> tuple[int, list[str]]:
    """Normalise one chunk (see the module docstring); returns (its rows after in-chunk duplicates, a sample of
    its clip ids)."""
    import numpy as np
    import pyarrow as pa

    if chunk.table is not None:
        raw, given = chunk.table, True
    else:
        raw = storage.read_manifest_table(source, row_groups=chunk.row_groups, row_offset=chunk.offset, **opts)
        given = "source_version" in raw.column_names
    raw = raw.append_column(ORDER, pa.array((chunk.index << 32) + np.arange(raw.num_rows, dtype=np.int64)))
    table = storage.normalize_manifest_table(raw, source, given_version=given)
    _write(table, RunLayout.stage_input(stage, chunk.index), opts)
    rng = np.random.default_rng(chunk.index)
    n = table.num_rows
    pick = np.sort(rng.choice(n, size=min(n, SAMPLE_PER_CHUNK), replace=False)) if n else np.zeros(0, np.int64)
    return n, table.column("clip_id").take(pa.array(pick)).to_pylist()


def _route_input(stage: str, chunk: int, bounds: list[str], opts: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem_for(RunLayout.stage_input(stage, chunk), **opts)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    for j, part in split_by_range(table, table.column("clip_id"), bounds):
        _write(part, RunLayout.stage_piece(stage, j, f"in-{chunk:05d}"), opts)


def _route_rows(output: str, paths: list[str], group: int, bounds: list[str], key: str | None,
                legacy_key: str | None, since_us: int | None, stage: str, opts: dict[str, Any]) -> tuple[int, int]:
    """Route the key columns of the row files ``paths`` (configuration ``key``; only rows created at or after
    ``since_us`` when given) to their ranges; returns (unreadable files moved to _partial, rows of other
    configurations)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table, moved = P.read_row_keys_of(output, paths, opts)
    if table is None or not table.num_rows:
        return moved, 0
    other = 0
    if key is not None:
        mine = pc.fill_null(pc.equal(P.row_keys(table.column("row_id"), legacy_key), key), False)
        other = table.num_rows - P._count(mine)
        table = table.filter(mine)
    if since_us is not None:
        created = table.column("created_at")
        created = created.cast(pa.timestamp("us", tz=getattr(created.type, "tz", None))).cast(pa.int64())
        table = table.filter(pc.fill_null(pc.greater_equal(created, since_us), False))
    table = table.combine_chunks()
    for j, part in split_by_range(table, clip_of_row_ids(table.column("row_id")), bounds):
        _write(part, RunLayout.stage_piece(stage, j, f"rows-{group:05d}"), opts)
    return moved, other


def _route_previous(manifest_url: str, path: str, shard: int, bounds: list[str], stage: str,
                    opts: dict[str, Any]) -> None:
    """Route (clip_id, made_from) of the previous manifest's file ``path`` (its ``shard``-th) to the ranges; an
    unreadable shard only loses change detection for its inputs (as on the driver)."""
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem_for(manifest_url, **opts)
    try:
        with fs.open(path, "rb") as f:
            t = pq.read_table(f)
    except Exception:  # noqa: BLE001
        return
    versions = P.manifest_versions(t)
    if versions is None:
        return
    for j, part in split_by_range(versions, versions.column("clip_id"), bounds):
        _write(part, RunLayout.stage_piece(stage, j, f"prev-{shard:05d}"), opts)


def _sort_range(stage: str, j: int, opts: dict[str, Any]) -> int:
    """Range ``j``'s inputs: duplicates dropped (the first in input order wins), sorted by clip id; returns how
    many."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _read_dir(RunLayout.stage_range(stage, j), opts, prefix="in-")
    if table is None or not table.num_rows:
        return 0
    table = table.take(pc.sort_indices(table, sort_keys=[("clip_id", "ascending"), (ORDER, "ascending")]))
    n = table.num_rows
    cid = table.column("clip_id").combine_chunks()
    if n > 1:
        first = pa.concat_arrays([pa.array([True]), pc.not_equal(cid.slice(1), cid.slice(0, n - 1))])
        table = table.filter(first)
    table = table.drop_columns([ORDER])
    _write(table, RunLayout.stage_piece(stage, j, "sorted"), opts)
    return table.num_rows


def _plan_range(cfg: AnnotateConfig, j: int, offset: int, m: int, n_total: int, key: str, legacy_key: str | None,
                stage: str, tasks_url: str, manifest_staging: str) -> dict[str, Any]:
    """Plan range ``j``: its first ``m`` inputs (ranked from ``offset``), against its rows and previous
    versions (`plan.plan_slice`); writes its manifest shard and task shards; returns its counts."""
    import pyarrow.compute as pc

    opts = cfg.storage_options()
    here = RunLayout.stage_range(stage, j)
    latest = _read_dir(here, opts, prefix="rows-")
    latest = P._empty_keys() if latest is None else P._latest(latest)
    n_ok = 0 if not latest.num_rows else P._count(pc.equal(latest.column("status"), "ok"))
    out = {"n": m, "n_ok": n_ok, "n_tasks": 0, "n_changed": 0, "n_retried": 0, "n_redone": 0, "n_kept_errors": 0,
           "needs_finish": False, "stale": []}
    if not m:
        return out
    table = _read_dir(here, opts, prefix="sorted").slice(0, m)
    previous = _read_dir(here, opts, prefix="prev-")
    sp = P.plan_slice(cfg, table, key=key, legacy_key=legacy_key, latest=latest, previous=previous, offset=offset,
                      n_total=n_total)
    _write(sp.table, RunLayout.part(manifest_staging, j), opts)
    for k, part in enumerate(sp.task_parts(cfg)):
        _write(part.cast(P.task_schema()), RunLayout.range_part(tasks_url, j, k), opts)
        out["n_tasks"] += part.num_rows
    out.update(n_changed=sp.n_changed, n_retried=sp.n_retried, n_redone=sp.n_redone, n_kept_errors=sp.n_kept_errors,
               needs_finish=sp.needs_finish, stale=sp.stale.to_pylist())
    return out


# ------------------------------------------------------------------------------------------ the driver


def _chunks(cfg: AnnotateConfig, unreadable: list[str]) -> list[Chunk]:
    """The manifest's chunks (see the module docstring). Reads a Parquet manifest's footer only."""
    fmt = storage.manifest_format(cfg.input)
    opts = cfg.storage_options()
    if fmt is None:
        table = storage.listing_table(cfg.input, unreadable=unreadable, **opts)
        return [Chunk(i, table=table.slice(s, CHUNK_ROWS))
                for i, s in enumerate(range(0, max(1, table.num_rows), CHUNK_ROWS))]
    if fmt != "parquet":
        return [Chunk(0)]
    import pyarrow.parquet as pq

    fs, path = storage.filesystem_for(cfg.input, **opts)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    chunks, groups, rows, offset = [], [], 0, 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        rows += meta.row_group(g).num_rows
        if rows >= CHUNK_ROWS or g == meta.num_row_groups - 1:
            chunks.append(Chunk(len(chunks), groups, offset))
            offset, groups, rows = offset + rows, [], 0
    return chunks or [Chunk(0, [], 0)]


def _row_files(cfg: AnnotateConfig) -> list[str]:
    fs, out_root = storage.filesystem_for(cfg.output, **cfg.storage_options())
    root = RunLayout(out_root).rows
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    return sorted(p for p in fs.find(root) if p.endswith(".parquet"))


def _route_all_rows(cfg: AnnotateConfig, bounds: list[str], key: str | None, legacy_key: str | None,
                    since_us: int | None, stage: str) -> tuple[int, int]:
    files = _row_files(cfg)
    opts = cfg.storage_options()
    calls = [(cfg.output, files[s:s + ROW_FILES_PER_TASK], g, bounds, key, legacy_key, since_us, stage, opts)
             for g, s in enumerate(range(0, len(files), ROW_FILES_PER_TASK))]
    res = _map(_route_rows, calls)
    return sum(r[0] for r in res), sum(r[1] for r in res)


def plan_partitioned(cfg: AnnotateConfig, info: dict[str, Any], key: str):
    """`plan.plan_run`'s distributed half: (manifest, tasks, info) as the driver plan gives them."""
    import pyarrow as pa

    opts = cfg.storage_options()
    fs, out_root = storage.filesystem_for(cfg.output, **opts)
    layout = RunLayout(cfg.output)
    legacy_key = info.get("legacy_key")
    stage = layout.stage("plan")
    _rmtree(stage, opts)
    unreadable: list[str] = []
    chunks = _chunks(cfg, unreadable)
    P.warn_unreadable(cfg, unreadable)
    normalised = _map(_normalize, [(cfg.input, c, stage, opts) for c in chunks])
    for c in chunks:
        c.table = None
    n_rows = sum(n for n, _ in normalised)
    bounds = range_bounds([s for _, sample in normalised for s in sample], n_rows)
    n_ranges = len(bounds) + 1
    _map(_route_input, [(stage, c.index, bounds, opts) for c in chunks])
    moved, other = _route_all_rows(cfg, bounds, key, legacy_key, None, stage)
    prev_url = layout.manifest
    pfs, ppath = storage.filesystem_for(prev_url, **opts)
    pfs.invalidate_cache(ppath.rsplit("/", 1)[0])
    if pfs.exists(ppath):
        shards = [ppath] if pfs.isfile(ppath) else sorted(p for p in pfs.find(ppath) if p.endswith(".parquet"))
        _map(_route_previous, [(prev_url, path, s, bounds, stage, opts) for s, path in enumerate(shards)])
    sizes = _map(_sort_range, [(stage, j, opts) for j in range(n_ranges)])

    n_total = sum(sizes) if cfg.limit is None else min(cfg.limit, sum(sizes))
    offsets, kept, acc = [], [], 0
    for size in sizes:
        offsets.append(acc)
        kept.append(max(0, min(size, n_total - acc)))
        acc += size
    tasks_url = layout.plan_attempt("tasks")
    _rmtree(tasks_url, opts)
    _rmtree(layout.manifest_staging, opts)
    fs.makedirs(storage.filesystem_for(tasks_url, **opts)[1], exist_ok=True)
    res = _map(_plan_range, [(cfg, j, offsets[j], kept[j], n_total, key, legacy_key, stage, tasks_url,
                              layout.manifest_staging) for j in range(n_ranges)])
    n_tasks = sum(r["n_tasks"] for r in res)
    if not n_tasks:
        _write(P.task_schema().empty_table(), RunLayout.range_part(tasks_url, 0, 0), opts)
    if not n_total:
        _write(pa.table({"clip_id": pa.array([], pa.string())}), RunLayout.part(layout.manifest_staging, 0), opts)
    stale = pa.array([c for r in res for c in r["stale"]], pa.string())

    fs.makedirs(out_root, exist_ok=True)
    info.update(
        n_inputs=n_total, n_done_before=sum(r["n_ok"] for r in res),
        n_pending=n_tasks, n_retried_errors=sum(r["n_retried"] for r in res),
        n_changed_inputs=sum(r["n_changed"] for r in res), n_redone_changed=sum(r["n_redone"] for r in res),
        n_errors_kept=sum(r["n_kept_errors"] for r in res), n_partial_moved=moved, n_other_config_rows=other,
        n_unreadable_dirs=len(unreadable), unreadable_dirs=unreadable[:100], n_stale_inputs=len(stale),
        plan="distributed", plan_chunks=len(chunks), plan_ranges=n_ranges,
    )
    with fs.open(RunLayout(out_root).run_json, "w") as f:
        json.dump(info, f, indent=1, default=str)
    manifest = P.Manifest(P.swap_manifest(cfg), n_total, stale, any(r["needs_finish"] for r in res), opts)
    _rmtree(stage, opts)
    return manifest, P.Tasks(tasks_url, n_tasks, opts, bounds=bounds), info


def _lost_in_range(tasks_url: str, j: int, stage: str, opts: dict[str, Any]) -> list[str]:
    import pyarrow.compute as pc

    tasks = _read_dir(tasks_url, opts, prefix=f"part-{j:05d}-")
    if tasks is None or not tasks.num_rows:
        return []
    ids = tasks.column("row_id")
    written = _read_dir(RunLayout.stage_range(stage, j), opts, prefix="rows-")
    if written is None or not written.num_rows:
        return ids.to_pylist()
    return pc.filter(ids, pc.invert(pc.is_in(ids, value_set=written.column("row_id")))).to_pylist()


def lost_row_ids(cfg: AnnotateConfig, info: dict[str, Any], tasks, since_us: int):
    """`job._lost_row_ids` for a distributed plan's tasks: the rows written since planning routed to the plan's
    ranges, then each range's tasks without one (an Arrow array; usually empty, so small on the driver)."""
    import pyarrow as pa

    opts = cfg.storage_options()
    stage = RunLayout(cfg.output).stage("lost")
    _rmtree(stage, opts)
    _route_all_rows(cfg, tasks.bounds, info["config_key"], info.get("legacy_key"), since_us, stage)
    lost = _map(_lost_in_range, [(tasks.url, j, stage, opts) for j in range(len(tasks.bounds) + 1)])
    _rmtree(stage, opts)
    return pa.array([r for part in lost for r in part], pa.string())
