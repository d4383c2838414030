"""The job's Ray Data stages: ``decode_media`` (CPU tasks) and ``Annotator`` (the model actor)."""

from __future__ import annotations

import io
import socket
import time
import uuid
from typing import Any

import numpy as np

from .. import storage
from ..schema import empty_row, normalise_answer, telemetry_values, to_table
from .config import AnnotateConfig


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
            from ..testing import FakeEngine

            self.engine = FakeEngine()
        else:
            from meda_engine import Engine

            device = self.cfg.device
            if device == "auto":
                device = "cuda" if self.cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
            self.engine = Engine.from_pretrained(self.cfg.model, device=device, dtype=self.cfg.dtype,
                                                 max_pixels_per_frame=self.cfg.max_pixels_per_frame)
        self.node = socket.gethostname()
        self.loops = self._start_loops() if self.cfg.engine != "fake" and self.cfg.batching == "continuous" else {}

    def _start_loops(self) -> dict[str, Any]:
        """One continuous-batching `EngineLoop` per method of the run, sharing the actor's KV cap
        equally. Requests of every Ray batch in flight on this actor join their method's running
        batch as they arrive; finished rows leave at once. Steps of different loops are serialised
        by the engine, so a decode step holds one method's rows only and each row's time per output
        token stays that method's own (the baseline comparison stays meaningful)."""
        from meda_engine.scheduler import EngineLoop, _default_cap, device_memory_bytes

        cfg = self.cfg
        methods = list(dict.fromkeys(m for m in (cfg.method, cfg.baseline) if m != "none"))
        if cfg.kv_cache_memory_bytes is not None:
            cap = int(cfg.kv_cache_memory_bytes)
        elif cfg.kv_cache_memory_fraction is not None:
            cap = int(device_memory_bytes(self.engine.device) * cfg.kv_cache_memory_fraction)
        else:
            cap = _default_cap(self.engine.device)
        return {m: EngineLoop(self.engine, max_num_seqs=cfg.max_num_seqs, kv_cache_memory_bytes=max(1, cap // len(methods)))
                for m in methods}

    def engine_stats(self) -> dict[str, Any]:
        """The actor's scheduler figures, summed over its loops (peaks: the largest loop's)."""
        stats = [loop.stats().to_dict() for loop in self.loops.values()]
        if not stats:
            return {}
        total = {k: sum(s[k] for s in stats) for k in ("kv_cache_memory_bytes", "preemptions", "admitted", "finished",
                                                        "failed", "cancelled")}
        total.update(peak_running=max(s["peak_running"] for s in stats),
                     peak_kv_bytes_in_use=max(s["peak_kv_bytes_in_use"] for s in stats))
        return total

    def __call__(self, batch: dict[str, np.ndarray]):
        n = len(batch["row_id"])
        rows = [self._base_row(batch, i) for i in range(n)]
        t0 = time.perf_counter()
        if self.loops:
            # Continuous batching: every request of this batch joins its method's running batch now
            # (other Ray batches on this actor run concurrently, so the engine never drains between them).
            prepared, where = self._prepare(batch, rows, list(range(n)))
            for i, result in zip(where, self._generate_continuous(prepared, rows, where)):
                if result is not None:
                    self._fill(rows[i], result)
            batch_id, infer_s = uuid.uuid4().hex[:12], time.perf_counter() - t0
            for row in rows:
                row.update(batch_id=batch_id, batch_infer_s=infer_s, **_engine_columns(self.engine_stats()))
            return to_table(rows)
        # Static batching (--batching static, and the fake engine): one engine call per method, so a
        # decode step never mixes methods and the per-method latency figures stay meaningful.
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
                per_input = _value(batch["max_new_tokens"][i]) if "max_new_tokens" in batch else None
                gen = GenerationConfig(max_new_tokens=int(per_input or self.cfg.max_new_tokens))
                comp = self.cfg.compression_for(rows[i]["method"])
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

    def _generate_continuous(self, prepared, rows, where):
        """Submit each request to its method's loop, then wait for all: a request that fails (or can
        never fit the KV cap) becomes its own error row; the others finish."""
        handles = []
        for p, i in zip(prepared, where):
            try:
                handles.append(self.loops[rows[i]["method"]].submit(p))
            except Exception as e:  # noqa: BLE001 - e.g. RequestTooLarge
                self._fail(rows[i], "generate", e)
                handles.append(None)
        results = []
        for handle, i in zip(handles, where):
            if handle is None:
                results.append(None)
                continue
            try:
                results.append(handle.result())
            except Exception as e:  # noqa: BLE001
                self._fail(rows[i], "generate", e)
                results.append(None)
        return results

    def _generate(self, prepared, rows, where):
        """One engine call for the group (a fixed batch: the next Ray batch starts only when this one's
        slowest row has finished); if it fails, each request alone, so one bad input cannot take the
        others down."""
        if not prepared:
            return []
        run = self.engine.generate
        try:
            return run(prepared)
        except Exception:  # noqa: BLE001
            results = []
            for p, i in zip(prepared, where):
                try:
                    results.append(run([p])[0])
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
        # Every Telemetry field is a column (pipeline.schema derives them from the dataclass).
        row.update(telemetry_values(result.telemetry), text=result.text, finish_reason=result.finish_reason)
        if row["expected_answer"] is not None:
            row["correct"] = normalise_answer(result.text) == normalise_answer(row["expected_answer"])


def _engine_columns(stats: dict[str, Any]) -> dict[str, Any]:
    """The actor's scheduler figures as the row's ``engine_*`` columns (pipeline.schema)."""
    if not stats:
        return {}
    return {"engine_peak_running": stats["peak_running"], "engine_peak_kv_bytes": stats["peak_kv_bytes_in_use"],
            "engine_kv_cap_bytes": stats["kv_cache_memory_bytes"], "engine_preemptions": stats["preemptions"]}


def _value(x: Any) -> Any:
    """A batch cell as a Python value; None for missing (an all-None column arrives as NaN)."""
    if x is None or (isinstance(x, (float, np.floating)) and np.isnan(x)):
        return None
    return x.item() if isinstance(x, np.generic) else x

