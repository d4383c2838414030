"""The annotation job's configuration and its command-line flags.

Import-light on purpose (``meda --help`` must answer at once): nothing here imports numpy, torch,
Ray or pyarrow at module import time.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_INPUT = str(REPO_ROOT / "samples" / "needle-corpus" / "manifest.jsonl")
DEFAULT_MODEL = str(REPO_ROOT / "models" / "needle-s0")
DEFAULT_OUTPUT = "out/annotate"
DEFAULT_PROMPT = "Describe the video in detail."
DESCRIPTION = ("The annotation job: manifest -> read + decode (CPU tasks) -> tokenise + resize/patchify (CPU "
               "actor pool) -> engine (actor pool) -> Parquet.")

DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # what Engine.from_pretrained takes
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
ENGINES = ("real", "fake")
BATCHING = ("continuous", "static")
PREPROCESS = ("cpu-stage", "in-actor")
PLANS = ("auto", "driver", "distributed")
# The flag of each AnnotateConfig field (and CompressionConfig field), so a message names what to change.
FLAGS = {
    "decode_timeout_s": "--decode-timeout", "progress": "--no-progress", "temperature": "--temperature-entropy",
}


def flag(name: str) -> str:
    """The command-line flag of an AnnotateConfig / CompressionConfig field."""
    return FLAGS.get(name) or "--" + name.replace("_", "-")


@dataclass
class AnnotateConfig:
    """One run's settings. Validated on construction (CLI, Python, and again in each actor): a bad value
    raises `meda_engine.ConfigError` whose message starts with the flag to change (``--frames: ...``).

    ``method`` and ``budget`` are the main method's; ``compression`` holds every other `CompressionConfig`
    field (``budget_tokens``, ``window``, ...), normalised to the full validated set, so that
    ``CompressionConfig(method=method, budget=budget, **compression)`` (see `compression_for`) is the
    config `meda generate` / `meda serve` would build from the same flags.
    """

    input: str = DEFAULT_INPUT
    output: str = DEFAULT_OUTPUT
    model: str = DEFAULT_MODEL
    prompt: str = DEFAULT_PROMPT  # used where the manifest gives none
    method: str = "meda"
    budget: float | int = 0.2
    compression: dict[str, Any] = field(default_factory=dict)  # other CompressionConfig fields
    baseline: str = "full"  # a second method run on a sample, for side-by-side ratios ("none": off)
    baseline_sample: int = 32  # inputs (lowest clip_ids) that also get the baseline method; -1 = all
    frames: int = 16
    fps: float | None = None
    max_frames: int = 256
    max_pixels_per_frame: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 8  # inputs per Ray Data batch handed to a model actor
    # The model actor's engine (meda_engine.scheduler): "continuous" streams every batch's requests into
    # one running batch per method, at most max_num_seqs rows decoding together under the KV cap;
    # "static" runs each Ray batch as one padded engine call (`Engine.generate_static`: finished rows
    # keep decoding padding until the batch's slowest row ends; the next batch starts after). The
    # job's batching before the scheduler, kept as the baseline.
    batching: str = "continuous"
    max_num_seqs: int = 16  # most rows decoding together per method loop
    max_num_batched_tokens: int = 8192  # most prompt tokens (rows x longest) prefilled together in one step
    kv_cache_memory_bytes: int | None = None  # the actor's KV cap (default: half the device memory free)
    kv_cache_memory_fraction: float | None = None  # ... or as a fraction of the device's memory
    batches_in_flight: int = 4  # Ray batches one actor works on at once (continuous batching)
    num_actors: int = 1
    max_actors: int | None = None  # autoscale the actor pool up to this many
    # Where the CPU half of preparation runs (chat template, tokenisation, resize + patchify): "cpu-stage",
    # a Ray Data actor pool of its own between decode and the model actors (preprocess_workers, autoscaling
    # up to max_preprocess_workers), or "in-actor", inside the model actor's process (the old path).
    preprocess: str = "cpu-stage"
    preprocess_workers: int = 1
    max_preprocess_workers: int | None = None
    cpus_per_preprocess_worker: float = 1.0
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    decode_timeout_s: float = 120.0
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "real"  # "fake": a deterministic stand-in, for dry runs of the pipeline itself
    limit: int | None = None
    run_id: str | None = None
    ray_address: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    progress: bool = True
    # Reruns (pipeline/batch/plan.py): another configuration is refused unless new_config; error rows are
    # retried unless only_new; the code version is part of the fingerprint only if asked.
    new_config: bool = False
    only_new: bool = False
    fingerprint_code_version: bool = False
    # Where the plan runs (pipeline/batch/plan.py): "driver", "distributed" (Ray tasks, one clip-id range each:
    # partitioned.py), or "auto" (distributed for a manifest of at least 1M rows / 256 MB)
    plan: str = "auto"
    max_task_retries: int = 2  # retries of a batch whose actor died (then its rows become error rows)

    def __post_init__(self) -> None:
        _validate(self)

    def compression_for(self, method: str):
        """The validated `CompressionConfig` of ``method``: the run's settings for the main method, the
        defaults for the baseline."""
        from meda_engine.config import CompressionConfig

        if method == self.method:
            return CompressionConfig(method=method, budget=self.budget, **self.compression)
        return CompressionConfig(method=method)

    def storage_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        if self.region:
            opts["region"] = self.region
        if self.anon:
            opts["anon"] = True
        return opts

    def methods_for(self, index: int) -> list[str]:
        methods = [self.method]
        if self.baseline != "none" and self.baseline != self.method:
            if self.baseline_sample < 0 or index < self.baseline_sample:
                methods.append(self.baseline)
        return methods


def code_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from meda_engine import __version__

    return __version__



def _validate(cfg: AnnotateConfig) -> None:
    """Check and normalise every field of ``cfg`` in place; raise ConfigError naming the flag."""
    from meda_engine.config import METHODS, CompressionConfig, ConfigError

    def fail(name: str, message: str):
        raise ConfigError(f"{flag(name)}: {message}")

    def whole(name: str, minimum: int, *, optional: bool = False, note: str = "") -> None:
        value = getattr(cfg, name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            fail(name, f"must be a whole number >= {minimum}{note}, got {value!r}")
        if value < minimum:
            fail(name, f"must be >= {minimum}{note}, got {value}")

    def real(name: str, *, minimum: float | None = None, positive: bool = False, optional: bool = False) -> None:
        value = getattr(cfg, name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(name, f"must be a finite number, got {value!r}")
        if positive and value <= 0:
            fail(name, f"must be > 0, got {value}")
        if minimum is not None and value < minimum:
            fail(name, f"must be >= {minimum:g}, got {value}")
        setattr(cfg, name, float(value))

    def text(name: str, *, optional: bool = False) -> None:
        value = getattr(cfg, name)
        if value is None and optional:
            return
        if not isinstance(value, str) or not value.strip():
            fail(name, f"must be a non-empty string, got {value!r}")

    for name in ("input", "output", "model", "prompt"):
        text(name)
    for name in ("run_id", "ray_address", "endpoint_url", "region"):
        text(name, optional=True)
    if cfg.run_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.run_id):
        fail("run_id", f"use letters, digits, '.', '_' and '-' only, got {cfg.run_id!r}")

    # The compression settings: one CompressionConfig, as `meda generate` / `meda serve` build it.
    if not isinstance(cfg.compression, dict):
        raise ConfigError(f"compression must be a mapping of CompressionConfig fields, got {cfg.compression!r}")
    reserved = sorted({"method", "budget"} & set(cfg.compression))
    if reserved:
        raise ConfigError(f"compression must not hold {reserved}: those are AnnotateConfig.method / .budget "
                          f"(--method / --budget)")
    try:
        comp = CompressionConfig.from_dict({"method": cfg.method, "budget": cfg.budget, **cfg.compression})
    except ConfigError as e:
        raise ConfigError(_flagged(str(e))) from None
    cfg.budget = comp.budget
    cfg.compression = {k: v for k, v in comp.to_dict().items() if k not in ("method", "budget")}
    if not isinstance(cfg.baseline, str) or (cfg.baseline != "none" and cfg.baseline not in METHODS):
        fail("baseline", f"unknown method {cfg.baseline!r}; choose one of {', '.join(METHODS)}, or 'none'")

    whole("baseline_sample", -1, note=" (-1 = every input)")
    whole("frames", 1)
    real("fps", positive=True, optional=True)
    whole("max_frames", 1)
    whole("max_pixels_per_frame", 1, optional=True)
    whole("max_new_tokens", 1)
    whole("batch_size", 1)
    if cfg.batching not in BATCHING:
        fail("batching", f"must be one of {', '.join(BATCHING)}, got {cfg.batching!r}")
    whole("max_num_seqs", 1)
    whole("max_num_batched_tokens", 1)
    whole("batches_in_flight", 1)
    whole("kv_cache_memory_bytes", 1, optional=True)
    real("kv_cache_memory_fraction", positive=True, optional=True)
    if cfg.kv_cache_memory_fraction is not None and cfg.kv_cache_memory_fraction > 1:
        fail("kv_cache_memory_fraction", f"must be in (0, 1], got {cfg.kv_cache_memory_fraction}")
    if cfg.kv_cache_memory_bytes is not None and cfg.kv_cache_memory_fraction is not None:
        fail("kv_cache_memory_fraction", "give --kv-cache-memory-bytes or --kv-cache-memory-fraction, not both")
    whole("num_actors", 1)
    whole("max_actors", 1, optional=True)
    if cfg.max_actors is not None and cfg.max_actors < cfg.num_actors:
        fail("max_actors", f"must be >= --num-actors ({cfg.num_actors}), got {cfg.max_actors}")
    if hasattr(cfg, "plan") and cfg.plan not in PLANS:
        fail("plan", f"must be one of {', '.join(PLANS)}, got {cfg.plan!r}")
    if cfg.preprocess not in PREPROCESS:
        fail("preprocess", f"must be one of {', '.join(PREPROCESS)}, got {cfg.preprocess!r}")
    whole("preprocess_workers", 1)
    whole("max_preprocess_workers", 1, optional=True)
    if cfg.max_preprocess_workers is not None and cfg.max_preprocess_workers < cfg.preprocess_workers:
        fail("max_preprocess_workers", f"must be >= --preprocess-workers ({cfg.preprocess_workers}), "
                                       f"got {cfg.max_preprocess_workers}")
    real("cpus_per_preprocess_worker", minimum=0)
    real("gpus_per_actor", minimum=0)
    real("cpus_per_actor", minimum=0)
    real("decode_timeout_s", positive=True)
    whole("limit", 1, optional=True)
    if not isinstance(cfg.device, str) or not DEVICE_PATTERN.fullmatch(cfg.device):
        fail("device", f"must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}")
    if cfg.dtype not in DTYPES:
        fail("dtype", f"must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.engine not in ENGINES:
        fail("engine", f"must be one of {', '.join(ENGINES)}, got {cfg.engine!r}")
    for name in ("anon", "progress", "new_config", "only_new", "fingerprint_code_version"):
        if hasattr(cfg, name) and not isinstance(getattr(cfg, name), bool):
            fail(name, f"must be true or false, got {getattr(cfg, name)!r}")
    if hasattr(cfg, "max_task_retries"):
        whole("max_task_retries", 0)


def _flagged(message: str) -> str:
    """A CompressionConfig error message, prefixed with the flag of the field it names."""
    from meda_engine.config import CompressionConfig

    if message.startswith("unknown compression method"):
        return f"--method: {message}"
    first = message.split(" ", 1)[0]
    if first in CompressionConfig.__dataclass_fields__:
        return f"{flag(first)}: {message}"
    return message


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says it (or it is None: unset)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def add_annotate_args(p: argparse.ArgumentParser) -> None:
    from meda_engine.cli_args import add_compression_args
    from meda_engine.config import METHODS

    d = AnnotateConfig()
    p.add_argument("--input", default=d.input, help="prefix of media files (local, s3://, any fsspec URL) or a "
                   "manifest (.parquet/.csv/.jsonl with uri and optional prompt)")
    p.add_argument("--output", default=d.output, help="run directory (local or s3://); rerun to resume")
    p.add_argument("--model", default=d.model, help="local checkpoint directory (with config.json) or .gguf file, "
                   "s3:// prefix, or hub id owner/name")
    p.add_argument("--prompt", default=d.prompt, help="prompt for inputs whose manifest row has none")
    p.add_argument("--baseline", default=d.baseline, choices=(*METHODS, "none"), metavar="METHOD",
                   help="second method run on a sample for side-by-side ratios, or 'none'")
    p.add_argument("--baseline-sample", type=int, default=d.baseline_sample,
                   help="how many inputs also run the baseline (-1 = all)")
    p.add_argument("--frames", type=int, default=d.frames, help="frames sampled uniformly per video (>= 1)")
    p.add_argument("--fps", type=float, default=None, help="sample at this rate instead (capped by --max-frames)")
    p.add_argument("--max-frames", type=int, default=d.max_frames, help="most frames decoded per video")
    p.add_argument("--max-pixels-per-frame", type=int, default=None,
                   help="downscale frames above this many pixels (default: the model's processor setting)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens generated per input")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="inputs per Ray Data batch sent to a model actor")
    p.add_argument("--batching", default=d.batching, choices=BATCHING,
                   help="continuous: requests join the actor's running batch as they arrive (max concurrent rows "
                        "--max-num-seqs, under the KV cap); static: one padded engine call per Ray batch, the pre-scheduler baseline")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="most rows decoding together in a model actor, per method (continuous batching)")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="most prompt tokens (rows x longest prompt) one engine step prefills together")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV-cache cap per model actor, shared by its methods (default: half the memory free)")
    p.add_argument("--kv-cache-memory-fraction", type=float, default=None,
                   help="the KV-cache cap as a fraction of the device's memory")
    p.add_argument("--batches-in-flight", type=int, default=d.batches_in_flight,
                   help="Ray batches a model actor works on at once (continuous batching)")
    p.add_argument("--num-actors", type=int, default=d.num_actors, help="model actors (minimum of the pool)")
    p.add_argument("--max-actors", type=int, default=None,
                   help="autoscale the pool up to this many actors (default: --num-actors)")
    p.add_argument("--preprocess", default=d.preprocess, choices=PREPROCESS,
                   help="where prompts are tokenised and frames resized + patchified: cpu-stage, a Ray Data "
                        "CPU actor pool between decode and the model actors (the model actor receives the "
                        "prepared arrays); in-actor: inside the model actor's process")
    p.add_argument("--preprocess-workers", type=int, default=d.preprocess_workers,
                   help="CPU preprocessing workers (minimum of their pool; each loads the tokenizer once)")
    p.add_argument("--max-preprocess-workers", type=int, default=None,
                   help="autoscale the preprocessing pool up to this many workers (default: "
                        "--preprocess-workers)")
    p.add_argument("--cpus-per-preprocess-worker", type=float, default=d.cpus_per_preprocess_worker,
                   help="CPUs each preprocessing worker holds")
    p.add_argument("--gpus-per-actor", type=float, default=d.gpus_per_actor, help="GPUs each model actor holds")
    p.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor,
                   help="CPUs each model actor holds (also its torch threads)")
    p.add_argument("--decode-timeout", type=float, default=d.decode_timeout_s, dest="decode_timeout_s",
                   help="seconds allowed to decode one input")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="model weights' dtype")
    p.add_argument("--engine", default=d.engine, choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=None, help="only the first N inputs (by clip_id) (default: all)")
    p.add_argument("--run-id", default=None, help="name of the run (default: time + random suffix)")
    p.add_argument("--ray-address", default=None, help="existing cluster (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint (MinIO, Ceph, GCS interop) (default: AWS_ENDPOINT_URL)")
    p.add_argument("--region", default=None, help="S3 region (default: botocore's)")
    p.add_argument("--anon", action="store_true", help="anonymous S3 access")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line (rows done of the planned total, every 10 s)")
    add_compression_args(p)
    # Reruns (pipeline/batch/plan.py)
    p.add_argument("--new-config", action="store_true", help="rerun an output with another configuration: its "
                   "rows are written beside the old ones (row ids carry the configuration key) and the run's "
                   "table and summary hold the new configuration's rows (default: such a rerun is refused)")
    p.add_argument("--only-new", action="store_true", help="run only (input, method) pairs without any row "
                   "(default: a rerun also retries error rows and inputs whose bytes changed)")
    p.add_argument("--fingerprint-code-version", action="store_true", help="make the code version part of the "
                   "run's configuration fingerprint (a rerun with other code is then refused)")
    p.add_argument("--plan", default=d.plan, choices=PLANS, help="where the plan (manifest, resume) runs: on the "
                   "driver, or distributed in Ray tasks, one clip-id range each, the driver holding a few numbers "
                   "per range (default auto: distributed for a manifest of >= 1M rows or >= 256 MB)")
    p.add_argument("--max-task-retries", type=int, default=d.max_task_retries, help="retries of a batch whose "
                   "actor died (crash, OOM kill); after them its inputs become error rows (stage 'worker')")


def config_from_args(args: argparse.Namespace) -> AnnotateConfig:
    """The validated AnnotateConfig of parsed flags (ConfigError, naming the flag, if one is wrong).

    The compression settings go through `compression_from_args`, as for `meda generate` / `meda serve`."""
    from meda_engine.cli_args import compression_from_args
    from meda_engine.config import ConfigError

    try:
        comp = compression_from_args(args)
    except ConfigError as e:
        raise ConfigError(_flagged(str(e))) from None
    rest = {k: v for k, v in comp.to_dict().items() if k not in ("method", "budget")}
    fields = set(AnnotateConfig.__dataclass_fields__) - {"compression", "method", "budget"}
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    return AnnotateConfig(method=comp.method, budget=comp.budget, compression=rest, **kwargs)


def add_annotate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("annotate", help="annotate a corpus of videos/images with Ray Data (resumable)",
                       description=DESCRIPTION, formatter_class=HelpFormatter)
    add_annotate_args(p)
    p.error = lambda message: _usage_error(p, message)  # one line, exit 2 (not the whole usage)
    p.set_defaults(func=lambda args: _run_cli(args))
    return p


def _usage_error(p: argparse.ArgumentParser, message: str):
    sys.stderr.write(f"{p.prog}: error: {message} (see {p.prog} --help)\n")
    sys.exit(2)


def _run_cli(args: argparse.Namespace) -> int:
    from .job import run

    # ConfigError (flags) and PreflightError (model/input/output, checked first thing in run()) are
    # ValueErrors: pipeline.cli prints them as one line and returns 2, before Ray starts.
    summary = run(config_from_args(args))
    return 0 if summary["rows"] else 1
