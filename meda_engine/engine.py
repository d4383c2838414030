"""The engine: load a checkpoint, then prefill -> compress -> decode, batched, with explicit positions.

One `generate` call runs this loop for a batch of requests (gpt-fast style, nothing inferred from
cache lengths):

1. **prepare** each request (adapter: chat template, placeholder expansion, pixels, modality mask) and
   compute its positions (M-RoPE for the Qwen-VL family). Preparation has two halves: `Preprocessor`
   (tokenizer + adapter, no weights: runs in any CPU process, e.g. the annotation job's CPU stage, and
   returns a `HostPrompt` of plain numpy arrays) and `Engine.from_host` (the model's side: torch
   tensors for this engine, checked against its vocabulary); `Engine.prepare` is the two composed.
   Positions need the model (its ``get_rope_index``) and are computed at prefill;
2. **prefill** the right-padded batch once into a fresh `RaggedKVCache`; the attention function
   records the statistics each row's method needs;
3. **compress** each row's cache (scorer -> per-layer allocation -> selection -> merge); every layer
   then physically holds only its kept tokens;
4. optionally **extend** with the deferred query tokens (query-agnostic protocol);
5. **decode** one token per row per step; row ``b``'s ``s``-th generated token is fed at logical
   position ``next_position[b] + s``, i.e. positions continue from the original prompt length no
   matter how much was evicted.

Per-request compression and sampling settings travel with the request; the engine holds no
per-request state between calls, and a lock serialises concurrent calls on one model.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import hf_glue
from .attention import ForwardContext, PrefillStats
from .cache import RaggedKVCache, RowBatchCache, restore_lengths, snapshot_lengths, split_rows, truncate_rows
from .compression import CompressionOutcome, build_method, compress_cache
from .config import RECONSTRUCTION_METHODS, CompressionConfig, ConfigError, GenerationConfig
from .memory import PeakMemory, synchronize
from .models import ModelAdapter, PreparedPrompt, build_adapter
from .models.loading import load_preprocessor_config, resolve_source
from .request import Request, Result, Telemetry
from .sampling import make_generators, next_tokens


@dataclass
class PreparedRequest:
    """A request whose prompt was already tokenised and preprocessed (`Engine.prepare`)."""

    request: Request
    prompt: PreparedPrompt
    generation: GenerationConfig


@dataclass
class HostPrompt:
    """A `PreparedPrompt` as plain numpy arrays and small fields: what `Preprocessor.preprocess` returns
    in a process without the model, and what `Engine.from_host` takes (picklable; no torch inside).

    Shapes as `PreparedPrompt`: ``input_ids (L,)`` int64, ``modality (L,)`` int8; ``vision`` holds the
    patchified, normalised pixel rows (``pixel_values (N, D)`` float32, ``pixel_values_videos``) and their
    grids (``image_grid_thw (k, 3)`` int64, ``video_grid_thw``), keyed as the model's forward names them.
    ``family`` is the adapter family that produced it (`Engine.from_host` refuses another one's)."""

    input_ids: np.ndarray
    modality: np.ndarray
    vision: dict[str, np.ndarray]
    n_context: int
    n_frames: int
    extra: dict[str, Any]
    family: str

    @classmethod
    def from_prompt(cls, prompt: PreparedPrompt, family: str) -> "HostPrompt":
        """The numpy view of ``prompt`` (no copy: the arrays share the CPU tensors' memory)."""
        return cls(input_ids=prompt.input_ids.numpy(), modality=prompt.modality.numpy(),
                   vision={k: v.numpy() for k, v in prompt.vision.items()}, n_context=int(prompt.n_context),
                   n_frames=int(prompt.n_frames), extra=dict(prompt.extra), family=family)

    def to_prompt(self) -> PreparedPrompt:
        """Back to CPU tensors; arrays that arrived read-only (e.g. zero-copy from Ray's object store)
        are copied, the others are shared."""
        return PreparedPrompt(
            input_ids=_tensor(self.input_ids, np.int64), modality=_tensor(self.modality, np.int8),
            vision={k: _tensor(v) for k, v in self.vision.items()}, n_context=int(self.n_context),
            n_frames=int(self.n_frames), extra=dict(self.extra),
        )

    @property
    def nbytes(self) -> int:
        return int(self.input_ids.nbytes + self.modality.nbytes + sum(v.nbytes for v in self.vision.values()))


def _tensor(a: np.ndarray, dtype: Any = None) -> torch.Tensor:
    a = np.asarray(a, dtype=dtype)
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, order="C")
    return torch.from_numpy(a)


class Preprocessor:
    """The CPU half of `Engine.prepare`: chat template, tokenisation, placeholder expansion, pixel resize
    + patchify, the context-length check. Needs the checkpoint's config, tokenizer and preprocessor
    config only (no weights, no device), so it can run in CPU workers apart from the model; the result
    (`HostPrompt`) is plain numpy for shipping between processes."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter

    @classmethod
    def from_pretrained(cls, source: str, *, cache_dir: str | None = None, revision: str | None = None,
                        storage_options: dict | None = None, max_pixels_per_frame: int | None = None,
                        gguf_file: str | None = None) -> "Preprocessor":
        """The preprocessor of the checkpoint `Engine.from_pretrained` would load from the same arguments."""
        ckpt = resolve_source(source, gguf_file=gguf_file, cache_dir=cache_dir, revision=revision,
                              storage_options=storage_options)
        return cls(_build_adapter(ckpt.path, ckpt.gguf_file, max_pixels_per_frame)[2])

    @property
    def family(self) -> str:
        return self.adapter.family

    def preprocess(self, request: Request, *, max_new_tokens: int | None = None) -> HostPrompt:
        """Tokenise and preprocess ``request`` (``max_new_tokens``: the tokens it will generate, for the
        context check; default its own generation config's). Raises on a request that cannot run
        (e.g. `ContextLengthError`)."""
        n_new = request.generation.max_new_tokens if max_new_tokens is None else max_new_tokens
        return HostPrompt.from_prompt(self.adapter.prepare(request, max_new_tokens=n_new), self.adapter.family)


def _build_adapter(path: Path, gguf_file: str | None, max_pixels_per_frame: int | None):
    config, tokenizer = hf_glue.load_config_and_tokenizer(str(path), gguf_file)
    kwargs = {"max_pixels_per_frame": max_pixels_per_frame} if max_pixels_per_frame else {}
    return config, tokenizer, build_adapter(config, tokenizer, load_preprocessor_config(Path(path)), **kwargs)


@dataclass
class StreamEvent:
    """Emitted by `Engine.stream` and the scheduler: new text for one request, and, as its last event,
    either its `Result` (finished) or the exception that ended it (``error``: it failed or was
    cancelled; its batch-mates carry on)."""

    index: int  # position of the request in the call (scheduler: its submission number)
    request_id: str
    delta: str
    token_id: int | None
    result: Result | None = None
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None


@dataclass
class RowState:
    """One request after prefill + compression (+ extend), ready to join the decode batch.

    ``cache`` is a one-row `RaggedKVCache`: per layer its own ``(1, H_kv, kept_l + room, D)`` K/V,
    nothing shared with any other row. ``logits (V,)`` float32 give the first new token. Prefill-only
    state (collated pixels, statistics, the prompt's tensors) is not kept here.
    """

    cache: RaggedKVCache
    logits: torch.Tensor
    next_position: int  # logical position of the first generated token
    outcome: CompressionOutcome
    method: str
    budget: float | int
    kv_bytes_full: int
    kv_bytes_kept: int
    prefill_s: float
    compress_s: float


@dataclass
class _Prefilled:
    """A padded batch after prefill + compression (`Engine._prefill_padded`)."""

    cache: RaggedKVCache
    logits: torch.Tensor  # (B, vocab) float32, from each row's last context token
    positions: list  # per row: (positions (axes, n), next position)
    comps: list[CompressionConfig]
    methods: list
    outcomes: list[CompressionOutcome]
    kv_full: list[int]
    kv_kept: list[int]
    prefill_s: float
    compress_s: float


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[dtype]


class Engine:
    def __init__(self, model: Any, tokenizer: Any, adapter: ModelAdapter, *, source: str = "",
                 max_batch_size: int = 16, stats_chunk_bytes: int = 64 * 2**20):
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.source = source
        self.max_batch_size = max_batch_size
        self.stats_chunk_bytes = stats_chunk_bytes
        self.dims = hf_glue.text_dims(model.config)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._lock = threading.Lock()
        self._eos = set(adapter.eos_token_ids)
        self.preprocessor = Preprocessor(adapter)
        self._vocab = int(getattr(adapter.text_config, "vocab_size", 0) or 0) or None
        # what was loaded: source, format ("hf" / "gguf"), source quantisation (GGUF), compute dtype
        self.model_info: dict[str, Any] = {"source": source, "format": "hf", "quantization": None,
                                           "dtype": str(self.dtype).replace("torch.", "")}

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source: str, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                        cache_dir: str | None = None, revision: str | None = None,
                        storage_options: dict | None = None, max_pixels_per_frame: int | None = None,
                        gguf_file: str | None = None, **engine_kwargs) -> "Engine":
        """Load from a hub id, a local checkpoint directory, an ``s3://`` prefix, or a GGUF checkpoint
        (a ``.gguf`` file, a directory holding one, or a hub id with ``gguf_file``; see
        `resolve_source`). GGUF weights are dequantised to ``dtype``; ``engine.model_info`` names the
        source quantisation."""
        ckpt = resolve_source(source, gguf_file=gguf_file, cache_dir=cache_dir, revision=revision,
                              storage_options=storage_options)
        path = ckpt.path
        config, tokenizer, adapter = _build_adapter(path, ckpt.gguf_file, max_pixels_per_frame)
        dev = _resolve_device(device)
        model = hf_glue.load_model(str(path), config, multimodal=adapter.multimodal,
                                   dtype=_resolve_dtype(dtype, dev), device=dev, gguf_file=ckpt.gguf_file)
        engine = cls(model, tokenizer, adapter, source=str(source), **engine_kwargs)
        engine.model_info.update(ckpt.info(str(source)))
        return engine

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, preprocessor_config: dict | None = None,
                   **engine_kwargs) -> "Engine":
        """Wrap an already-built model (switching its decoder to the engine's attention)."""
        hf_glue.use_engine_attention(model)
        adapter = build_adapter(model.config, tokenizer, preprocessor_config)
        return cls(model.eval(), tokenizer, adapter, **engine_kwargs)

    # ---- public API -----------------------------------------------------------------------------
    def prepare(self, request: Request, *, max_new_tokens: int | None = None) -> PreparedRequest:
        """Tokenise and preprocess (CPU only). Raises on a request that cannot run.

        The same as ``from_host(request, preprocessor.preprocess(request))``: a `Preprocessor` in another
        process (no model) gives the same prepared request."""
        gen = request.generation
        if max_new_tokens is not None:
            gen = dataclasses.replace(gen, max_new_tokens=max_new_tokens)
        return self.from_host(request, self.preprocessor.preprocess(request, max_new_tokens=gen.max_new_tokens), gen)

    def from_host(self, request: Request, host: HostPrompt, generation: GenerationConfig | None = None) -> PreparedRequest:
        """The model's half of `prepare`: a `HostPrompt` (from a `Preprocessor` of this checkpoint,
        possibly in another process) as the engine's prepared request. ``request`` supplies the id,
        the compression and (unless ``generation`` is given) the generation settings; its media are not
        read again, so a request without them will do. The tensors stay on the CPU until prefill, when
        the batch is collated onto the device (requests waiting in a queue hold no device memory)."""
        if host.family != self.adapter.family:
            raise ConfigError(f"the prompt was prepared for a {host.family} model; this engine runs "
                              f"{self.adapter.family}")
        prompt = host.to_prompt()
        if prompt.input_ids.ndim != 1 or prompt.modality.shape != prompt.input_ids.shape or prompt.length == 0:
            raise ConfigError(f"malformed prepared prompt: input_ids {tuple(prompt.input_ids.shape)}, "
                              f"modality {tuple(prompt.modality.shape)}")
        if self._vocab is not None and (int(prompt.input_ids.max()) >= self._vocab or int(prompt.input_ids.min()) < 0):
            raise ConfigError(f"prepared prompt has token ids outside this model's vocabulary of {self._vocab} "
                              f"(prepared with another tokenizer?)")
        return PreparedRequest(request, prompt, generation or request.generation)

    def generate(self, requests: Sequence[Request | PreparedRequest], *,
                 compression: CompressionConfig | None = None, max_new_tokens: int | None = None) -> list[Result]:
        """Run ``requests`` to completion through a `Scheduler` (continuous batching, at most
        ``max_batch_size`` rows at once). Results come in request order; if a request failed inside
        the engine, its batch-mates still finish and then its exception is raised."""
        results: list[Result | None] = [None] * len(requests)
        error: BaseException | None = None
        for event in self.stream(requests, compression=compression, max_new_tokens=max_new_tokens):
            if event.result is not None:
                results[event.index] = event.result
            elif event.error is not None and error is None:
                error = event.error
        if error is not None:
            raise error
        return [r for r in results if r is not None]

    def stream(self, requests: Sequence[Request | PreparedRequest], *,
               compression: CompressionConfig | None = None, max_new_tokens: int | None = None,
               **scheduler_kwargs) -> Iterator[StreamEvent]:
        """Like `generate`, but yields text as it is produced: token deltas, then one last event per
        request with its ``result`` (or its ``error``). ``scheduler_kwargs`` go to `Scheduler`
        (``max_num_seqs`` defaults to ``max_batch_size``). Invalid requests raise before any runs."""
        from .scheduler import Scheduler, generate_all

        if not requests:
            return
        scheduler_kwargs.setdefault("max_num_seqs", self.max_batch_size)
        sched = Scheduler(self, default_compression=compression or CompressionConfig(method="full"), **scheduler_kwargs)
        prepared = [r if isinstance(r, PreparedRequest) else self.prepare(r, max_new_tokens=max_new_tokens)
                    for r in requests]
        yield from generate_all(sched, prepared, max_new_tokens=max_new_tokens)

    def generate_static(self, requests: Sequence[Request | PreparedRequest], *,
                        compression: CompressionConfig | None = None, max_new_tokens: int | None = None) -> list[Result]:
        """The static padded-batch path (`stream_static`), kept as the baseline and reference."""
        results: list[Result | None] = [None] * len(requests)
        for event in self.stream_static(requests, compression=compression, max_new_tokens=max_new_tokens):
            if event.result is not None:
                results[event.index] = event.result
        return [r for r in results if r is not None]

    def stream_static(self, requests: Sequence[Request | PreparedRequest], *,
                      compression: CompressionConfig | None = None, max_new_tokens: int | None = None) -> Iterator[StreamEvent]:
        """Static batching: chunks of ``max_batch_size`` requests, each prefilled together into one
        padded `RaggedKVCache` (a layer's block is sized by the batch's longest row) and decoded until
        its slowest row ends. The baseline the scheduler is measured against; prefer `stream`."""
        if not requests:
            return
        prepared = [
            r if isinstance(r, PreparedRequest) else self.prepare(r, max_new_tokens=max_new_tokens) for r in requests
        ]
        if max_new_tokens is not None:
            prepared = [
                p if p.generation.max_new_tokens == max_new_tokens
                else dataclasses.replace(p, generation=dataclasses.replace(p.generation, max_new_tokens=max_new_tokens))
                for p in prepared
            ]
        default = compression or CompressionConfig(method="full")
        for start in range(0, len(prepared), self.max_batch_size):
            chunk = prepared[start : start + self.max_batch_size]
            with self._lock:
                for event in self._run_batch(chunk, default):
                    event.index += start
                    yield event

    # ---- the loop ---------------------------------------------------------------------------------
    def _prefill_padded(self, batch: list[PreparedRequest], default: CompressionConfig, reserve: int) -> _Prefilled:
        """Prefill ``batch`` right-padded into one fresh `RaggedKVCache` (``reserve`` free slots per layer
        after each row's tokens), then compress every row with its own method. The collated pixels and
        the statistics are dropped before this returns."""
        dev, adapter, dims = self.device, self.adapter, self.dims
        bsz = len(batch)
        prompts = [p.prompt for p in batch]
        comps = [p.request.compression or default for p in batch]
        methods = [build_method(c) for c in comps]
        positions = [adapter.positions(self.model, p) for p in prompts]
        n_ctx = [p.n_context for p in prompts]
        ctx_pad = max(n_ctx)
        axes = adapter.position_axes

        input_ids = torch.full((bsz, ctx_pad), adapter.pad_token_id, dtype=torch.long)
        pos = torch.zeros((axes, bsz, ctx_pad), dtype=torch.long)
        mm_types = torch.zeros((bsz, ctx_pad), dtype=torch.int32)
        for b, p in enumerate(prompts):
            n = n_ctx[b]
            input_ids[b, :n] = p.input_ids[:n]
            pos[:, b, :n] = positions[b][0][:, :n]
            mm_types[b, :n] = p.modality[:n].to(torch.int32)
        vision = adapter.collate_vision(prompts, dev)

        row_plans = [m.row_plan(p.modality[: n_ctx[b]], n_ctx[b]) for b, (m, p) in enumerate(zip(methods, prompts))]
        plans = [rp[0] for rp in row_plans]
        variants = [rp[1] for rp in row_plans]
        input_ids, pos, mm_types, fwd_len = self._with_reconstruction(prompts, plans, positions, input_ids, pos,
                                                                      mm_types)
        stats = PrefillStats(plans, dims.n_layers, self.stats_chunk_bytes) if any(p.any for p in plans) else None
        cache = RaggedKVCache(dims.n_layers, bsz, reserve=reserve)

        # -- prefill
        t0 = time.perf_counter()
        hidden = self.forward(cache, "prefill", input_ids, pos, fwd_len, vision=vision, modality=mm_types, stats=stats)
        del vision
        last = hidden[torch.arange(bsz, device=dev), torch.tensor(n_ctx, device=dev) - 1]
        logits = hf_glue.lm_head(self.model)(last).float()
        del hidden
        if fwd_len != n_ctx:  # KVzip rows: drop the reconstruction's K/V, keep the context's
            truncate_rows(cache, n_ctx, reserve)
        synchronize(dev)
        t1 = time.perf_counter()
        kv_full = [cache.row_bytes(b) for b in range(bsz)]

        # -- compress
        if any(m.scorer is not None for m in methods):
            outcomes = compress_cache(cache, stats, methods, [p.modality[: n_ctx[b]] for b, p in enumerate(prompts)],
                                      n_ctx, variants, reserve=reserve)
        else:
            outcomes = [CompressionOutcome(cache.layer_lengths(b), None, None) for b in range(bsz)]
        del stats
        synchronize(dev)
        t2 = time.perf_counter()
        kv_kept = [cache.row_bytes(b) for b in range(bsz)]
        return _Prefilled(cache, logits, positions, comps, methods, outcomes, kv_full, kv_kept, t1 - t0, t2 - t1)

    def _with_reconstruction(self, prompts, plans, positions, input_ids, pos, mm_types):
        """Append each KVzip row's reconstruction prompt (`ModelAdapter.reconstruction_ids`) after its
        context, at the following positions, and tell its plan where the context ends. Returns the
        (possibly wider) inputs and each row's forward length."""
        n_ctx = [p.n_context for p in prompts]
        extra = [self.adapter.reconstruction_ids(p) if plan.reconstruct else None for p, plan in zip(prompts, plans)]
        if all(e is None for e in extra):
            return input_ids, pos, mm_types, n_ctx
        fwd_len = [n + (0 if e is None else int(e.numel())) for n, e in zip(n_ctx, extra)]
        width = max(fwd_len)
        bsz, axes = len(prompts), pos.shape[0]
        ids = torch.full((bsz, width), self.adapter.pad_token_id, dtype=torch.long)
        new_pos = torch.zeros((axes, bsz, width), dtype=torch.long)
        types = torch.zeros((bsz, width), dtype=torch.int32)
        ids[:, : input_ids.shape[1]] = input_ids
        new_pos[:, :, : pos.shape[2]] = pos
        types[:, : mm_types.shape[1]] = mm_types
        for b, e in enumerate(extra):
            if e is None:
                continue
            n, r = n_ctx[b], int(e.numel())
            ids[b, n : n + r] = e
            new_pos[:, b, n : n + r] = positions[b][0][:, n - 1 : n] + torch.arange(1, r + 1)[None]
            plans[b].n_context = n
        return ids, new_pos, types, fwd_len

    def prefill_length(self, prepared: PreparedRequest, default: CompressionConfig | None = None) -> int:
        """Tokens the prefill forward runs for ``prepared``: its context, plus KVzip's reconstruction
        prompt when its method is ``kvzip`` or ``kvzip-global`` (what a prefill's memory and token budget must count)."""
        p = prepared.prompt
        comp = prepared.request.compression or default
        if comp is not None and comp.method in RECONSTRUCTION_METHODS and comp.keep_fraction(p.n_context) < 1.0:
            try:
                return p.n_context + int(self.adapter.reconstruction_ids(p).numel())
            except ConfigError:
                return p.n_context  # the prefill raises it, for this request alone
        return p.n_context

    @torch.inference_mode()
    def _run_batch(self, batch: list[PreparedRequest], default: CompressionConfig) -> Iterator[StreamEvent]:
        dev, adapter = self.device, self.adapter
        bsz = len(batch)
        prompts = [p.prompt for p in batch]
        gens = [p.generation for p in batch]
        n_ctx = [p.n_context for p in prompts]
        n_query = [p.length - p.n_context for p in prompts]
        query_pad = max(n_query)
        max_new = max(g.max_new_tokens for g in gens)
        axes = adapter.position_axes
        peak = PeakMemory(dev)
        peak.reset()
        pre = self._prefill_padded(batch, default, reserve=max_new + query_pad)
        cache, logits, positions, comps, methods, outcomes = (pre.cache, pre.logits, pre.positions, pre.comps,
                                                              pre.methods, pre.outcomes)
        kv_full, kv_kept = pre.kv_full, pre.kv_kept

        # -- extend with the deferred query (query-agnostic protocol)
        if query_pad:
            q_ids = torch.full((bsz, query_pad), adapter.pad_token_id, dtype=torch.long)
            q_pos = torch.zeros((axes, bsz, query_pad), dtype=torch.long)
            for b, p in enumerate(prompts):
                q_ids[b, : n_query[b]] = p.input_ids[n_ctx[b]:]
                q_pos[:, b, : n_query[b]] = positions[b][0][:, n_ctx[b]:]
            hidden = self.forward(cache, "extend", q_ids, q_pos, n_query)
            for b in range(bsz):
                if n_query[b]:
                    logits[b] = hf_glue.lm_head(self.model)(hidden[b, n_query[b] - 1]).float()
            del hidden

        # -- decode
        generators = make_generators(gens, dev)
        next_pos = torch.tensor([pp[1] for pp in positions], dtype=torch.long)
        generated: list[list[int]] = [[] for _ in range(bsz)]
        emitted = [""] * bsz
        finish: list[str | None] = [None] * bsz
        t3 = time.perf_counter()
        step = 0
        while True:
            tokens = next_tokens(logits, gens, generators).tolist()
            for b in range(bsz):
                if finish[b] is not None:
                    continue
                tok = int(tokens[b])
                if tok in self._eos:
                    finish[b] = "stop"
                else:
                    generated[b].append(tok)
                    text, stopped = self._text(generated[b], gens[b])
                    if stopped:
                        finish[b] = "stop"
                    elif len(generated[b]) >= gens[b].max_new_tokens:
                        finish[b] = "length"
                    delta = text[len(emitted[b]):] if text.startswith(emitted[b]) else text
                    if delta and not text.endswith("\ufffd"):
                        emitted[b] = text
                        yield StreamEvent(b, batch[b].request.request_id, delta, tok)
            if all(f is not None for f in finish):
                break
            feed = torch.tensor(
                [generated[b][-1] if finish[b] is None else adapter.pad_token_id for b in range(bsz)], dtype=torch.long
            )[:, None]
            logits = self.decode_step(cache, feed[:, 0], next_pos + step)
            step += 1
        synchronize(dev)
        t4 = time.perf_counter()
        peak_bytes = peak.peak_bytes()
        allocated = cache.allocated_bytes()
        decode_s = t4 - t3

        for b, item in enumerate(batch):
            text, _ = self._text(generated[b], gens[b])
            p, m, out = prompts[b], methods[b], outcomes[b]
            n_gen = len(generated[b])
            tele = Telemetry(
                method=m.name,
                budget=comps[b].keep_fraction(n_ctx[b]),
                entropy_variant=out.entropy_variant,
                n_prompt_tokens=p.length,
                n_text_tokens=p.n_text,
                n_visual_tokens=p.n_visual,
                n_frames=p.n_frames,
                n_generated_tokens=n_gen,
                kv_bytes_full=kv_full[b],
                kv_bytes_kept=kv_kept[b],
                kv_keep_ratio=kv_kept[b] / kv_full[b] if kv_full[b] else 1.0,
                kv_bytes_allocated=allocated,
                layer_budgets=list(out.layer_tokens),
                layer_entropies=out.layer_entropies,
                prefill_s=pre.prefill_s,
                compress_s=pre.compress_s,
                decode_s=decode_s,
                decode_tokens_per_s=(max(n_gen - 1, 0) / decode_s) if decode_s > 0 else 0.0,
                peak_mem_bytes=peak_bytes,
                peak_mem_kind=peak.kind,
                batch_size=bsz,
                device=str(dev),
                dtype=str(self.dtype).replace("torch.", ""),
                budget_floor_applied=out.budget_floor_applied,
            )
            result = Result(item.request.request_id, text, list(generated[b]), finish[b] or "length", tele)
            yield StreamEvent(b, item.request.request_id, "", None, result)

    # ---- the scheduler's two model operations ------------------------------------------------------
    def prefill_row(self, prepared: PreparedRequest, default: CompressionConfig | None = None) -> RowState:
        """`prefill_rows` for one request."""
        return self.prefill_rows([prepared], default)[0]

    @torch.inference_mode()
    def prefill_rows(self, batch: Sequence[PreparedRequest], default: CompressionConfig | None = None) -> list[RowState]:
        """Prefill ``batch`` together (one right-padded forward), compress each row with its own method,
        give each row its own one-row cache (`split_rows`: its kept tokens plus its decode room, nothing
        shared), feed each row's deferred query tokens, and return the rows ready to decode.

        One request is prefilled straight into its own cache. For several, the padded block holds no
        decode room and is released layer by layer as the rows are copied out, so the peak is the padded
        block plus one layer. The collated pixels and the statistics are dropped before this returns
        (only the rows' caches and first logits survive). ``prefill_s`` / ``compress_s`` of a batched
        prefill are the batch's."""
        batch = list(batch)
        if not batch:
            return []
        default = default or CompressionConfig(method="full")
        reserves = [p.generation.max_new_tokens + (p.prompt.length - p.prompt.n_context) for p in batch]
        pre = self._prefill_padded(batch, default, reserve=reserves[0] if len(batch) == 1 else 0)
        caches = [pre.cache] if len(batch) == 1 else split_rows(pre.cache, reserves)
        del pre.cache
        rows = []
        for b, (p, cache) in enumerate(zip(batch, caches)):
            n_ctx = p.prompt.n_context
            n_query = p.prompt.length - n_ctx
            logits = pre.logits[b].clone()  # not a view: no row keeps the batch's logits alive
            if n_query:
                positions = pre.positions[b][0]
                hidden = self.forward(cache, "extend", p.prompt.input_ids[None, n_ctx:], positions[:, None, n_ctx:],
                                      [n_query])
                logits = hf_glue.lm_head(self.model)(hidden[0, n_query - 1]).float()
                del hidden
            rows.append(RowState(cache, logits, int(pre.positions[b][1]), pre.outcomes[b], pre.methods[b].name,
                                 pre.comps[b].keep_fraction(n_ctx), pre.kv_full[b], pre.kv_kept[b],
                                 pre.prefill_s, pre.compress_s))
        return rows

    @torch.inference_mode()
    def decode_rows(self, caches: Sequence[RaggedKVCache], token_ids: Sequence[int],
                    positions: Sequence[int]) -> torch.Tensor:
        """One decode step over rows that own their caches (`RowBatchCache`): feed ``token_ids[b]`` at
        logical position ``positions[b]`` to row ``b``; return logits ``(B, vocab)`` float32. If the
        forward raises, every row's cache is rolled back to its length before the step."""
        before = [snapshot_lengths(c) for c in caches]
        try:
            ids = torch.tensor(list(token_ids), dtype=torch.long)
            pos = torch.tensor(list(positions), dtype=torch.long)
            return self.decode_step(RowBatchCache(list(caches)), ids, pos)
        except BaseException:
            for c, n in zip(caches, before):
                restore_lengths(c, n)
            raise

    def forward(self, cache: RaggedKVCache, phase: str, input_ids: torch.Tensor, positions: torch.Tensor,
                new_lengths: list[int], *, vision: dict[str, torch.Tensor] | None = None,
                modality: torch.Tensor | None = None, stats: PrefillStats | None = None) -> torch.Tensor:
        """One model forward of ``input_ids (B, q)`` at ``positions (axes, B, q)``, writing into
        ``cache``; ``new_lengths[b]`` of the ``q`` tokens of row ``b`` are real (the rest pad).
        Returns the last hidden states ``(B, q, hidden)``."""
        dev = self.device
        cache.begin_forward(new_lengths, dev)
        if modality is None and self.adapter.multimodal:
            modality = torch.zeros_like(input_ids, dtype=torch.int32)
        return hf_glue.base_forward(
            self.model, input_ids=input_ids.to(dev), position_ids=self.adapter.model_position_ids(positions).to(dev),
            cache=cache, context=ForwardContext(cache, phase, stats), vision=vision or {},
            mm_token_type_ids=None if modality is None else modality.to(dev),
        )

    def decode_step(self, cache: RaggedKVCache, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``token_ids (B,)`` at logical ``positions (B,)``); return the next
        token's logits ``(B, vocab)`` in float32."""
        axes = self.adapter.position_axes
        pos = positions.view(1, -1, 1).expand(axes, -1, -1)
        hidden = self.forward(cache, "decode", token_ids.view(-1, 1), pos, [1] * token_ids.shape[0])
        return hf_glue.lm_head(self.model)(hidden[:, -1]).float()

    def _text(self, ids: list[int], gen: GenerationConfig) -> tuple[str, bool]:
        """Decoded text, cut at the first stop string (and whether one was found)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in gen.stop:
            i = text.find(s)
            if s and i >= 0:
                return text[:i], True
        return text, False
