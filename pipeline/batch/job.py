"""The annotation job: manifest -> read + decode (CPU tasks) -> engine (actor pool) -> Parquet.

    meda annotate --input s3://corpus/videos/ --output s3://runs/run42/ --model M --method meda --budget 0.2

Data flows one way::

    inputs (prefix or manifest) --build_manifest--> OUTPUT/_manifest/manifest.parquet
      -> pending (clip, method) tasks (rows already in OUTPUT/rows are skipped: resume)
      -> Ray Data: map_batches(decode_media, num_cpus=1)              CPU tasks, one per block
      -> map_batches(Annotator, ActorPoolStrategy, num_gpus=g)         one model + engine per actor
      -> write_parquet(OUTPUT/rows)                                    chunked files, local or s3
      -> OUTPUT/summary.json                                           counts, throughput, KV savings

Every failure that belongs to one input (unreadable object, corrupt media, a prompt that does not
fit the context) becomes a row with ``status="error"`` and a reason; the rest of its batch is
unaffected. Decode and inference have different resources, so Ray never fuses them into one stage.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any

from .. import storage
from .config import AnnotateConfig
from .layout import RunLayout
from .plan import plan_run
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


def run(cfg: AnnotateConfig) -> dict[str, Any]:
    """Run (or resume) the job; returns the summary (also written to OUTPUT/summary.json)."""
    from .preflight import preflight

    cfg = preflight(cfg)  # model / input / output checked (PreflightError) before anything is written
    t_start = time.time()
    manifest, tasks, info = plan_run(cfg)
    print(f"[meda] run {info['run_id']}: {info['n_inputs']} inputs, {info['n_done_before']} rows already written, "
          f"{info['n_pending']} to do -> {cfg.output}", file=sys.stderr, flush=True)
    stats_text = ""
    if tasks:
        ray = _init_ray(cfg)
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = cfg.progress
        ds = ray.data.from_items(tasks, override_num_blocks=max(1, -(-len(tasks) // cfg.batch_size)))
        ds = ds.map_batches(
            decode_media,
            fn_kwargs=dict(storage_options=cfg.storage_options(), max_frames=cfg.max_frames,
                           max_pixels=cfg.max_pixels_per_frame,
                           timeout_s=cfg.decode_timeout_s),
            batch_size=cfg.batch_size, num_cpus=1, batch_format="numpy",
        )
        ds = ds.map_batches(
            Annotator,
            fn_constructor_kwargs=dict(cfg=asdict(cfg), run_id=info["run_id"], version=info["code_version"]),
            compute=ray.data.ActorPoolStrategy(min_size=cfg.num_actors, max_size=cfg.max_actors or cfg.num_actors),
            num_gpus=cfg.gpus_per_actor, num_cpus=cfg.cpus_per_actor, batch_size=cfg.batch_size,
            batch_format="numpy",
        )
        rows_url = RunLayout(cfg.output).rows
        pa_fs, rows_path = storage.pyarrow_filesystem_for(rows_url, **cfg.storage_options())
        ds.write_parquet(rows_path, filesystem=pa_fs)
        stats_text = ds.stats()
    summary = summarize(cfg, info, time.time() - t_start, stats_text)
    fs, out_root = storage.filesystem_for(cfg.output, **cfg.storage_options())
    with fs.open(RunLayout(out_root).summary_json, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(format_summary(summary))
    return summary
