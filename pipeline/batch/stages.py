"""The job's Ray Data stages: ``decode_media`` (CPU tasks), ``Preprocess`` (CPU actor pool) and
``Annotator`` (the model actor).

Between the stages, frames and prepared prompts travel as numpy arrays in Ray Data tensor columns
(Arrow variable-shaped tensors: every row its own shape, zero-copy reads from the object store), not as
serialised bytes. ``Preprocess`` runs the CPU half of `Engine.prepare` (`meda_engine.engine.Preprocessor`:
chat template, tokenisation, resize + patchify, context check) and hands the model actor the prompt's
arrays (``prep_*`` columns) instead of frames; the actor only turns them into the engine's prepared
requests (`Engine.from_host`) and submits them. ``--preprocess in-actor`` keeps the old path (frames to
the actor, `Engine.prepare` inside it), for comparison.
"""

from __future__ import annotations

import io
import json
import socket
import time
import uuid
from typing import Any

import numpy as np

from .. import storage
from ..schema import empty_row, normalise_answer, telemetry_values, to_table
from .progress import report
from .config import AnnotateConfig


# The vision tensors a prepared prompt may hold (`meda_engine.models`' adapters' keys) and their dtypes;
# every one is a 2-D tensor column, empty (0, 0) in a row without it.
VISION_COLUMNS = {"pixel_values": np.float32, "image_grid_thw": np.int64, "pixel_values_videos": np.float32,
                  "video_grid_thw": np.int64}
PREP_COLUMNS = ("prep_input_ids", "prep_modality", "prep_n_context", "prep_n_frames", "prep_extra", "prep_family",
                *(f"prep_{k}" for k in VISION_COLUMNS))
NO_FRAMES = np.zeros((0, 0, 0, 3), np.uint8)  # the frames cell of a row that did not decode


def pack_frames(frames: np.ndarray) -> bytes:
    """np.save bytes of ``frames`` (kept for `pipeline.annotate`'s re-export; the stages pass arrays)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(frames), allow_pickle=False)
    return buf.getvalue()


def unpack_frames(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def row_generation(cfg: AnnotateConfig, batch: dict[str, np.ndarray], i: int):
    """The generation settings of row ``i``: the manifest's per-input ``max_new_tokens``, else the run's."""
    from meda_engine import GenerationConfig

    per_input = _value(batch["max_new_tokens"][i]) if "max_new_tokens" in batch else None
    return GenerationConfig(max_new_tokens=int(per_input or cfg.max_new_tokens))


def row_request(cfg: AnnotateConfig, batch: dict[str, np.ndarray], i: int, frames: np.ndarray | None):
    """The engine `Request` of row ``i`` (its prompt, method's compression and generation settings).

    ``frames`` are its decoded ``(T, H, W, 3)`` frames; None (the model actor, when the CPU stage already
    prepared the prompt) gives the same request with a pixel-less media part, which carries the id, the
    compression and the text the engine needs without the pixels travelling again."""
    from meda_engine import Request, Video

    kind = str(batch["kind"][i])
    comp = cfg.compression_for(str(batch["method"][i]))
    gen = row_generation(cfg, batch, i)
    prompt = str(batch["prompt"][i])
    if kind == "image":
        image = frames[0] if frames is not None else np.zeros((0, 0, 3), np.uint8)
        return Request(prompt=prompt, images=[image], generation=gen, compression=comp)
    video = Video(frames if frames is not None else NO_FRAMES, float(batch["fps"][i]) or None)
    return Request(prompt=prompt, video=video, generation=gen, compression=comp)


def _n_frames(kind: str, frames: np.ndarray) -> int:
    return int(frames.shape[0]) if kind == "video" else 1


def encode_host(host: Any) -> dict[str, Any]:
    """A prepared prompt (`meda_engine.engine.HostPrompt`, or the fake engine's) as ``prep_*`` cells."""
    unknown = sorted(set(host.vision) - set(VISION_COLUMNS))
    if unknown:
        raise ValueError(f"the prepared prompt holds vision tensors {unknown} that the job cannot pass between "
                         f"stages (known: {sorted(VISION_COLUMNS)}); use --preprocess in-actor")
    cells = {"prep_input_ids": np.ascontiguousarray(host.input_ids, np.int64),
             "prep_modality": np.ascontiguousarray(host.modality, np.int8),
             "prep_n_context": int(host.n_context), "prep_n_frames": int(host.n_frames),
             "prep_extra": json.dumps(host.extra), "prep_family": str(host.family)}
    for key, dtype in VISION_COLUMNS.items():
        value = host.vision.get(key)
        if value is not None and value.ndim != 2:
            raise ValueError(f"prepared {key} has shape {value.shape}; the job passes 2-D vision tensors only")
        cells[f"prep_{key}"] = np.zeros((0, 0), dtype) if value is None else np.ascontiguousarray(value, dtype)
    return cells


def empty_host_cells() -> dict[str, Any]:
    """The ``prep_*`` cells of a row with no prepared prompt (an error row)."""
    cells: dict[str, Any] = {"prep_input_ids": np.zeros((0,), np.int64), "prep_modality": np.zeros((0,), np.int8),
                             "prep_n_context": 0, "prep_n_frames": 0, "prep_extra": "{}", "prep_family": ""}
    cells.update({f"prep_{k}": np.zeros((0, 0), t) for k, t in VISION_COLUMNS.items()})
    return cells


def decode_host(batch: dict[str, np.ndarray], i: int, cls: type):
    """Row ``i``'s ``prep_*`` cells back as a prepared prompt of class ``cls`` (a row without a vision
    tensor has it empty)."""
    vision = {}
    for key, dtype in VISION_COLUMNS.items():
        value = np.asarray(batch[f"prep_{key}"][i], dtype)
        if value.size:
            vision[key] = value
    return cls(input_ids=np.asarray(batch["prep_input_ids"][i], np.int64),
               modality=np.asarray(batch["prep_modality"][i], np.int8), vision=vision,
               n_context=int(batch["prep_n_context"][i]), n_frames=int(batch["prep_n_frames"][i]),
               extra=json.loads(str(batch["prep_extra"][i])), family=str(batch["prep_family"][i]))


def decode_media(batch: dict[str, np.ndarray], *, storage_options: dict[str, Any], max_frames: int,
                 max_pixels: int | None, timeout_s: float) -> dict[str, list]:
    """CPU stage: read each object and decode it into frames, or record why it could not be.

    Sampling per row: ``sample_fps`` > 0 samples at that rate, else ``sample_frames`` frames uniformly.
    Adds ``frames`` (``(T, H, W, 3)`` uint8 arrays, a tensor column; an image is one frame; an input that
    did not decode has ``(0, 0, 0, 3)``), ``fps``,
    ``error``/``error_stage`` and media facts. An input listed twice (two methods) is read once.
    """
    n = len(batch["row_id"])
    out: dict[str, list] = {k: list(batch[k]) for k in batch}
    out.update(frames=[NO_FRAMES] * n, fps=[0.0] * n, error=[None] * n, error_stage=[None] * n,
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
            out["frames"][i] = np.ascontiguousarray(res["frames"], np.uint8)
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


class Preprocess:
    """CPU stage (an actor pool between ``decode_media`` and ``Annotator``): the CPU half of
    `Engine.prepare` for every decoded row — chat template, tokenisation, resize + patchify, the context
    check — with the checkpoint's tokenizer and processor settings loaded once per worker (no weights).

    Drops ``frames``; adds the prepared prompt as ``prep_*`` tensor columns and ``n_frames``. A row that
    cannot be prepared (e.g. its prompt does not fit the model's context) becomes its own error row
    (``error_stage="prepare"``); its batch-mates are unaffected. Rows of one input with the same prompt
    and generation length (two methods) are prepared once.
    """

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = AnnotateConfig(**cfg)
        if self.cfg.engine == "fake":
            from ..testing import FakePreprocessor

            self.preprocessor = FakePreprocessor()
        else:
            import torch

            from meda_engine.engine import Preprocessor

            torch.set_num_threads(max(1, int(self.cfg.cpus_per_preprocess_worker)))
            self.preprocessor = Preprocessor.from_pretrained(self.cfg.model,
                                                             max_pixels_per_frame=self.cfg.max_pixels_per_frame)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        n = len(batch["row_id"])
        out: dict[str, Any] = {k: v for k, v in batch.items() if k != "frames"}
        errors = [_value(e) for e in batch["error"]]
        stages = [None if errors[i] is None else _value(batch["error_stage"][i]) for i in range(n)]
        cells = [empty_host_cells() for _ in range(n)]
        n_frames: list[int | None] = [None] * n
        seen: dict[tuple, Any] = {}
        for i in range(n):
            if errors[i] is not None:
                continue
            try:
                frames = np.asarray(batch["frames"][i])
                kind = str(batch["kind"][i])
                req = row_request(self.cfg, batch, i, frames)
                key = (str(batch["uri"][i]), kind, float(batch["sample_fps"][i]), int(batch["sample_frames"][i]),
                       req.generation.max_new_tokens, str(batch["prompt"][i]))
                if key not in seen:
                    seen[key] = encode_host(self.preprocessor.preprocess(req, max_new_tokens=req.generation.max_new_tokens))
                cells[i] = seen[key]
                n_frames[i] = _n_frames(kind, frames)
            except Exception as e:  # noqa: BLE001 - this row's own error
                errors[i], stages[i] = f"{type(e).__name__}: {e}"[:500], "prepare"
        out.update(error=errors, error_stage=stages, n_frames=n_frames)
        for col in PREP_COLUMNS:
            out[col] = [c[col] for c in cells]
        return out


class Annotator:
    """GPU (or CPU) actor: one model + engine, batches of prepared (or, with ``--preprocess in-actor``,
    decoded) inputs in, result rows out."""

    def __init__(self, cfg: dict[str, Any], run_id: str, version: str, progress: Any = None):
        import torch

        self.cfg = AnnotateConfig(**cfg)
        self.run_id, self.version = run_id, version
        self.progress = progress  # the job's progress counter (progress.py), or None
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
        return {m: EngineLoop(self.engine, max_num_seqs=cfg.max_num_seqs,
                              max_num_batched_tokens=cfg.max_num_batched_tokens, kv_cache_memory_bytes=max(1, cap // len(methods)))
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
            report(self.progress, (r["status"] for r in rows))
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
        report(self.progress, (r["status"] for r in rows))
        return to_table(rows)

    def _prepare(self, batch, rows, group: list[int]):
        """The engine's prepared requests for the rows of ``group`` that decoded (and, in the CPU-stage
        path, were prepared there: only `from_host` is left, tensors for this engine); a row that cannot
        be prepared (e.g. too many frames for the context) becomes an error row."""
        prepared, where = [], []
        host_cls = self._host_class() if self.cfg.preprocess == "cpu-stage" else None
        for i in group:
            if rows[i]["status"] == "error":
                continue
            try:
                if host_cls is not None:
                    req = row_request(self.cfg, batch, i, None)
                    prepared.append(self.engine.from_host(req, decode_host(batch, i, host_cls), req.generation))
                    rows[i]["n_frames"] = int(batch["n_frames"][i])
                else:
                    frames = np.asarray(batch["frames"][i])
                    prepared.append(self.engine.prepare(row_request(self.cfg, batch, i, frames)))
                    rows[i]["n_frames"] = _n_frames(rows[i]["kind"], frames)
                where.append(i)
            except Exception as e:  # noqa: BLE001
                self._fail(rows[i], "prepare", e)
        return prepared, where

    def _host_class(self) -> type:
        if self.cfg.engine == "fake":
            from ..testing import FakeHostPrompt

            return FakeHostPrompt
        from meda_engine.engine import HostPrompt

        return HostPrompt

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
        """One engine call for the group: the fixed, padded batch (`Engine.generate_static`: prefilled
        together, and every row decodes until the batch's slowest row has finished; the next Ray batch
        starts after). If it fails, each request alone, so one bad input cannot take the others down."""
        if not prepared:
            return []
        run = getattr(self.engine, "generate_static", self.engine.generate)  # the fake engine has one path
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

