"""The annotation job: manifest -> read + decode (CPU tasks) -> engine (actor pool) -> Parquet.

    meda annotate --input s3://corpus/videos/ --output s3://runs/run42/ --model M --method meda --budget 0.2

Data flows one way::

    inputs (prefix or manifest) --build_manifest--> OUTPUT/_manifest/manifest.parquet
      -> pending (clip, method) tasks (rows already in OUTPUT/rows are skipped: resume)
      -> Ray Data: map_batches(decode_media, num_cpus=1)              CPU tasks, one per block
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
refused unless ``--new-config``. Decode and inference never fuse into one stage: the actor stage's
remote args (its retry policy) differ from the decode tasks', and Ray Data fuses only equal ones
(tests/test_job_scheduler.py checks the stage names).
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
from .plan import finish_manifest, plan_run, read_done_rows
from .results import format_summary, summarize
from .stages import Annotator, decode_media


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
    manifest, tasks, info = plan_run(cfg)
    print(f"[meda] run {info['run_id']}: {info['n_inputs']} inputs, {info['n_done_before']} rows already written, "
          f"{info['n_pending']} to do -> {cfg.output}", file=sys.stderr, flush=True)
    _print_rerun_notes(info)
    t_plan = time.time()
    stats_text = ""
    if tasks:
        stats_text = _execute(cfg, info, tasks)
    fs, out_root = storage.filesystem_for(cfg.output, **cfg.storage_options())
    # The listing of OUTPUT/rows that s3fs cached while planning predates the rows Ray's workers just wrote
    # (reading through it fails with FileNotFoundError): forget it before reading the rows back.
    fs.invalidate_cache()
    if tasks:
        # Blocks Ray gave up on (their actor died max_task_retries times: a lost node, an OOM kill, an input
        # that crashes its worker) get one more round in a fresh dataset: a node loss must not cost rows.
        lost = _lost_tasks(cfg, info, tasks, t_plan)
        if lost:
            print(f"[meda] {len(lost)} row(s) lost with their batch (worker died): one more round for them",
                  file=sys.stderr, flush=True)
            info["n_lost_retried"] = len(lost)
            _execute(cfg, info, lost)
            fs.invalidate_cache()
        info["n_worker_errors"] = _rows_for_lost_blocks(cfg, info, tasks, t_plan)
    finish_manifest(manifest, cfg, info.get("stale_clips", ()))
    summary = summarize(cfg, info, time.time() - t_start, stats_text)
    with fs.open(RunLayout(out_root).summary_json, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(format_summary(summary))
    return summary


def _execute(cfg: AnnotateConfig, info: dict[str, Any], tasks: list[dict[str, Any]]) -> str:
    """Run ``tasks`` through decode -> model actors -> Parquet; returns Ray Data's stats."""
    ray = _init_ray(cfg)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    ctx.max_errored_blocks = -1  # a failed block loses only its own rows (written below as error rows)
    ds = ray.data.from_items(tasks, override_num_blocks=max(1, -(-len(tasks) // cfg.batch_size)))
    ds = ds.map_batches(
        decode_media,
        fn_kwargs=dict(storage_options=cfg.storage_options(), max_frames=cfg.max_frames,
                       max_pixels=cfg.max_pixels_per_frame,
                       timeout_s=cfg.decode_timeout_s),
        batch_size=cfg.batch_size, num_cpus=1, batch_format="numpy",
    )
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")  # max_task_retries below
    ds = ds.map_batches(
        Annotator,
        fn_constructor_kwargs=dict(cfg=asdict(cfg), run_id=info["run_id"], version=info["code_version"]),
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
    ds.write_parquet(rows_path, filesystem=pa_fs)
    return ds.stats()


def _lost_tasks(cfg: AnnotateConfig, info: dict[str, Any], tasks: list[dict[str, Any]], t_plan: float):
    """The tasks of this run without a row written since planning."""
    since = dt.datetime.fromtimestamp(t_plan, dt.timezone.utc) - dt.timedelta(seconds=1)
    existing = read_done_rows(cfg, info["config_key"], info.get("legacy_key"))
    return [t for t in tasks if existing.created.get(t["row_id"]) is None or existing.created[t["row_id"]] < since]


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


def _rows_for_lost_blocks(cfg: AnnotateConfig, info: dict[str, Any], tasks: list[dict[str, Any]],
                          t_plan: float) -> int:
    """Error rows (stage "worker") for the pending tasks that got no row in this run: their block failed in
    Ray after its retries (a worker killed by the input, a lost node). Returns how many."""
    import datetime as dt

    import pyarrow.parquet as pq

    from ..schema import empty_row, to_table

    lost = _lost_tasks(cfg, info, tasks, t_plan)
    if not lost:
        return 0
    now = dt.datetime.now(dt.timezone.utc)
    reason = (f"no row written: its batch failed in Ray after {cfg.max_task_retries} retries (the worker died, "
              f"e.g. crashed or killed for memory, on this batch); a rerun retries it")
    rows = [empty_row(row_id=t["row_id"], clip_id=t["clip_id"], uri=t["uri"], kind=t["kind"] or None,
                      prompt=t["prompt"], expected_answer=t["expected_answer"], method=t["method"], model=cfg.model,
                      status="error", error_stage="worker", error=reason, run_id=info["run_id"],
                      code_version=info["code_version"], created_at=now) for t in lost]
    fs, out_root = storage.filesystem_for(cfg.output, **cfg.storage_options())
    rows_dir = RunLayout(out_root).rows
    fs.makedirs(rows_dir, exist_ok=True)  # every block may have been lost: nothing else created it
    path = f"{rows_dir}/worker-errors-{now.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.parquet"
    with fs.open(path, "wb") as f:
        pq.write_table(to_table(rows), f)
    fs.invalidate_cache()
    print(f"[meda] {len(lost)} row(s) lost with their batch (worker died): written as error rows", file=sys.stderr,
          flush=True)
    return len(lost)
