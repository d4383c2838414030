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

ROW_KEY_COLUMNS = ("row_id", "status", "created_at")


@dataclass
class ExistingRows:
    """Each row_id's latest row under OUTPUT/rows (of one configuration), as an Arrow table with the columns
    `ROW_KEY_COLUMNS` (never one Python object per row)."""

    latest: Any = None  # pa.Table(row_id, status, created_at), one row per row_id
    moved: int = 0  # unreadable (partial) files moved aside
    other_config: int = 0  # rows of other configurations in the directory

    def __len__(self) -> int:
        return 0 if self.latest is None else self.latest.num_rows

    @property
    def n_ok(self) -> int:
        import pyarrow.compute as pc

        return 0 if not len(self) else int(pc.sum(pc.equal(self.latest.column("status"), "ok")).as_py() or 0)

    @property
    def status(self) -> dict[str, str]:
        """row_id -> status (a dict: for small runs and tests only)."""
        return {} if not len(self) else dict(zip(self.latest.column("row_id").to_pylist(),
                                                 self.latest.column("status").to_pylist()))


def read_done_rows(cfg: AnnotateConfig, key: str | None = None, legacy_key: str | None = None) -> ExistingRows:
    """The rows already under OUTPUT/rows of configuration ``key`` (all, when None): each row_id's latest
    status and created_at. Reads only the three key columns, columnar. Unreadable (partial) files, which a
    job killed while writing leaves, are moved to OUTPUT/_partial (same relative path) and counted."""
    import pyarrow.compute as pc

    table, moved = _read_row_keys(cfg.output, cfg.storage_options())
    found = ExistingRows(moved=moved)
    if table is None or not table.num_rows:
        found.latest = _empty_keys()
        return found
    if key is not None:
        mine = pc.fill_null(pc.equal(row_keys(table.column("row_id"), legacy_key), key), False)
        found.other_config = table.num_rows - int(pc.sum(mine).as_py() or 0)
        table = table.filter(mine)
    found.latest = _latest(table)
    return found


def row_keys(row_ids, legacy_key: str | None = None):
    """`key_of_row` over a column of row ids (null where neither the id nor ``legacy_key`` gives one)."""
    import pyarrow.compute as pc

    keys = pc.struct_field(pc.extract_regex(row_ids, r"@(?P<key>[0-9a-f]{8})$"), [0])
    return pc.fill_null(keys, legacy_key) if legacy_key is not None else keys


def _empty_keys():
    import pyarrow as pa

    return pa.table({"row_id": pa.array([], pa.string()), "status": pa.array([], pa.string()),
                     "created_at": pa.array([], pa.timestamp("us", tz="UTC"))})


def _latest(table):
    """One row per row_id: the one with the latest created_at (null oldest; equal times: the later file)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = table.combine_chunks()
    if table.num_rows < 2:
        return table
    created = table.column("created_at")  # epoch microseconds, null as the oldest (pyarrow-version-proof)
    created = pc.fill_null(created.cast(pa.timestamp("us", tz=getattr(created.type, "tz", None))).cast(pa.int64()),
                           -(2**63))
    keys = pa.table({"row_id": table.column("row_id"), "t": created})
    order = pc.sort_indices(keys, sort_keys=[("row_id", "ascending"), ("t", "ascending")])  # stable: file order on ties
    table = table.take(order)
    n = table.num_rows
    rid = table.column("row_id").combine_chunks()
    last = pc.not_equal(rid.slice(0, n - 1), rid.slice(1))
    return table.filter(pa.concat_arrays([last, pa.array([True])]))


def _read_row_keys(output: str, opts: dict[str, Any]):
    """(row_id/status/created_at of every row file under OUTPUT/rows, files moved aside). One multi-threaded
    pyarrow.dataset scan; if a file cannot be read, each file is read on its own and the unreadable ones are
    moved to _partial."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    fs, out_root = storage.filesystem_for(output, **opts)
    root = RunLayout(out_root).rows
    fs.invalidate_cache(root)  # another process (or Ray's workers) may have written since we last listed
    if not fs.exists(root):
        return None, 0
    return read_row_keys_of(output, sorted(p for p in fs.find(root) if p.endswith(".parquet")), opts)


def read_row_keys_of(output: str, paths: list[str], opts: dict[str, Any]):
    """`_read_row_keys` of the row files ``paths`` (as the output's filesystem spells them; in this order)."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    if not paths:
        return None, 0
    fs, out_root = storage.filesystem_for(output, **opts)
    layout = RunLayout(out_root)
    pa_fs, _ = storage.pyarrow_filesystem_for(output, **opts)
    try:
        return pads.dataset(paths, filesystem=pa_fs, format="parquet").to_table(columns=list(ROW_KEY_COLUMNS)), 0
    except Exception:  # noqa: BLE001 - a partial file (killed write) or mixed schemas: file by file
        pass
    tables, moved = [], 0
    for path in paths:
        try:
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=list(ROW_KEY_COLUMNS)))
        except Exception:  # noqa: BLE001 - unreadable: moved aside, its rows are redone
            target = layout.partial_target(path)
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.mv(path, target)
            moved += 1
    if not tables:
        return None, moved
    return pa.concat_tables(tables, promote_options="permissive"), moved


# ------------------------------------------------------------------------------------------ shards

MANIFEST_ROWS_PER_PART = 200_000
PLAN_ROWS_PER_PART = 50_000
TASK_COLUMNS = ("row_id", "clip_id", "uri", "kind", "prompt", "expected_answer", "method", "sample_fps",
                "sample_frames", "max_new_tokens")


def task_schema():
    import pyarrow as pa

    s = pa.string()
    return pa.schema([("row_id", s), ("clip_id", s), ("uri", s), ("kind", s), ("prompt", s), ("expected_answer", s),
                      ("method", s), ("sample_fps", pa.float64()), ("sample_frames", pa.int64()),
                      ("max_new_tokens", pa.int64())])


def _write_parts(parts, directory: str, opts: dict[str, Any], schema=None) -> int:
    """Write the tables of ``parts`` as part-NNNNN.parquet under ``directory`` (emptied first); at least one
    part, so the directory always holds the schema. Returns the rows written."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem_for(directory, **opts)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    n, i = 0, 0
    for table in parts:
        if i and not table.num_rows:
            continue
        with fs.open(RunLayout.part(path, i), "wb") as f:
            pq.write_table(table if schema is None else table.cast(schema), f)
        n, i = n + table.num_rows, i + 1
    if i == 0 and schema is not None:
        with fs.open(RunLayout.part(path, 0), "wb") as f:
            pq.write_table(schema.empty_table(), f)
    return n


def _dataset(url: str, opts: dict[str, Any]):
    """A pyarrow dataset over a sharded directory (or one file: a manifest from before shards)."""
    import pyarrow.dataset as pads

    pa_fs, path = storage.pyarrow_filesystem_for(url, **opts)
    return pads.dataset(path, filesystem=pa_fs, format="parquet")


@dataclass
class Tasks:
    """The pending (clip, method) tasks of one attempt: Parquet shards under OUTPUT/_plan/<attempt>/ (see
    layout.py), columns `TASK_COLUMNS`. Never held whole by the driver: Ray Data reads them (read_parquet)."""

    url: str
    n: int
    storage_options: dict[str, Any] = field(default_factory=dict)
    bounds: list[str] | None = None  # a distributed plan's clip-id range bounds (its shards: part-<range>-<k>)

    def __len__(self) -> int:
        return self.n

    def read(self, columns: list[str] | None = None, row_ids=None):
        """The tasks as one table (only ``columns``; only the ``row_ids`` given, an Arrow array)."""
        import pyarrow.dataset as pads

        flt = None if row_ids is None else pads.field("row_id").isin(row_ids)
        return _dataset(self.url, self.storage_options).to_table(columns=columns, filter=flt)

    def subset(self, row_ids, attempt: str) -> "Tasks":
        """The tasks whose row_id is in ``row_ids`` (an Arrow array), written as the shards of ``attempt``."""
        import pyarrow.dataset as pads

        ds = _dataset(self.url, self.storage_options)
        url = RunLayout(_output_of(self.url)).plan_attempt(attempt)
        parts = (frag.to_table(filter=pads.field("row_id").isin(row_ids)) for frag in ds.get_fragments())
        n = _write_parts(parts, url, self.storage_options, task_schema())
        return Tasks(url, n, self.storage_options)


def _output_of(attempt_url: str) -> str:
    """The run directory of a plan attempt's URL (OUTPUT/_plan/<attempt>)."""
    return attempt_url.rstrip("/").rsplit("/", 2)[0]


def remove_plan(cfg: AnnotateConfig) -> None:
    """Remove OUTPUT/_plan (the run's task shards) once the run has ended."""
    fs, path = storage.filesystem_for(RunLayout(cfg.output).plan, **cfg.storage_options())
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@dataclass
class Manifest:
    """The run's inputs: Parquet shards under OUTPUT/_manifest/manifest.parquet/ (sorted by clip_id)."""

    url: str
    n_inputs: int
    stale: Any = None  # clip ids (Arrow array) whose bytes changed but whose rows this run does not redo
    needs_finish: bool = False  # some input's rows_version differs from its source_version (see finish_manifest)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.n_inputs

    def read(self, columns: list[str] | None = None):
        return _dataset(self.url, self.storage_options).to_table(columns=columns)


def write_manifest(table, cfg: AnnotateConfig) -> str:
    """Write the manifest ``table`` as shards: to manifest.parquet.new/ first, then swapped in for the previous
    manifest (a directory of shards, or one file from before shards). Returns its URL."""
    layout = RunLayout(cfg.output)
    opts = cfg.storage_options()
    parts = (table.slice(s, MANIFEST_ROWS_PER_PART) for s in range(0, max(1, table.num_rows), MANIFEST_ROWS_PER_PART))
    _write_parts(parts, layout.manifest_staging, opts)
    return swap_manifest(cfg)


def swap_manifest(cfg: AnnotateConfig) -> str:
    """Move the shards under manifest.parquet.new/ over the previous manifest; returns the manifest's URL."""
    layout = RunLayout(cfg.output)
    opts = cfg.storage_options()
    fs, final = storage.filesystem_for(layout.manifest, **opts)
    _, staging = storage.filesystem_for(layout.manifest_staging, **opts)
    fs.invalidate_cache(final.rsplit("/", 1)[0])
    if fs.exists(final):
        fs.rm(final, recursive=True)
    fs.invalidate_cache(staging)
    fs.makedirs(final, exist_ok=True)
    for src in sorted(fs.find(staging)):  # file by file (an object store has no directory rename)
        fs.mv(src, final + src[len(staging):])
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    fs.invalidate_cache(final.rsplit("/", 1)[0])
    return layout.manifest


def _read_manifest_versions(cfg: AnnotateConfig):
    """(clip_id, made_from) per the run's previous manifest: the version of the bytes each input's rows were made
    from (``rows_version``, else ``source_version``); None without a readable previous manifest (an unreadable
    one, a killed write, only loses change detection)."""
    opts = cfg.storage_options()
    url = RunLayout(cfg.output).manifest
    fs, path = storage.filesystem_for(url, **opts)
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    if not fs.exists(path):
        return None
    try:
        ds = _dataset(url, opts)
        cols = [c for c in ("clip_id", "rows_version", "source_version") if c in ds.schema.names]
        if "clip_id" not in cols:
            return None
        t = ds.to_table(columns=cols)
    except Exception:  # noqa: BLE001
        return None
    return manifest_versions(t)


def manifest_versions(t):
    """(clip_id, made_from) of a manifest table (`_read_manifest_versions`); None without a clip_id column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "clip_id" not in t.column_names:
        return None

    def col(name):
        if name not in t.column_names:
            return pa.nulls(t.num_rows, pa.string())
        c = t.column(name).cast(pa.string())
        return pc.if_else(pc.equal(c, ""), None, c)

    made = pc.coalesce(col("rows_version"), col("source_version"))
    return pa.table({"clip_id": t.column("clip_id").cast(pa.string()), "made_from": made})


def finish_manifest(manifest: Manifest, cfg: AnnotateConfig) -> None:
    """After a run that completed: the rows of every input but the stale ones (changed, not redone:
    ``--only-new``) now reflect its current bytes (rows_version := source_version). Rewrites the shards only
    when some input's rows_version differs (inputs changed since their rows were made); each shard is written
    to a hidden file and moved over the old one."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not manifest.needs_finish:
        return
    opts = cfg.storage_options()
    fs, root = storage.filesystem_for(manifest.url, **opts)
    fs.invalidate_cache(root)
    stale = manifest.stale
    for path in sorted(p for p in fs.find(root) if p.endswith(".parquet")):
        with fs.open(path, "rb") as f:
            t = pq.read_table(f)
        keep = (pc.is_in(t.column("clip_id"), value_set=stale) if stale is not None and len(stale)
                else pc.equal(t.column("clip_id"), None))
        rv = pc.if_else(pc.fill_null(keep, False), t.column("rows_version"), t.column("source_version"))
        t = t.set_column(t.column_names.index("rows_version"), "rows_version", rv)
        d, name = path.rsplit("/", 1)
        tmp = f"{d}/.{name}.tmp"
        with fs.open(tmp, "wb") as f:
            pq.write_table(t, f)
        fs.mv(tmp, path)


# ------------------------------------------------------------------------------------------ the plan


def plan_run(cfg: AnnotateConfig, *, distributed: bool | None = None) -> tuple[Manifest, Tasks, dict[str, Any]]:
    """Check the configuration against the run's, write run.json, the manifest (shards) and the pending tasks
    (shards under OUTPUT/_plan/tasks/); return (manifest, tasks, run info). Raises ConfigMismatch (nothing
    written) for a rerun with another configuration without ``cfg.new_config``.

    Columnar throughout: the manifest is an Arrow table, the resume an anti-join of the tasks' row ids against
    the latest row of each row_id already written (`read_done_rows`), in pyarrow's C++ kernels. On the driver
    (``--plan driver``) the driver holds the manifest's columns and the narrow task columns, never one Python
    object per entry (docs/pipeline.md, "Planning" for the bytes per entry); with ``--plan distributed``
    (`partitioned.py`) the same `plan_slice` runs in Ray tasks, one clip-id range of the corpus each, and
    the driver holds a few numbers per range. ``distributed``: `wants_distributed` already decided by the
    caller (None: decided here)."""
    import pyarrow.compute as pc

    opts = cfg.storage_options()
    info, key = run_info(cfg)
    if wants_distributed(cfg) if distributed is None else distributed:
        from .partitioned import plan_partitioned

        return plan_partitioned(cfg, info, key)

    fs, out_root = storage.filesystem_for(cfg.output, **opts)
    layout = RunLayout(out_root)
    unreadable: list[str] = []
    table = storage.build_manifest_table(cfg.input, unreadable=unreadable, **opts)
    table = table.take(pc.sort_indices(table.column("clip_id")))  # stable: listing / manifest order on ties
    if cfg.limit is not None:
        table = table.slice(0, cfg.limit)
    warn_unreadable(cfg, unreadable)
    n = table.num_rows
    existing = read_done_rows(cfg, key, info.get("legacy_key"))
    sp = plan_slice(cfg, table, key=key, legacy_key=info.get("legacy_key"), latest=existing.latest,
                    previous=_read_manifest_versions(cfg), offset=0, n_total=n)

    fs.makedirs(out_root, exist_ok=True)
    with fs.open(layout.run_json, "w") as f:
        json.dump(info, f, indent=1, default=str)
    manifest = Manifest(write_manifest(sp.table, cfg), n, sp.stale, sp.needs_finish, opts)
    attempt = RunLayout(cfg.output).plan_attempt("tasks")
    n_tasks = _write_parts(sp.task_parts(cfg), attempt, opts, task_schema())
    tasks = Tasks(attempt, n_tasks, opts)
    info.update(
        n_inputs=n, n_done_before=existing.n_ok,
        n_pending=n_tasks, n_retried_errors=sp.n_retried, n_changed_inputs=sp.n_changed,
        n_redone_changed=sp.n_redone, n_errors_kept=sp.n_kept_errors, n_partial_moved=existing.moved,
        n_other_config_rows=existing.other_config, n_unreadable_dirs=len(unreadable),
        unreadable_dirs=unreadable[:100], n_stale_inputs=len(sp.stale), plan="driver",
    )
    return manifest, tasks, info


DISTRIBUTED_PLAN_ROWS = 1_000_000  # --plan auto: a Parquet manifest with at least this many rows plans distributed
DISTRIBUTED_PLAN_BYTES = 256 << 20  # ... or a CSV / JSONL manifest of at least this many bytes


def wants_distributed(cfg: AnnotateConfig) -> bool:
    """Whether this run plans in Ray tasks (`partitioned.py`): ``--plan distributed``, or ``--plan auto`` with a
    manifest of at least `DISTRIBUTED_PLAN_ROWS` rows (Parquet: from its footer) or `DISTRIBUTED_PLAN_BYTES`
    (CSV, JSONL). A listed prefix plans on the driver (the listing is the driver's anyway)."""
    mode = getattr(cfg, "plan", "auto")
    if mode != "auto":
        return mode == "distributed"
    fmt = storage.manifest_format(cfg.input)
    if fmt is None:
        return False
    try:
        fs, path = storage.filesystem_for(cfg.input, **cfg.storage_options())
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows >= DISTRIBUTED_PLAN_ROWS
        return int(fs.size(path) or 0) >= DISTRIBUTED_PLAN_BYTES
    except Exception:  # noqa: BLE001 - the plan itself reports an unreadable manifest
        return False


def run_info(cfg: AnnotateConfig) -> tuple[dict[str, Any], str]:
    """(run.json's content for this run, the configuration key): the run's previous run.json checked against
    this configuration (ConfigMismatch unless ``--new-config``), or a new run. Writes nothing."""
    version = code_version()
    fp = fingerprint(cfg, version)
    key = config_key(fp)
    info = read_run_json(cfg.output, cfg.storage_options())
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
    return info, key


def warn_unreadable(cfg: AnnotateConfig, unreadable: list[str]) -> None:
    if unreadable:
        print(f"[meda] warning: {len(unreadable)} director{'y' if len(unreadable) == 1 else 'ies'} under "
              f"{cfg.input} could not be listed (permissions?); their files are not in this run: "
              f"{', '.join(unreadable[:5])}{' ...' if len(unreadable) > 5 else ''}", file=sys.stderr, flush=True)


@dataclass
class SlicePlan:
    """The plan of a run's inputs ranked ``offset .. offset + len(table) - 1`` (all of them on the driver; one
    clip-id range in the distributed plan): the manifest rows with ``rows_version``, the selected tasks as
    (manifest position, row id, method) columns, and the counts run.json reports."""

    table: Any
    pos: Any
    rid: Any
    method: Any
    stale: Any
    needs_finish: bool
    n_changed: int
    n_retried: int
    n_redone: int
    n_kept_errors: int

    def task_parts(self, cfg: AnnotateConfig):
        """The task tables, `PLAN_ROWS_PER_PART` rows each (built one at a time)."""
        for s in range(0, len(self.pos), PLAN_ROWS_PER_PART):
            yield _task_part(cfg, self.table, self.pos.slice(s, PLAN_ROWS_PER_PART),
                             self.rid.slice(s, PLAN_ROWS_PER_PART), self.method.slice(s, PLAN_ROWS_PER_PART))


def plan_slice(cfg: AnnotateConfig, table, *, key: str, legacy_key: str | None, latest, previous, offset: int,
               n_total: int) -> SlicePlan:
    """Plan the inputs of ``table`` (sorted by clip id, no duplicates; ranked from ``offset`` among the run's
    ``n_total``): change detection against ``previous`` (clip_id, made_from; None without a previous manifest),
    the (clip, method) tasks (the baseline sample by rank), the anti-join against ``latest`` (each row id's
    latest row; rows of other clips are ignored). Everything a row depends on is its own clip's, so the
    distributed plan gets the driver's plan range by range."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    # Inputs whose bytes changed since their rows were made: compare with what the previous manifest says
    # the rows were made from (`rows_version`; set to the current `source_version` once a run completes).
    now = table.column("source_version")
    if previous is not None and previous.num_rows:
        made_from = pc.take(previous.column("made_from"),
                            pc.index_in(table.column("clip_id"), value_set=previous.column("clip_id")))
    else:
        made_from = pa.nulls(n, pa.string())
    changed = pc.fill_null(pc.and_(pc.and_(pc.is_valid(made_from), pc.is_valid(now)), pc.not_equal(made_from, now)),
                           False)
    rows_version = pc.coalesce(made_from, now)  # stale until this run redoes the input's rows
    table = table.drop_columns([c for c in ("rows_version",) if c in table.column_names]).append_column(
        "rows_version", rows_version)

    # The (clip, method) pairs: every input with the main method, the baseline sample also with the baseline;
    # in manifest order, an input's methods side by side (decode reads it once).
    methods, n_sample_all = _methods(cfg, n_total)
    n_sample = min(n, max(0, n_sample_all - offset))
    pos = np.concatenate([np.arange(n, dtype=np.int64), np.arange(n_sample, dtype=np.int64)])
    which = np.concatenate([np.zeros(n, np.int8), np.ones(n_sample, np.int8)])
    order = np.lexsort((which, pos))
    pos, which = pos[order], which[order]
    method = pc.take(pa.array(methods, pa.string()), pa.array(which))
    clip = pc.take(table.column("clip_id"), pa.array(pos))
    rid = pc.binary_join_element_wise(clip, ":", method, "@" + key, "")
    done_ids = latest.column("row_id")
    if legacy_key == key:  # keep a pre-fingerprint run's ids (and resume it)
        legacy = pc.binary_join_element_wise(clip, ":", method, "")
        rid = pc.if_else(pc.is_in(rid, value_set=done_ids), rid, legacy)
    status = anti_join_status(rid, latest)
    has = pc.is_valid(status)
    ok = pc.fill_null(pc.equal(status, "ok"), False)
    failed = pc.and_(has, pc.invert(ok))  # a transient read error, a config error, an input repaired since, ...
    changed_t = pc.take(changed, pa.array(pos))
    if cfg.only_new:
        select = pc.invert(has)
        n_retried, n_redone, n_kept_errors = 0, 0, _count(failed)
    else:
        redo = pc.and_(ok, changed_t)  # succeeded, but on bytes that have changed since
        select = pc.or_(pc.or_(pc.invert(has), failed), redo)
        n_retried, n_redone, n_kept_errors = _count(failed), _count(redo), 0
    sel_pos = pc.filter(pa.array(pos), select)
    sel_rid = pc.filter(rid, select)
    sel_method = pc.filter(method, select)
    del clip, rid, status, has, ok, failed, changed_t, method, order, which

    has_task = np.zeros(n, bool)
    has_task[sel_pos.to_numpy()] = True
    stale = pc.and_(changed, pa.array(~has_task))
    stale_clips = pc.filter(table.column("clip_id"), stale)
    rv, sv = table.column("rows_version"), table.column("source_version")
    same = pc.or_(pc.fill_null(pc.equal(rv, sv), False), pc.and_(pc.is_null(rv), pc.is_null(sv)))
    needs_finish = _count(pc.and_(pc.invert(same), pc.invert(stale))) > 0
    return SlicePlan(table, sel_pos, sel_rid, sel_method, stale_clips, needs_finish, _count(changed), n_retried,
                     n_redone, n_kept_errors)


def anti_join_status(row_ids, latest):
    """The resume's anti-join, columnar: for each task row id, the status of its latest row already written
    (null: none, the task is new). A hash lookup of ``row_ids`` in ``latest.row_id`` (pyarrow's C++ kernel)."""
    import pyarrow.compute as pc

    return pc.take(latest.column("status"), pc.index_in(row_ids, value_set=latest.column("row_id")))


def _count(mask) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(mask).as_py() or 0)


def _methods(cfg: AnnotateConfig, n: int) -> tuple[list[str], int]:
    """([main method, baseline?], how many of the first inputs also get the baseline): `methods_for` over
    inputs 0..n-1, in two numbers (tests/test_planning.py checks they agree)."""
    with_baseline = cfg.methods_for(-1)  # index -1 is below any sample size: the baseline if it runs at all
    if len(with_baseline) == 1:
        return with_baseline, 0
    return with_baseline, n if cfg.baseline_sample < 0 else min(n, cfg.baseline_sample)


def _task_part(cfg: AnnotateConfig, table, pos, rid, method):
    """The task columns of one shard: the manifest's rows at ``pos`` with the run's defaults filled in."""
    import pyarrow as pa
    import pyarrow.compute as pc

    m = table.take(pos)
    names = m.column_names

    def given(name: str, typ):
        if name not in names:
            return pa.nulls(m.num_rows, typ)
        c = m.column(name)
        if pa.types.is_string(c.type) or pa.types.is_large_string(c.type):
            c = pc.if_else(pc.equal(c, ""), None, c)
        try:
            if pa.types.is_integer(typ) and pa.types.is_floating(c.type):
                c = pc.trunc(c)
            return c.cast(typ)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"{cfg.input}: manifest column {name!r} holds a value that is not a number: {e}") from None

    return pa.table({
        "row_id": rid,
        "clip_id": m.column("clip_id"),
        "uri": m.column("uri"),
        "kind": pc.fill_null(m.column("kind"), ""),  # unknown: decided from the bytes
        "prompt": pc.fill_null(m.column("prompt"), cfg.prompt),
        "expected_answer": _answers(m.column("answer")) if "answer" in names else pa.nulls(m.num_rows, pa.string()),
        "method": method,
        # per-input sampling from the manifest (columns `fps` / `frames`), else the run's
        "sample_fps": pc.fill_null(given("fps", pa.float64()), float(cfg.fps or 0.0)),
        "sample_frames": pc.fill_null(given("frames", pa.int64()), int(cfg.frames)),
        # per-input answer length (column `max_new_tokens`), else the run's
        "max_new_tokens": pc.fill_null(given("max_new_tokens", pa.int64()), int(cfg.max_new_tokens)),
    })


def _answers(column):
    """``str(answer)`` per row (null stays null): Arrow's cast for strings and integers, Python's str otherwise
    (Arrow spells floats and booleans differently)."""
    import pyarrow as pa

    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t) or pa.types.is_null(t):
        return column.cast(pa.string())
    return pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())
