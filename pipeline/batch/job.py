"""The annotation job: manifest -> read + decode (CPU tasks) -> engine (actor pool) -> Parquet.

    meda annotate --input s3://corpus/videos/ --output s3://runs/run42/ --model M --method meda --budget 0.2

Data flows one way::

    inputs (prefix or manifest) --build_manifest_table--> OUTPUT/_manifest/manifest.parquet/ (shards)
      -> pending (clip, method) tasks (rows already in OUTPUT/rows are skipped: resume; plan.py, columnar)
         as Parquet shards OUTPUT/_plan/tasks/ -> read_parquet, one block per batch
      -> Ray Data: map_batches(decode_media, num_cpus=1)              CPU tasks, one per block
      -> map_batches(Preprocess, ActorPoolStrategy, num_cpus=c)        CPU actors: chat template, tokens,
                                                                       resize + patchify (stages.py)
      -> map_batches(Annotator, ActorPoolStrategy, num_gpus=g)         one model + engine per actor;
                                                                       --batches-in-flight batches per actor
                                                                       stream into its engine loops
      -> write_parquet(OUTPUT/rows)                                    chunked files, local or s3
      -> OUTPUT/summary.json                                           counts, throughput, KV savings

Every failure that belongs to one input (unreadable object, corrupt media, a prompt that does not
fit the context) becomes a row with ``status="error"`` and a reason; the rest of its batch is
unaffected. A batch that kills its actor is retried ``--max-task-retries`` times (Ray Data's default is
forever); the batches Ray gave up on get one more round in a fresh dataset at the end of the run (so a
lost node costs no rows), and what is still lost then becomes ``error_stage="worker"`` rows (the whole batch: Ray cannot say which
input did it). Reruns (see plan.py): same configuration = resume + retry error rows; another one is
refused unless ``--new-config``. Decode, preprocessing and inference never fuse into one stage: the
actor stages' remote args (their retry policy) differ from the decode tasks', Ray Data fuses only equal
ones and never an actor stage into another (tests/test_job_scheduler.py checks the stage names).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
import warnings
from dataclasses import asdict
from typing import Any

from .. import storage
from .config import AnnotateConfig
from .layout import RunLayout
from .plan import Tasks, finish_manifest, plan_run, read_done_rows, remove_plan, wants_distributed
from .progress import Progress
from .results import format_summary, summarize
from .stages import Annotator, Preprocess, decode_media


def _init_ray(cfg: AnnotateConfig):
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"OMP_NUM_THREADS": str(max(1, int(cfg.cpus_per_actor)))}}
    if address:  # a cluster (e.g. inside `ray job submit`): the job's own runtime_env applies
        ray.init(address=address, log_to_driver=False)
    else:
        # A local instance advertises at least 4 CPUs: the actor pool holds its CPUs for the whole
        # run and would otherwise starve the decode and write tasks on a small machine.
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, runtime_env=env,
                 log_to_driver=False)
    return ray


def _actor_concurrency(cfg: AnnotateConfig) -> dict[str, Any]:
    """Continuous batching: several Ray batches run on one actor at once (threads), each streaming its
    requests into the actor's engine loops, so the engine never drains between batches."""
    if cfg.batching != "continuous" or cfg.engine == "fake" or cfg.batches_in_flight <= 1:
        return {}
    return {"max_concurrent_calls_per_actor": cfg.batches_in_flight, "enable_true_multi_threading": True}


def run(cfg: AnnotateConfig) -> dict[str, Any]:
    """Run (or resume) the job; returns the summary (also written to OUTPUT/summary.json)."""
    from .preflight import preflight

    cfg = preflight(cfg)  # model / input / output checked (PreflightError) before anything is written
    t_start = time.time()
    distributed = wants_distributed(cfg)  # reads a Parquet manifest's footer: once
    if distributed:
        _init_ray(cfg)  # the plan's own tasks run on the cluster (partitioned.py)
    manifest, tasks, info = plan_run(cfg, distributed=distributed)
    print(f"[meda] run {info['run_id']}: {info['n_inputs']} inputs, {info['n_done_before']} rows already written, "
          f"{info['n_pending']} to do -> {cfg.output}", file=sys.stderr, flush=True)
    _print_rerun_notes(info)
    t_plan = time.time()
    stats_text = ""
    progress = None
    if tasks:
        _init_ray(cfg)
        progress = Progress(len(tasks), interval_s=PROGRESS_INTERVAL_S) if cfg.progress else None
    try:
        if tasks:
            stats_text = _execute(cfg, info, tasks, progress)
        fs, out_root = storage.filesystem_for(cfg.output, **cfg.storage_options())
        # The listing of OUTPUT/rows that s3fs cached while planning predates the rows Ray's workers just
        # wrote (reading through it fails with FileNotFoundError): forget it before reading the rows back.
        fs.invalidate_cache()
        if tasks:
            # Blocks Ray gave up on (their actor died max_task_retries times: a lost node, an OOM kill, an
            # input that crashes its worker) get one more round in a fresh dataset: a node loss must not
            # cost rows.
            lost = _lost_tasks(cfg, info, tasks, t_plan)
            if lost:
                print(f"[meda] {len(lost)} row(s) lost with their batch (worker died): one more round for them",
                      file=sys.stderr, flush=True)
                info["n_lost_retried"] = len(lost)
                _execute(cfg, info, lost, progress)
                fs.invalidate_cache()
            info["n_worker_errors"] = _rows_for_lost_blocks(cfg, info, tasks, t_plan)
    finally:
        if progress is not None:
            progress.close()
    finish_manifest(manifest, cfg)
    remove_plan(cfg)  # the task shards of this run's attempts (OUTPUT/_plan) are spent
    summary = summarize(cfg, info, time.time() - t_start, stats_text)
    with fs.open(RunLayout(out_root).summary_json, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(format_summary(summary))
    return summary


IO_CPUS = 0.25  # Ray's CPUs per plan-shard read task and per row-file write task (see _execute)
PROGRESS_INTERVAL_S = float(os.environ.get("MEDA_PROGRESS_INTERVAL_S", "10"))  # the progress line's period


def task_dataset(cfg: AnnotateConfig, tasks: Tasks):
    """The Ray Dataset of ``tasks``: one block per --batch-size batch, read by Ray Data's workers."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # The plan's task shards (OUTPUT/_plan/<attempt>/), read by Ray Data's workers, never shipped from the
    # driver. One block per --batch-size batch: each read task slices its shard into blocks of at most one batch
    # (Ray Data's read split factor, zero-copy slices inside the read task), so a decode task handles one
    # batch and a failed block loses one batch, as with one block per batch from the driver. This is the
    # Parquet datasource of read tasks (use_datasource_v2 off): Ray 2.60's newer reader ignores the split
    # (one block per shard, a whole shard to one model actor) and its file listing is a task of one full
    # CPU that, after a node loss, could find no node with a whole CPU free beside the actor pools: the
    # job stalled (tests/test_job_failures.py). A repartition(target_num_rows_per_block=...) after it was
    # another 1-CPU task per shard.
    ctx.use_datasource_v2 = False
    pa_fs, plan_path = storage.pyarrow_filesystem_for(tasks.url, **cfg.storage_options())
    ds = ray.data.read_parquet(plan_path, filesystem=pa_fs, file_extensions=["parquet"], num_cpus=IO_CPUS,
                               override_num_blocks=max(1, -(-len(tasks) // cfg.batch_size)))
    return ds


def _execute(cfg: AnnotateConfig, info: dict[str, Any], tasks: Tasks, progress: "Progress | None" = None) -> str:
    """Run ``tasks`` through decode -> preprocess (unless --preprocess in-actor) -> model actors ->
    Parquet; returns Ray Data's stats."""
    ray = _init_ray(cfg)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # The job prints its own progress line against the planned total (progress.py); Ray Data's bars
    # would read "Total Progress: 0/?" until its first blocks are written.
    ctx.enable_progress_bars = False
    ctx.max_errored_blocks = -1  # a failed block loses only its own rows (written below as error rows)
    ds = task_dataset(cfg, tasks)
    ds = ds.map_batches(
        decode_media,
        fn_kwargs=dict(storage_options=cfg.storage_options(), max_frames=cfg.max_frames,
                       max_pixels=cfg.max_pixels_per_frame,
                       timeout_s=cfg.decode_timeout_s),
        batch_size=cfg.batch_size, num_cpus=1, batch_format="numpy",
    )
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")  # max_task_retries below
    if cfg.preprocess == "cpu-stage":
        # Tokenise + resize/patchify in a CPU actor pool of its own (tokenizer loaded once per worker), so
        # the model actor gets prepared arrays. Its retry policy (as the model actor's, below) also keeps
        # Ray Data from fusing the decode tasks into it: decode keeps its own task parallelism.
        ds = ds.map_batches(
            Preprocess,
            fn_constructor_kwargs=dict(cfg=asdict(cfg)),
            compute=ray.data.ActorPoolStrategy(min_size=cfg.preprocess_workers,
                                               max_size=cfg.max_preprocess_workers or cfg.preprocess_workers),
            num_cpus=cfg.cpus_per_preprocess_worker, batch_size=cfg.batch_size, batch_format="numpy",
            max_restarts=-1, max_task_retries=max(0, int(cfg.max_task_retries)),
        )
    ds = ds.map_batches(
        Annotator,
        fn_constructor_kwargs=dict(cfg=asdict(cfg), run_id=info["run_id"], version=info["code_version"],
                                   progress=None if progress is None else progress.handle),
        compute=ray.data.ActorPoolStrategy(min_size=cfg.num_actors, max_size=cfg.max_actors or cfg.num_actors,
                                           **_actor_concurrency(cfg)),
        num_gpus=cfg.gpus_per_actor, num_cpus=cfg.cpus_per_actor, batch_size=cfg.batch_size,
        batch_format="numpy",
        # Ray Data's actor default is max_restarts=-1 AND max_task_retries=-1: an input that kills its
        # worker (segfault, OOM kill) would be retried forever. Actors may still be replaced (the next
        # batch deserves a fresh one), but a batch is retried at most max_task_retries times; then its
        # block fails, is skipped (max_errored_blocks below) and its rows become "worker" error rows.
        max_restarts=-1, max_task_retries=max(0, int(cfg.max_task_retries)),
    )
    rows_url = RunLayout(cfg.output).rows
    pa_fs, rows_path = storage.pyarrow_filesystem_for(rows_url, **cfg.storage_options())
    # Writing is I/O: a quarter of a CPU per write task, so that on a small node whose CPUs the decode tasks
    # and the actor pools hold, the finished rows are still written as they come (with Ray Data's default of
    # one CPU, the writes waited for a free CPU: no row file for minutes, benchmarks/planning.py).
    ds.write_parquet(rows_path, filesystem=pa_fs, ray_remote_args={"num_cpus": IO_CPUS})
    return ds.stats()


def _lost_row_ids(cfg: AnnotateConfig, info: dict[str, Any], tasks: Tasks, t_plan: float):
    """The row ids (an Arrow array) of ``tasks`` without a row written since planning: columnar, the tasks'
    row_id column against the row_id/created_at columns of the rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    since = dt.datetime.fromtimestamp(t_plan, dt.timezone.utc) - dt.timedelta(seconds=1)
    if tasks.bounds is not None:  # a distributed plan: the same anti-join, range by range in Ray tasks
        from .partitioned import lost_row_ids

        return lost_row_ids(cfg, info, tasks, int(since.timestamp() * 1e6))
    latest = read_done_rows(cfg, info["config_key"], info.get("legacy_key")).latest
    created = latest.column("created_at")  # as epoch microseconds (files may store ms, us or naive UTC)
    created = created.cast(pa.timestamp("us", tz=getattr(created.type, "tz", None))).cast(pa.int64())
    fresh = pc.fill_null(pc.greater_equal(created, int(since.timestamp() * 1e6)), False)
    written = pc.filter(latest.column("row_id"), fresh)
    ids = tasks.read(["row_id"]).column("row_id")
    return pc.filter(ids, pc.invert(pc.is_in(ids, value_set=written))).combine_chunks()


def _lost_tasks(cfg: AnnotateConfig, info: dict[str, Any], tasks: Tasks, t_plan: float) -> Tasks | None:
    """The tasks of this run without a row written since planning, as the shards of a new attempt."""
    lost = _lost_row_ids(cfg, info, tasks, t_plan)
    return tasks.subset(lost, "lost-1") if len(lost) else None


def _print_rerun_notes(info: dict[str, Any]) -> None:
    notes = []
    if info.get("n_retried_errors"):
        notes.append(f"retrying {info['n_retried_errors']} error row(s)")
    if info.get("n_redone_changed"):
        notes.append(f"redoing {info['n_redone_changed']} row(s) of {info['n_changed_inputs']} input(s) whose "
                     f"bytes changed")
    if info.get("n_errors_kept"):
        notes.append(f"keeping {info['n_errors_kept']} error row(s) (--only-new)")
    if info.get("n_partial_moved"):
        notes.append(f"moved {info['n_partial_moved']} unreadable row file(s) to _partial/")
    if info.get("n_other_config_rows"):
        notes.append(f"{info['n_other_config_rows']} row(s) of other configurations kept apart")
    if notes:
        print(f"[meda] {'; '.join(notes)}", file=sys.stderr, flush=True)


def _rows_for_lost_blocks(cfg: AnnotateConfig, info: dict[str, Any], tasks: Tasks, t_plan: float) -> int:
    """Error rows (stage "worker") for the pending tasks that got no row in this run: their block failed in
    Ray after its retries (a worker killed by the input, a lost node). Built columnar from the lost tasks'
    columns. Returns how many."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ..schema import SCHEMA

    lost_ids = _lost_row_ids(cfg, info, tasks, t_plan)
    if not len(lost_ids):
        return 0
    lost = tasks.read(["row_id", "clip_id", "uri", "kind", "prompt", "expected_answer", "method"], row_ids=lost_ids)
    n = lost.num_rows
    now = dt.datetime.now(dt.timezone.utc)
    reason = (f"no row written: its batch failed in Ray after {cfg.max_task_retries} retries (the worker died, "
              f"e.g. crashed or killed for memory, on this batch); a rerun retries it")
    given = {c: lost.column(c) for c in lost.column_names}
    given["kind"] = pc.if_else(pc.equal(given["kind"], ""), None, given["kind"])
    const = {"model": cfg.model, "status": "error", "error_stage": "worker", "error": reason,
             "run_id": info["run_id"], "code_version": info["code_version"], "created_at": now}
    cols = [given[f.name].cast(f.type) if f.name in given
            else pc.cast(pa.repeat(pa.scalar(const[f.name]), n), f.type, safe=False) if f.name in const
            else pa.nulls(n, f.type) for f in SCHEMA]
    table = pa.Table.from_arrays(cols, schema=SCHEMA)
    fs, out_root = storage.filesystem_for(cfg.output, **cfg.storage_options())
    layout = RunLayout(out_root)
    fs.makedirs(layout.rows, exist_ok=True)  # every block may have been lost: nothing else created it
    path = layout.worker_errors(f"{now.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    fs.invalidate_cache()
    print(f"[meda] {n} row(s) lost with their batch (worker died): written as error rows", file=sys.stderr,
          flush=True)
    return n
