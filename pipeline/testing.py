"""A deterministic stand-in for the engine, for exercising the pipeline's topology quickly.

It answers without a model (the text echoes the prompt and the frame count) and reports telemetry
that is *not measured*. Use it for dry runs of the Ray graph (``meda annotate --engine fake``) and
pipeline tests that are about the pipeline; the real engine runs through the same code otherwise.
`FakePreprocessor` is its CPU half (the job's ``Preprocess`` stage), as `meda_engine.engine.Preprocessor`
is the real engine's; neither imports torch or transformers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meda_engine import ConfigError, Request, Result, Telemetry

FAIL_WORD = "FAIL_PREPARE"  # a prompt containing it fails in prepare, like an over-long prompt


@dataclass
class FakePrepared:
    request: Request
    n_frames: int


@dataclass
class FakeHostPrompt:
    """The fake engine's prepared prompt, in the fields of `meda_engine.engine.HostPrompt` (numpy only)."""

    input_ids: np.ndarray
    modality: np.ndarray
    vision: dict[str, np.ndarray] = field(default_factory=dict)
    n_context: int = 0
    n_frames: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    family: str = "fake"


def _text(request: Request) -> str:
    return " ".join(p for m in request.messages for p in m.content if isinstance(p, str))


class FakePreprocessor:
    """The fake engine's CPU half: fails on `FAIL_WORD`, counts the frames, makes up token ids."""

    family = "fake"

    def preprocess(self, request: Request, *, max_new_tokens: int | None = None) -> FakeHostPrompt:
        if FAIL_WORD in _text(request):
            raise ConfigError("fake prepare failure")
        n = sum(int(np.asarray(getattr(m, "frames", np.zeros((1,)))).shape[0]) for m in request.media)
        ids = np.arange(10 + n, dtype=np.int64)
        return FakeHostPrompt(ids, np.zeros(ids.shape, np.int8), n_context=int(ids.shape[0]), n_frames=n)


class FakeEngine:
    FAIL_WORD = FAIL_WORD
    KILL_WORD = "KILL_WORKER"  # a prompt containing it kills the worker process, like a segfault or OOM kill

    def __init__(self) -> None:
        # Failure hooks for the machine-failure tests (tests/cluster_scenarios.py):
        #   MEDA_FAKE_INIT_ERROR=msg   the engine cannot be built (as when a checkpoint cannot be loaded)
        #   MEDA_FAKE_CRASH_ONCE=path  the first generate call anywhere kills its process (path marks it done)
        if os.environ.get("MEDA_FAKE_INIT_ERROR"):
            raise RuntimeError(os.environ["MEDA_FAKE_INIT_ERROR"])
        self.crash_once = os.environ.get("MEDA_FAKE_CRASH_ONCE")
        # Seconds per generate call, so tests can interrupt a run that is still going.
        self.delay_s = float(os.environ.get("MEDA_FAKE_DELAY_S", "0"))

    def prepare(self, request: Request) -> FakePrepared:
        """Both halves in one call, as `Engine.prepare`."""
        return self.from_host(request, FakePreprocessor().preprocess(request))

    def from_host(self, request: Request, host: FakeHostPrompt, generation=None) -> FakePrepared:
        """The model side of a prompt `FakePreprocessor` prepared (possibly in another process)."""
        if host.family != "fake":
            raise ConfigError(f"the prompt was prepared for a {host.family} model; this engine runs fake")
        return FakePrepared(request, int(host.n_frames))

    def generate(self, prepared: list[FakePrepared]) -> list[Result]:
        time.sleep(self.delay_s)
        if any(self.KILL_WORD in " ".join(str(c) for m in p.request.messages for c in m.content) for p in prepared):
            os._exit(18)  # this input kills its worker every time (the retry cap's test)
        if self.crash_once:
            try:
                fd = os.open(self.crash_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(17)  # the actor's process dies mid-batch, as on a segfault or an OOM kill
        out = []
        for p in prepared:
            comp = p.request.compression
            method = comp.method if comp else "full"
            ratio = 1.0 if method == "full" else float(comp.keep_fraction(100))
            full = 1000 * max(1, p.n_frames)
            tele = Telemetry(
                method=method, budget=ratio, entropy_variant=None, n_prompt_tokens=10 + p.n_frames,
                n_text_tokens=10, n_visual_tokens=p.n_frames, n_frames=p.n_frames, n_generated_tokens=3,
                kv_bytes_full=full, kv_bytes_kept=int(full * ratio), kv_keep_ratio=ratio,
                kv_bytes_allocated=int(full * ratio), layer_budgets=[p.n_frames], layer_entropies=None,
                prefill_s=0.001, compress_s=0.0, decode_s=0.002 * ratio + 0.001, decode_tokens_per_s=1.0,
                peak_mem_bytes=0, peak_mem_kind="fake", batch_size=len(prepared), device="cpu", dtype="none",
            )
            text = f"{p.request.messages[-1].content[-1]} | {p.n_frames} frames"
            out.append(Result(p.request.request_id, text, [1, 2, 3], "length", tele))
        return out
