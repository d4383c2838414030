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

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import storage
from .schema import SCHEMA, empty_row, normalise_answer, to_table

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = str(REPO_ROOT / "samples" / "needle-corpus" / "manifest.jsonl")
DEFAULT_MODEL = str(REPO_ROOT / "models" / "needle-s0")
DEFAULT_OUTPUT = "out/annotate"
DEFAULT_PROMPT = "Describe the video in detail."


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


# ----------------------------------------------------------------------------------------- planning
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


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def read_done_rows(cfg: AnnotateConfig) -> tuple[set[str], int]:
    """row_ids already written under OUTPUT/rows, and how many unreadable (partial) files were
    moved aside (a job killed while writing a file leaves one)."""
    fs, root = storage.filesystem_for(join(cfg.output, "rows"), **cfg.storage_options())
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
            target = path.replace("/rows/", "/_partial/", 1)
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.mv(path, target)
            moved += 1
    return done, moved


def plan_run(cfg: AnnotateConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Write the manifest; return (manifest, pending tasks, run info)."""
    opts = cfg.storage_options()
    fs, out_root = storage.filesystem_for(cfg.output, **opts)
    run_file = join(out_root, "run.json")
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
    _write_manifest(manifest, join(cfg.output, "_manifest", "manifest.parquet"), opts)
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


# ----------------------------------------------------------------------------------------- stages
def pack_frames(frames: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(frames), allow_pickle=False)
    return buf.getvalue()


def unpack_frames(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_media(batch: dict[str, np.ndarray], *, storage_options: dict[str, Any], max_frames: int,
                 max_pixels: int | None, timeout_s: float) -> dict[str, list]:
    """CPU stage: read each object and decode it into frames, or record why it could not be.

    Sampling per row: ``sample_fps`` > 0 samples at that rate, else ``sample_frames`` frames uniformly.
    Adds ``frames`` (np.save bytes of ``(T, H, W, 3)`` uint8; an image is one frame), ``fps``,
    ``error``/``error_stage`` and media facts. An input listed twice (two methods) is read once.
    """
    n = len(batch["row_id"])
    out: dict[str, list] = {k: list(batch[k]) for k in batch}
    out.update(frames=[b""] * n, fps=[0.0] * n, error=[None] * n, error_stage=[None] * n,
               decode_media_s=[0.0] * n, media_backend=[None] * n, source_fps=[None] * n, duration_s=[None] * n)
    seen: dict[str, Any] = {}
    for i in range(n):
        uri, kind = str(batch["uri"][i]), str(batch["kind"][i])
        fps = float(batch["sample_fps"][i]) or None
        frames = int(batch["sample_frames"][i])
        t0 = time.perf_counter()
        key = (uri, fps, frames)
        if key not in seen:
            seen[key] = _read_and_decode(uri, kind, storage_options, frames, fps, max_frames, max_pixels, timeout_s)
        res = seen[key]
        if isinstance(res, tuple):
            out["error_stage"][i], out["error"][i] = res
        else:
            out["kind"][i] = res["kind"]
            out["frames"][i] = pack_frames(res["frames"])
            for key in ("fps", "media_backend", "source_fps", "duration_s"):
                out[key][i] = res[key]
        out["decode_media_s"][i] = time.perf_counter() - t0
    return out


def _read_and_decode(uri, kind, storage_options, frames, fps, max_frames, max_pixels, timeout_s):
    from meda_engine import media

    try:
        data = storage.read_bytes(uri, **storage_options)
    except Exception as e:  # noqa: BLE001 - any storage failure is this input's error
        return "read", f"{type(e).__name__}: {e}"[:500]
    try:
        kind = kind or media.sniff_kind(data) or "video"
        pixel_cap = {"max_pixels": max_pixels} if max_pixels else {}
        if kind == "image":
            img = media.decode_with_timeout(media.decode_image, timeout_s, data, **pixel_cap)
            return {"kind": kind, "frames": img[None], "fps": 0.0, "media_backend": "pillow", "source_fps": None,
                    "duration_s": None}
        vid = media.decode_with_timeout(media.decode_video, timeout_s, data, n_frames=None if fps else frames,
                                        fps=fps, max_frames=max_frames, **pixel_cap)
        return {"kind": kind, "frames": vid.frames, "fps": float(vid.fps_sampled), "media_backend": vid.backend_used,
                "source_fps": vid.source_fps, "duration_s": vid.duration_s}
    except Exception as e:  # noqa: BLE001 - corrupt media must not fail the batch
        return "decode", f"{type(e).__name__}: {e}"[:500]


class Annotator:
    """GPU (or CPU) actor: one model + engine, batches of decoded inputs in, result rows out."""

    def __init__(self, cfg: dict[str, Any], run_id: str, version: str):
        import torch

        self.cfg = AnnotateConfig(**cfg)
        self.run_id, self.version = run_id, version
        torch.set_num_threads(max(1, int(self.cfg.cpus_per_actor)))
        if self.cfg.engine == "fake":
            from .testing import FakeEngine

            self.engine = FakeEngine()
        else:
            from meda_engine import Engine

            device = self.cfg.device
            if device == "auto":
                device = "cuda" if self.cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
            self.engine = Engine.from_pretrained(self.cfg.model, device=device, dtype=self.cfg.dtype,
                                                 max_pixels_per_frame=self.cfg.max_pixels_per_frame)
        self.node = socket.gethostname()

    def compression(self, method: str):
        from meda_engine import CompressionConfig

        extra = dict(self.cfg.compression)
        if method == self.cfg.method:
            return CompressionConfig(method=method, budget=self.cfg.budget, **extra)
        return CompressionConfig(method=method)

    def __call__(self, batch: dict[str, np.ndarray]):
        n = len(batch["row_id"])
        rows = [self._base_row(batch, i) for i in range(n)]
        # One engine call per method: a batch that mixes methods would share one decode loop, and the
        # per-method latency figures (and the full-cache comparison) would be meaningless.
        for method in dict.fromkeys(r["method"] for r in rows):
            group = [i for i in range(n) if rows[i]["method"] == method]
            t0 = time.perf_counter()
            prepared, where = self._prepare(batch, rows, group)
            for i, result in zip(where, self._generate(prepared, rows, where)):
                if result is not None:
                    self._fill(rows[i], result)
            batch_id, infer_s = uuid.uuid4().hex[:12], time.perf_counter() - t0
            for i in group:
                rows[i].update(batch_id=batch_id, batch_infer_s=infer_s)
        return to_table(rows)

    def _prepare(self, batch, rows, group: list[int]):
        """Requests for the rows of ``group`` that decoded; a row that cannot be prepared (e.g. too many
        frames for the context) becomes an error row."""
        from meda_engine import GenerationConfig, Request, Video

        prepared, where = [], []
        for i in group:
            if rows[i]["status"] == "error":
                continue
            try:
                frames = unpack_frames(batch["frames"][i])
                gen = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens)
                comp = self.compression(rows[i]["method"])
                if rows[i]["kind"] == "image":
                    req = Request(prompt=rows[i]["prompt"], images=[frames[0]], generation=gen, compression=comp)
                else:
                    req = Request(prompt=rows[i]["prompt"], video=Video(frames, float(batch["fps"][i]) or None),
                                  generation=gen, compression=comp)
                prepared.append(self.engine.prepare(req))
                where.append(i)
                rows[i]["n_frames"] = int(frames.shape[0]) if rows[i]["kind"] == "video" else 1
            except Exception as e:  # noqa: BLE001
                self._fail(rows[i], "prepare", e)
        return prepared, where

    def _generate(self, prepared, rows, where):
        """One engine call for the group; if it fails, each request alone, so one bad input cannot
        take the others down."""
        if not prepared:
            return []
        try:
            return self.engine.generate(prepared)
        except Exception:  # noqa: BLE001
            results = []
            for p, i in zip(prepared, where):
                try:
                    results.append(self.engine.generate([p])[0])
                except Exception as e:  # noqa: BLE001
                    self._fail(rows[i], "generate", e)
                    results.append(None)
            return results

    def _base_row(self, batch, i: int) -> dict[str, Any]:
        import datetime as dt

        err = _value(batch["error"][i])
        answer = _value(batch["expected_answer"][i])
        return empty_row(
            row_id=str(batch["row_id"][i]), clip_id=str(batch["clip_id"][i]), uri=str(batch["uri"][i]),
            kind=str(batch["kind"][i]), prompt=str(batch["prompt"][i]),
            expected_answer=None if answer is None else str(answer),
            method=str(batch["method"][i]), model=self.cfg.model,
            status="error" if err is not None else "ok", error=None if err is None else str(err),
            error_stage=None if err is None else str(batch["error_stage"][i]),
            decode_media_s=float(batch["decode_media_s"][i]), media_backend=_value(batch["media_backend"][i]),
            source_fps=_value(batch["source_fps"][i]), duration_s=_value(batch["duration_s"][i]),
            node=self.node, run_id=self.run_id, code_version=self.version,
            created_at=dt.datetime.now(dt.timezone.utc),
        )

    @staticmethod
    def _fail(row: dict[str, Any], stage: str, e: Exception) -> None:
        row.update(status="error", error_stage=stage, error=f"{type(e).__name__}: {e}"[:500])

    @staticmethod
    def _fill(row: dict[str, Any], result) -> None:
        t = result.telemetry
        row.update(
            text=result.text, finish_reason=result.finish_reason, budget=float(t.budget),
            entropy_variant=t.entropy_variant, n_text_tokens=t.n_text_tokens, n_visual_tokens=t.n_visual_tokens,
            n_prompt_tokens=t.n_prompt_tokens, n_generated_tokens=t.n_generated_tokens,
            kv_bytes_full=t.kv_bytes_full, kv_bytes_kept=t.kv_bytes_kept, kv_keep_ratio=t.kv_keep_ratio,
            kv_bytes_allocated=t.kv_bytes_allocated, layer_budgets=list(t.layer_budgets),
            layer_entropies=t.layer_entropies, prefill_s=t.prefill_s, compress_s=t.compress_s,
            decode_s=t.decode_s, decode_tokens_per_s=t.decode_tokens_per_s, peak_mem_bytes=t.peak_mem_bytes,
            peak_mem_kind=t.peak_mem_kind, batch_size=t.batch_size,
        )
        if row["expected_answer"] is not None:
            row["correct"] = normalise_answer(result.text) == normalise_answer(row["expected_answer"])


def _value(x: Any) -> Any:
    """A batch cell as a Python value; None for missing (an all-None column arrives as NaN)."""
    if x is None or (isinstance(x, (float, np.floating)) and np.isnan(x)):
        return None
    return x.item() if isinstance(x, np.generic) else x


# ----------------------------------------------------------------------------------------- running
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
        rows_url = join(cfg.output, "rows")
        pa_fs, rows_path = storage.pyarrow_filesystem_for(rows_url, **cfg.storage_options())
        ds.write_parquet(rows_path, filesystem=pa_fs)
        stats_text = ds.stats()
    summary = summarize(cfg, info, time.time() - t_start, stats_text)
    fs, out_root = storage.filesystem_for(cfg.output, **cfg.storage_options())
    with fs.open(join(out_root, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(format_summary(summary))
    return summary


def read_rows(output: str, storage_options: dict[str, Any] | None = None):
    """All result rows of a run as a pandas DataFrame, one per row_id (latest wins)."""
    import pandas as pd
    import pyarrow.parquet as pq

    fs, root = storage.filesystem_for(join(output, "rows"), **(storage_options or {}))
    tables = []
    if fs.exists(root):
        for path in sorted(p for p in fs.find(root) if p.endswith(".parquet")):
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f))
    if not tables:
        return pd.DataFrame(columns=SCHEMA.names)
    import pyarrow as pa

    df = pa.concat_tables(tables).to_pandas()
    return df.sort_values("created_at").drop_duplicates("row_id", keep="last").reset_index(drop=True)


def summarize(cfg: AnnotateConfig, info: dict[str, Any], wall_s: float, stats_text: str) -> dict[str, Any]:
    df = read_rows(cfg.output, cfg.storage_options())
    per_method: dict[str, Any] = {}
    for method, g in df.groupby("method"):
        ok = g[g.status == "ok"]
        entry = {
            "rows": int(len(g)),
            "ok": int(len(ok)),
            "error": int((g.status == "error").sum()),
            "kv_keep_ratio_mean": float(ok.kv_keep_ratio.mean()) if len(ok) else None,
            "kv_bytes_full_total": int(ok.kv_bytes_full.sum()),
            "kv_bytes_kept_total": int(ok.kv_bytes_kept.sum()),
            "decode_tokens_per_s_mean": float(ok.decode_tokens_per_s.mean()) if len(ok) else None,
            "prefill_s_mean": float(ok.prefill_s.mean()) if len(ok) else None,
            "decode_media_s_mean": float(g.decode_media_s.mean()) if len(g) else None,
        }
        scored = ok[ok.expected_answer.notna()]
        if len(scored):
            entry["accuracy"] = float(scored.correct.astype(bool).mean())
            entry["n_scored"] = int(len(scored))
        per_method[str(method)] = entry
    errors = df[df.status == "error"]
    summary = {
        "run_id": info["run_id"],
        "output": cfg.output,
        "model": cfg.model,
        "method": cfg.method,
        "budget": cfg.budget,
        "baseline": cfg.baseline,
        "inputs": info["n_inputs"],
        "rows": int(len(df)),
        "status_counts": {str(k): int(v) for k, v in df.status.value_counts().items()},
        "errors_by_stage": {str(k): int(v) for k, v in errors.error_stage.value_counts().items()},
        "wall_s": wall_s,
        "rows_this_run": info["n_pending"],
        "rows_per_s_this_run": info["n_pending"] / wall_s if wall_s > 0 else None,
        "methods": per_method,
        "code_version": info["code_version"],
        "ray_data_stats": str(stats_text),
    }
    main_m, base_m = per_method.get(cfg.method), per_method.get(cfg.baseline)
    if main_m and base_m:
        paired = _paired_ratios(df, cfg.method, cfg.baseline)
        summary["vs_baseline"] = paired
    return summary


def _paired_ratios(df, method: str, baseline: str) -> dict[str, Any]:
    """KV and decode-speed ratios on the inputs that ran with both methods (side by side)."""
    ok = df[df.status == "ok"]
    a = ok[ok.method == method].set_index("clip_id")
    b = ok[ok.method == baseline].set_index("clip_id")
    both = a.index.intersection(b.index)
    if len(both) == 0:
        return {"n_pairs": 0}
    a, b = a.loc[both], b.loc[both]
    out = {
        "n_pairs": int(len(both)),
        "kv_bytes_ratio": float(a.kv_bytes_kept.sum() / max(1, b.kv_bytes_kept.sum())),
        "kv_memory_saved": float(1 - a.kv_bytes_kept.sum() / max(1, b.kv_bytes_kept.sum())),
        "decode_speedup": float(b.decode_s.sum() / a.decode_s.sum()) if a.decode_s.sum() > 0 else None,
        "agreement": float((a.text == b.text).mean()),
    }
    if a.expected_answer.notna().any():
        out["accuracy"] = float(a.correct.astype(bool).mean())
        out["accuracy_baseline"] = float(b.correct.astype(bool).mean())
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"\nrun {s['run_id']}  ->  {s['output']}",
             f"rows: {s['rows']} ({', '.join(f'{k} {v}' for k, v in sorted(s['status_counts'].items()))})"
             + (f"; errors by stage: {s['errors_by_stage']}" if s["errors_by_stage"] else ""),
             f"{'method':<14}{'rows':>6}{'ok':>6}{'err':>5}{'accuracy':>10}{'KV kept':>9}{'decode tok/s':>14}"]
    for m, e in s["methods"].items():
        acc = f"{e['accuracy']:.1%}" if "accuracy" in e else "-"
        keep = f"{e['kv_keep_ratio_mean']:.1%}" if e["kv_keep_ratio_mean"] is not None else "-"
        tps = f"{e['decode_tokens_per_s_mean']:.1f}" if e["decode_tokens_per_s_mean"] is not None else "-"
        lines.append(f"{m:<14}{e['rows']:>6}{e['ok']:>6}{e['error']:>5}{acc:>10}{keep:>9}{tps:>14}")
    vs = s.get("vs_baseline")
    if vs and vs.get("n_pairs"):
        sp = f"{vs['decode_speedup']:.2f}x" if vs.get("decode_speedup") else "-"
        lines.append(f"{s['method']} vs {s['baseline']} on {vs['n_pairs']} inputs: KV memory saved "
                     f"{vs['kv_memory_saved']:.1%}, decode speed-up {sp}, same answer {vs['agreement']:.1%}")
    lines.append(f"wall {s['wall_s']:.1f}s for {s['rows_this_run']} new rows")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- CLI
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
                       description=__doc__.split("\n\n")[0])
    add_annotate_args(p)
    p.set_defaults(func=lambda args: _run_cli(args))
    return p


def _run_cli(args: argparse.Namespace) -> int:
    summary = run(config_from_args(args))
    return 0 if summary["rows"] else 1
