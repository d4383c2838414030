"""The annotation job's configuration and its command-line flags.

Import-light on purpose (``meda --help`` must answer at once): nothing here imports numpy, torch,
Ray or pyarrow at module import time.
"""

from __future__ import annotations

import argparse
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_INPUT = str(REPO_ROOT / "samples" / "needle-corpus" / "manifest.jsonl")
DEFAULT_MODEL = str(REPO_ROOT / "models" / "needle-s0")
DEFAULT_OUTPUT = "out/annotate"
DEFAULT_PROMPT = "Describe the video in detail."
DESCRIPTION = "The annotation job: manifest -> read + decode (CPU tasks) -> engine (actor pool) -> Parquet."


@dataclass
class AnnotateConfig:
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
    batch_size: int = 8  # requests per engine call
    num_actors: int = 1
    max_actors: int | None = None  # autoscale the actor pool up to this many
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



def add_annotate_args(p: argparse.ArgumentParser) -> None:
    from meda_engine.cli import add_compression_args

    d = AnnotateConfig()
    p.add_argument("--input", default=d.input, help="prefix of media files (local, s3://, any fsspec URL) or a "
                   "manifest (.parquet/.csv/.jsonl with uri and optional prompt)")
    p.add_argument("--output", default=d.output, help="run directory (local or s3://); rerun to resume")
    p.add_argument("--model", default=d.model, help="hub id, local checkpoint directory or s3:// prefix")
    p.add_argument("--prompt", default=d.prompt, help="prompt for inputs whose manifest row has none")
    p.add_argument("--baseline", default=d.baseline, help="second method run on a sample for side-by-side ratios, "
                   "or 'none'")
    p.add_argument("--baseline-sample", type=int, default=d.baseline_sample,
                   help="how many inputs also run the baseline (-1 = all)")
    p.add_argument("--frames", type=int, default=d.frames, help="frames sampled uniformly per video")
    p.add_argument("--fps", type=float, default=None, help="sample at this rate instead (capped by --max-frames)")
    p.add_argument("--max-frames", type=int, default=d.max_frames)
    p.add_argument("--max-pixels-per-frame", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="requests per engine call")
    p.add_argument("--num-actors", type=int, default=d.num_actors, help="model actors (minimum of the pool)")
    p.add_argument("--max-actors", type=int, default=None, help="autoscale the pool up to this many actors")
    p.add_argument("--gpus-per-actor", type=float, default=d.gpus_per_actor)
    p.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor)
    p.add_argument("--decode-timeout", type=float, default=d.decode_timeout_s, dest="decode_timeout_s")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--engine", default=d.engine, choices=("real", "fake"), help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=None, help="only the first N inputs (by clip_id)")
    p.add_argument("--run-id", default=None)
    p.add_argument("--ray-address", default=None, help="existing cluster (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, Ceph, GCS interop)")
    p.add_argument("--region", default=None)
    p.add_argument("--anon", action="store_true", help="anonymous S3 access")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_compression_args(p)


def config_from_args(args: argparse.Namespace) -> AnnotateConfig:
    extra = {"entropy": args.entropy, "window": args.window, "merge": args.merge, "merge_keys": args.merge_keys,
             "keep_all_text": args.keep_all_text, "temperature": args.entropy_temperature}
    fields = set(AnnotateConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in vars(args).items() if k in fields and k != "compression"}
    return AnnotateConfig(compression=extra, **kwargs)




def add_annotate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("annotate", help="annotate a corpus of videos/images with Ray Data (resumable)",
                       description=DESCRIPTION)
    add_annotate_args(p)
    p.set_defaults(func=lambda args: _run_cli(args))
    return p


def _run_cli(args: argparse.Namespace) -> int:
    from .job import run

    summary = run(config_from_args(args))
    return 0 if summary["rows"] else 1
