"""Continuous batching over compressed, per-row KV caches (vLLM v1's scheduler, for per-layer budgets).

`Scheduler` keeps a FCFS waiting queue and a running set. Each `step()`:

1. applies cancellations (a cancelled row's cache is dropped at once, its bytes return to the pool);
2. **admits** waiting requests, in order, while ``running < max_num_seqs``, the KV bytes in use plus
   the prefill reservation fit under the cap, and the step's prefill tokens (padded: rows x longest
   prompt) stay within ``max_num_batched_tokens``. The requests admitted in one step are prefilled
   **together** in one padded forward, each row compressed with its own method and then copied into
   its own one-row cache (`Engine.prefill_rows`); each first token is sampled from the prefill
   logits; prefill-only state is dropped there. If that batch raises, its requests are retried one
   by one, so only the failing one fails;
3. runs **one decode step** over every running row together (`Engine.decode_rows`, a `RowBatchCache`
   whose rows own their storage), samples each row's next token with its own settings, streams the
   new text (`Detokenizer`) and **retires** finished rows at once.

Memory accounting (``kv_bytes_in_use``) is the storage each running row's cache holds, measured
(`cache.row_cache_bytes`: ``untyped_storage().nbytes()``, deduplicated), which is the row's kept
tokens per layer plus its decode room (``max_new_tokens`` + deferred query tokens, reserved at
compression). Admission reserves, for the prefill batch in flight, a bound on its peak
(`group_reservation_bytes`: the uncompressed padded block, compression's copies of one layer, the
per-row copies of the split), and releases the excess once the compressed rows are measured. Because a row's
decode room is reserved when it is admitted, a running row never needs memory it does not hold:
the scheduler **queues** and never has to preempt (``preemptions`` stays 0), and admission cannot
push the KV bytes past the cap. A request whose reservation alone exceeds the cap can never run:
`submit` raises `RequestTooLarge`.

A request that raises inside the engine (prefill, compression, a decode step) ends alone: its last
event carries the exception, its batch-mates go on (a failed batched step is rolled back and
retried row by row to find the failing row).

Thread-safety: `submit`, `cancel` and `stats` may be called from any thread; `step` runs on one
thread at a time (the `EngineLoop` thread, or the caller's in synchronous use). Steps of different
schedulers on one engine are serialised by the engine's lock.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .cache import row_cache_bytes
from .config import CompressionConfig, ConfigError, GenerationConfig
from .detokenizer import Detokenizer
from .memory import PeakMemory, synchronize
from .request import Request, Result, Telemetry
from .sampling import make_generators, next_tokens

if TYPE_CHECKING:
    from .engine import Engine, PreparedRequest, RowState, StreamEvent


class RequestTooLarge(ConfigError):
    """The request's KV reservation (uncompressed prompt + decode room) exceeds the scheduler's
    KV cache memory cap, so it could never be admitted. The message gives both figures."""


class RequestCancelled(Exception):
    """The request was cancelled (`RequestHandle.cancel`); it is the last event's ``error``."""


class SchedulerClosed(RuntimeError):
    """The engine loop was shut down before the request finished."""


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of the device the KV cache lives on (CUDA: the GPU; CPU: physical RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _default_cap(device: torch.device) -> int:
    """Half of the memory free now (after the model was loaded)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.5)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return device_memory_bytes(device) // 2


@dataclass
class SchedulerStats:
    """Engine-level gauges and counters (what vLLM exports as ``num_requests_running`` etc.)."""

    running: int
    waiting: int
    kv_bytes_in_use: int  # measured storage of the running rows' caches (+ the prefill reservation)
    kv_cache_memory_bytes: int  # the cap
    kv_cache_usage: float  # in_use / cap
    max_num_seqs: int
    preemptions: int
    admitted: int
    finished: int
    failed: int
    cancelled: int
    peak_kv_bytes_in_use: int
    peak_running: int
    steps: int
    prefill_batches: int  # prefill forwards that took more than one request together

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RequestHandle:
    """The caller's side of one submitted request: iterate its `StreamEvent`s (token deltas, then a
    last event with ``result`` or ``error``), synchronously or with ``async for``; `cancel()` it.

    In synchronous use (a bare `Scheduler`, no `EngineLoop`), iterating drives ``scheduler.step()``
    whenever no event is ready.
    """

    def __init__(self, scheduler: "Scheduler", index: int, request_id: str, *, drive: bool):
        self._scheduler = scheduler
        self.index = index
        self.request_id = request_id
        self._drive = drive
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._aq: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.final: StreamEvent | None = None

    # called by the scheduler thread
    def _put(self, event: "StreamEvent") -> None:
        if event.finished:
            self.final = event
        with self._lock:
            if self._aq is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, event)
            else:
                self._q.put(event)

    @property
    def done(self) -> bool:
        return self.final is not None

    def cancel(self) -> None:
        """Stop the request; its row and KV bytes are freed at once if no step is running, else as
        soon as the step in flight ends. Its last event then carries `RequestCancelled`."""
        self._scheduler.cancel(self.index)

    def __iter__(self) -> Iterator["StreamEvent"]:
        while True:
            if self._drive:
                while self._q.empty():
                    if not self._scheduler.has_work():
                        raise RuntimeError("scheduler has no work but the request has not finished")
                    self._scheduler.step()
                event = self._q.get_nowait()
            else:
                event = self._q.get()
            yield event
            if event.finished:
                return

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the end; return the `Result` or raise the request's error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self._iter_until(deadline):
            if event.finished:
                if event.error is not None:
                    raise event.error
                assert event.result is not None
                return event.result
        raise TimeoutError(f"request {self.request_id} did not finish within {timeout}s")

    def _iter_until(self, deadline: float | None) -> Iterator["StreamEvent"]:
        if self._drive or deadline is None:
            yield from self
            return
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                event = self._q.get(timeout=left)
            except queue.Empty:
                return
            yield event
            if event.finished:
                return

    async def __aiter__(self) -> AsyncIterator["StreamEvent"]:
        """``async for event in handle``: events are handed to the running asyncio loop thread-safely."""
        if self._drive:
            raise RuntimeError("async iteration needs an EngineLoop (a synchronous Scheduler has no thread)")
        with self._lock:
            if self._aq is None:
                self._loop = asyncio.get_running_loop()
                self._aq = asyncio.Queue()
                while not self._q.empty():
                    self._aq.put_nowait(self._q.get_nowait())
        while True:
            event = await self._aq.get()
            yield event
            if event.finished:
                return


@dataclass
class _Entry:
    index: int
    prepared: "PreparedRequest | None"
    default: CompressionConfig | None
    handle: RequestHandle
    need_bytes: int  # prefill reservation
    submitted: float
    request_id: str
    gen: GenerationConfig
    # set at admission
    row: "RowState | None" = None
    meta: dict[str, int] = field(default_factory=dict)
    detok: Detokenizer | None = None
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    admitted: float = 0.0
    first_token: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    row_bytes: int = 0
    max_batch: int = 1
    finish: str | None = None


class Scheduler:
    """Continuous batching for one `Engine` (see the module docstring).

    Parameters
    ----------
    engine:
        The engine whose model runs the steps.
    max_num_seqs:
        Most rows decoding together (vLLM's ``max_num_seqs``).
    kv_cache_memory_bytes, kv_cache_memory_fraction:
        The KV cap, in bytes, or as a fraction of the device's total memory (GPU memory on CUDA,
        physical RAM on CPU); give at most one. Neither: half the memory free at construction.
    max_num_batched_tokens:
        Most prompt tokens prefilled in one step (vLLM's name), counted padded: requests admitted in
        the same step are prefilled together while ``rows x longest prompt`` stays within it. A
        longer prompt is prefilled alone in a step of its own.
    default_compression:
        For requests whose ``compression`` is None.
    policy:
        ``continuous`` (admit whenever a row and its bytes are free) or ``static`` (admit only when
        no row is running, i.e. batches of up to ``max_num_seqs`` that end together; finished rows
        still leave the step early). ``static`` exists for benchmarks.
    """

    def __init__(self, engine: "Engine", *, max_num_seqs: int = 16, kv_cache_memory_bytes: int | None = None,
                 kv_cache_memory_fraction: float | None = None, max_num_batched_tokens: int = 8192,
                 default_compression: CompressionConfig | None = None, policy: str = "continuous",
                 _drive: bool = True):
        if max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if kv_cache_memory_bytes is not None and kv_cache_memory_fraction is not None:
            raise ConfigError("give kv_cache_memory_bytes or kv_cache_memory_fraction, not both")
        if policy not in ("continuous", "static"):
            raise ConfigError(f"policy must be 'continuous' or 'static', got {policy!r}")
        if kv_cache_memory_fraction is not None:
            if not 0 < kv_cache_memory_fraction <= 1:
                raise ConfigError(f"kv_cache_memory_fraction must be in (0, 1], got {kv_cache_memory_fraction}")
            cap = int(device_memory_bytes(engine.device) * kv_cache_memory_fraction)
        elif kv_cache_memory_bytes is not None:
            if kv_cache_memory_bytes <= 0:
                raise ConfigError(f"kv_cache_memory_bytes must be > 0, got {kv_cache_memory_bytes}")
            cap = int(kv_cache_memory_bytes)
        else:
            cap = _default_cap(engine.device)
        self.engine = engine
        self.max_num_seqs = int(max_num_seqs)
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.kv_cache_memory_bytes = cap
        self.default_compression = default_compression
        self.policy = policy
        self._drive = _drive
        d = engine.dims
        elem = torch.empty((), dtype=engine.dtype).element_size()
        self._bytes_per_slot = d.n_layers * d.n_kv_heads * d.head_dim * 2 * elem  # one token, all layers, K+V
        self._n_layers = d.n_layers
        self._inbox: collections.deque[_Entry] = collections.deque()
        self._cancels: set[int] = set()
        self._lock = threading.Lock()  # inbox, cancels, counters
        self._step_lock = threading.Lock()  # one step at a time
        self._waiting: collections.deque[_Entry] = collections.deque()
        self._running: list[_Entry] = []
        self._next_index = 0
        self._reserved = 0  # prefill reservation in flight
        self._counts = collections.Counter()
        self._peak_in_use = 0
        self._peak_running = 0
        self._peak = PeakMemory(engine.device)
        self._peak.reset()

    # ---- submission -----------------------------------------------------------------------------
    def reservation_bytes(self, prepared: "PreparedRequest", default: CompressionConfig | None = None) -> int:
        """KV bytes admission reserves to prefill ``prepared`` alone (`group_reservation_bytes`)."""
        return self.group_reservation_bytes([prepared], default)

    def group_reservation_bytes(self, batch: Sequence["PreparedRequest"], default: CompressionConfig | None = None) -> int:
        """An upper bound on the KV bytes a batched prefill of ``batch`` holds at its peak
        (`Engine.prefill_rows`), with ``P`` = a layer's padded block (rows x longest context; one
        request: its context + decode room) and ``R`` = a layer's row copies (each row's context +
        decode room): the prefill holds ``L * P``; compression adds one layer's gathered rows and its
        compact copy (``<= 2 P``); the split into per-row caches holds ``(L - l) P + (l + 1) R`` while
        copying layer ``l``. So ``(L + 2) * max(P, R)`` slots per layer."""
        per_layer = self._bytes_per_slot // self._n_layers
        rooms = [p.generation.max_new_tokens + (p.prompt.length - p.prompt.n_context) for p in batch]
        ctx = [p.prompt.n_context for p in batch]
        fwd = [self.engine.prefill_length(p, default or self.default_compression) for p in batch]  # KVzip: + its repeat
        padded = fwd[0] + rooms[0] if len(batch) == 1 else len(batch) * max(fwd)
        rows = sum(c + r for c, r in zip(ctx, rooms))
        return (self._n_layers + 2) * max(padded, rows) * per_layer

    def submit(self, request: "Request | PreparedRequest", *, compression: CompressionConfig | None = None,
               max_new_tokens: int | None = None, index: int | None = None) -> RequestHandle:
        """Queue a request (FCFS). Preparation (tokenising, pixels) runs in the caller's thread and
        raises there: `ConfigError`, `ContextLengthError`, `MediaError`, or `RequestTooLarge` if it
        could never fit under the KV cap."""
        from .engine import PreparedRequest

        prepared = request if isinstance(request, PreparedRequest) else self.engine.prepare(
            request, max_new_tokens=max_new_tokens)
        if max_new_tokens is not None and prepared.generation.max_new_tokens != max_new_tokens:
            prepared = dataclasses.replace(
                prepared, generation=dataclasses.replace(prepared.generation, max_new_tokens=max_new_tokens))
        need = self.reservation_bytes(prepared, compression)
        if need > self.kv_cache_memory_bytes:
            raise RequestTooLarge(
                f"request {prepared.request.request_id} needs {need} KV bytes to prefill "
                f"({prepared.prompt.length} prompt tokens + {prepared.generation.max_new_tokens} new tokens, "
                f"uncompressed), more than kv_cache_memory_bytes={self.kv_cache_memory_bytes}")
        with self._lock:
            idx = self._next_index if index is None else index
            self._next_index = max(self._next_index, idx + 1)
            handle = RequestHandle(self, idx, prepared.request.request_id, drive=self._drive)
            self._inbox.append(_Entry(idx, prepared, compression or self.default_compression, handle, need,
                                      time.perf_counter(), prepared.request.request_id, prepared.generation))
        return handle

    def cancel(self, index: int) -> None:
        with self._lock:
            self._cancels.add(index)
        if self._step_lock.acquire(blocking=False):  # not mid-step: free now
            try:
                self._apply_inbox()
            finally:
                self._step_lock.release()

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._waiting or self._running or self._cancels)

    # ---- introspection --------------------------------------------------------------------------
    def kv_bytes_in_use(self) -> int:
        """Measured storage of every running row's cache, plus the prefill reservation in flight."""
        rows = [e.row for e in list(self._running)]  # a snapshot: another thread may be stepping
        return sum(row_cache_bytes(r.cache) for r in rows if r is not None) + self._reserved

    def stats(self) -> SchedulerStats:
        in_use = self.kv_bytes_in_use()
        with self._lock:
            waiting = len(self._waiting) + len(self._inbox)
            c = dict(self._counts)
        return SchedulerStats(
            running=len(self._running), waiting=waiting, kv_bytes_in_use=in_use,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes, kv_cache_usage=in_use / self.kv_cache_memory_bytes,
            max_num_seqs=self.max_num_seqs, preemptions=c.get("preemptions", 0), admitted=c.get("admitted", 0),
            finished=c.get("finished", 0), failed=c.get("failed", 0), cancelled=c.get("cancelled", 0),
            peak_kv_bytes_in_use=self._peak_in_use, peak_running=self._peak_running, steps=c.get("steps", 0),
            prefill_batches=c.get("prefill_batches", 0))

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list["StreamEvent"]:
        """Apply cancellations, admit what fits, run one decode step; return the events produced
        (they are also delivered to the requests' handles)."""
        events: list[StreamEvent] = []
        with self._step_lock, self.engine._lock, torch.inference_mode():
            events += self._apply_inbox()
            events += self._admit()
            if self._running:
                events += self._decode()
            with self._lock:
                self._counts["steps"] += 1
        return events

    def run(self) -> Iterator["StreamEvent"]:
        """Step until every submitted request has finished, yielding all events."""
        while self.has_work():
            yield from self.step()

    def _emit(self, entry: _Entry, event: "StreamEvent", out: list) -> None:
        entry.handle._put(event)
        out.append(event)

    def _apply_inbox(self) -> list["StreamEvent"]:
        from .engine import StreamEvent

        out: list[StreamEvent] = []
        with self._lock:
            while self._inbox:
                self._waiting.append(self._inbox.popleft())
            cancels, self._cancels = self._cancels, set()
        if not cancels:
            return out
        for group in (self._waiting, self._running):
            for e in [e for e in group if e.index in cancels]:
                group.remove(e)
                e.row = None  # drops the row's cache: its storage is freed now
                e.prepared = None
                with self._lock:
                    self._counts["cancelled"] += 1
                self._emit(e, StreamEvent(e.index, e.request_id, "", None,
                                          error=RequestCancelled(f"request {e.request_id} was cancelled")), out)
        return out

    def _fail(self, entry: _Entry, exc: BaseException, out: list) -> None:
        from .engine import StreamEvent

        entry.row = None
        entry.prepared = None
        with self._lock:
            self._counts["failed"] += 1
        self._emit(entry, StreamEvent(entry.index, entry.request_id, "", None, error=exc), out)

    def _admit(self) -> list["StreamEvent"]:
        """Take the next prefill group off the FCFS queue (rows, KV bytes and the step's token budget
        permitting), prefill it together, and let its rows join the running set."""
        out: list[StreamEvent] = []
        if self.policy == "static" and self._running:
            return out
        group: list[_Entry] = []
        in_use = self.kv_bytes_in_use()
        while self._waiting and len(self._running) + len(group) < self.max_num_seqs:
            cand = [e.prepared for e in group] + [self._waiting[0].prepared]
            if group and (self._waiting[0].default != group[0].default
                          or len(cand) * max(self.engine.prefill_length(p, group[0].default) for p in cand)
                          > self.max_num_batched_tokens):
                break  # one default per prefill batch; the step's prefill token budget (padded) is spent
            need = self.group_reservation_bytes(cand, self._waiting[0].default)
            if in_use + need > self.kv_cache_memory_bytes:
                break  # FCFS: wait for rows to retire
            group.append(self._waiting.popleft())
            self._reserved = need
        if group:
            self._peak_in_use = max(self._peak_in_use, in_use + self._reserved)
            self._prefill_group(group, out)
            self._reserved = 0
        self._peak_running = max(self._peak_running, len(self._running))
        n = len(self._running)
        for e in self._running:
            e.max_batch = max(e.max_batch, n)
        self._peak_in_use = max(self._peak_in_use, self.kv_bytes_in_use())
        return out

    def _prefill_group(self, group: list[_Entry], out: list) -> None:
        """Prefill ``group`` in one batch; if that raises, retry its requests one by one so that only
        the failing request fails."""
        now = time.perf_counter()
        prepared = []
        for entry in group:
            entry.admitted = now
            p, entry.prepared = entry.prepared, None
            assert p is not None
            prepared.append(p)
            entry.meta = {"n_prompt": p.prompt.length, "n_text": p.prompt.n_text, "n_visual": p.prompt.n_visual,
                          "n_frames": p.prompt.n_frames}
        rows: list | None = None
        if len(group) > 1:
            try:
                rows = self.engine.prefill_rows(prepared, group[0].default)
                with self._lock:
                    self._counts["prefill_batches"] += 1
            except Exception:  # find the failing request(s): one by one below
                rows = None
        if rows is None:
            rows = []
            for entry, p in zip(group, prepared):
                try:
                    rows.append(self.engine.prefill_rows([p], entry.default)[0])
                except Exception as exc:  # this request fails alone
                    rows.append(exc)
        del prepared
        for entry, row in zip(group, rows):
            if isinstance(row, BaseException):
                self._fail(entry, row, out)
                continue
            try:
                entry.row = row
                entry.row_bytes = row_cache_bytes(row.cache)
                entry.detok = Detokenizer(self.engine.tokenizer, entry.gen.stop)
                entry.generator = make_generators([entry.gen], self.engine.device)[0]
                tok = int(next_tokens(row.logits[None], [entry.gen], [entry.generator])[0])
                row.logits = None  # type: ignore[assignment]
            except Exception as exc:  # this request fails alone
                self._fail(entry, exc, out)
                continue
            entry.first_token = time.perf_counter()
            with self._lock:
                self._counts["admitted"] += 1
            self._running.append(entry)
            self._accept(entry, tok, out)

    def _accept(self, entry: _Entry, tok: int, out: list) -> None:
        """Take one sampled token for a running row: stream its text, retire the row if it finished."""
        from .engine import StreamEvent

        assert entry.detok is not None
        if tok in self.engine._eos:
            entry.finish = "stop"
        else:
            entry.tokens.append(tok)
            delta, stopped = entry.detok.push(tok)
            if stopped:
                entry.finish = "stop"
            elif len(entry.tokens) >= entry.gen.max_new_tokens:
                entry.finish = "length"
            if delta:
                self._emit(entry, StreamEvent(entry.index, entry.request_id, delta, tok), out)
        if entry.finish is not None:
            self._retire(entry, out)

    def _retire(self, entry: _Entry, out: list) -> None:
        from .engine import StreamEvent

        assert entry.detok is not None and entry.row is not None
        rest = entry.detok.flush()
        if rest:
            self._emit(entry, StreamEvent(entry.index, entry.request_id, rest, None), out)
        self._running.remove(entry)
        row, entry.row = entry.row, None
        now = time.perf_counter()
        tpot = entry.decode_s / entry.decode_steps if entry.decode_steps else 0.0
        out_ = row.outcome
        tele = Telemetry(
            method=row.method, budget=row.budget, entropy_variant=out_.entropy_variant,
            n_prompt_tokens=entry.meta["n_prompt"], n_text_tokens=entry.meta["n_text"],
            n_visual_tokens=entry.meta["n_visual"], n_frames=entry.meta["n_frames"],
            n_generated_tokens=len(entry.tokens), kv_bytes_full=row.kv_bytes_full, kv_bytes_kept=row.kv_bytes_kept,
            kv_keep_ratio=row.kv_bytes_kept / row.kv_bytes_full if row.kv_bytes_full else 1.0,
            kv_bytes_allocated=entry.row_bytes, layer_budgets=list(out_.layer_tokens),
            layer_entropies=out_.layer_entropies, prefill_s=row.prefill_s, compress_s=row.compress_s,
            decode_s=entry.decode_s, decode_tokens_per_s=1.0 / tpot if tpot > 0 else 0.0,
            peak_mem_bytes=self._peak.peak_bytes(), peak_mem_kind=self._peak.kind, batch_size=entry.max_batch,
            device=str(self.engine.device), dtype=str(self.engine.dtype).replace("torch.", ""),
            queue_wait_s=entry.admitted - entry.submitted, time_to_first_token_s=entry.first_token - entry.submitted,
            time_per_output_token_s=tpot, e2e_s=now - entry.submitted, kv_bytes_held=entry.row_bytes, preemptions=0,
            budget_floor_applied=out_.budget_floor_applied,
        )
        del row  # the row's cache goes with it
        result = Result(entry.request_id, entry.detok.text, list(entry.tokens), entry.finish or "length", tele)
        with self._lock:
            self._counts["finished"] += 1
        self._emit(entry, StreamEvent(entry.index, entry.request_id, "", None, result), out)

    def _decode(self) -> list["StreamEvent"]:
        out: list[StreamEvent] = []
        rows = list(self._running)
        t0 = time.perf_counter()
        try:
            logits = self._forward(rows)
            synchronize(self.engine.device)
            dt = time.perf_counter() - t0
            results = [(rows, logits, dt)]
        except Exception:  # find the failing row(s): rolled back, retry one by one
            results = []
            for e in rows:
                t1 = time.perf_counter()
                try:
                    lg = self._forward([e])
                except Exception as exc:
                    self._running.remove(e)
                    self._fail(e, exc, out)
                    continue
                results.append(([e], lg, time.perf_counter() - t1))
        for group, logits, dt in results:
            toks = next_tokens(logits, [e.gen for e in group], [e.generator for e in group]).tolist()
            for e, tok in zip(group, toks):
                e.decode_s += dt
                e.decode_steps += 1
                self._accept(e, int(tok), out)
        return out

    def _forward(self, rows: list[_Entry]) -> torch.Tensor:
        caches = [e.row.cache for e in rows]  # type: ignore[union-attr]
        toks = [e.tokens[-1] for e in rows]
        pos = [e.row.next_position + len(e.tokens) - 1 for e in rows]  # type: ignore[union-attr]
        return self.engine.decode_rows(caches, toks, pos)


class EngineLoop:
    """Runs a `Scheduler` on a background thread; requests join the running batch as they arrive.

    ``submit(request) -> RequestHandle`` is thread-safe (preparation runs in the caller's thread);
    iterate the handle (or ``async for`` it from an asyncio loop, e.g. in a Ray Serve replica) for
    token deltas and the final `Result`. Same knobs as `Scheduler`. Use as a context manager, or
    call `shutdown()`; requests still in flight then end with `SchedulerClosed`.
    """

    def __init__(self, engine: "Engine", **scheduler_kwargs):
        self.scheduler = Scheduler(engine, _drive=False, **scheduler_kwargs)
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="meda-engine-loop", daemon=True)
        self._thread.start()

    def submit(self, request: "Request | PreparedRequest", **kwargs) -> RequestHandle:
        if self._stop:
            raise SchedulerClosed("the engine loop was shut down")
        handle = self.scheduler.submit(request, **kwargs)
        with self._wake:
            self._wake.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        handle.cancel()
        with self._wake:
            self._wake.notify()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def _run(self) -> None:
        from .engine import StreamEvent

        sched = self.scheduler
        while True:
            with self._wake:
                while not self._stop and not sched.has_work():
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    break
            try:
                sched.step()
            except Exception as exc:  # an engine-wide failure: end every request in flight, keep serving
                for group in (sched._waiting, sched._running):
                    for e in list(group):
                        group.remove(e)
                        sched._fail(e, exc, [])
        for group in (sched._inbox, sched._waiting, sched._running):
            for e in list(group):
                e.row = None
                e.handle._put(StreamEvent(e.index, e.request_id, "", None,
                                          error=SchedulerClosed("the engine loop was shut down")))
            group.clear()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)

    def __enter__(self) -> "EngineLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def generate_all(scheduler: Scheduler, requests: Sequence["Request | PreparedRequest"], **submit_kwargs) -> Iterator["StreamEvent"]:
    """Submit ``requests`` (index = position) and yield every event until all have finished."""
    for i, r in enumerate(requests):
        scheduler.submit(r, index=i, **submit_kwargs)
    yield from scheduler.run()
