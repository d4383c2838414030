"""One prefill per prompt, shared by every compression config of an accuracy matrix.

`Engine.generate` prefills each request on its own, recording only the statistics its method needs.
An accuracy matrix asks the same prompt under many (method, budget) configs, and the prefill (plus
its statistics) is most of the work of one answer. Here a prompt is prefilled **once**, recording
the union of the statistics every config needs (`union_plan`); then each config gets its own copy
of the uncompressed cache and of the statistics, is compressed by the engine's own
`compress_cache`, fed its deferred query tokens and decoded exactly as the scheduler decodes one row
(`Engine.decode_rows`, the same greedy/sampling and stop rules). Nothing a config does reaches the
shared prefill: `compress_cache` replaces layer buffers and clears the statistics it used, and the
decode writes into the cache, so both are copied per config (a copy of the K/V is a memcpy, far
cheaper than a prefill).

The answers equal those of `Engine.generate` token for token (``tests/test_quality_shared_prefill.py``):
the prefill's K/V and hidden states do not depend on which statistics are recorded (they are computed
after the attention output, from the same queries and keys), and the statistics a config reads are
the same tensors its own prefill would record. Configs whose statistics are recorded differently
(another ``score_queries`` or observation ``window``) cannot share one prefill: `union_plan` raises.

    shared = prefill(engine, prepared, configs)   # prepared: a PreparedRequest (explicit n_context)
    for cfg in configs:
        ans = answer(engine, shared, cfg)          # ans.text, ans.token_ids, ans.kv_keep_ratio, ...
    answers = answer_many(engine, shared, configs) # or: their decodes batched, as the scheduler's rows
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from meda_engine import hf_glue
from meda_engine.attention import PrefillStats, RowPlan
from meda_engine.cache import RaggedKVCache, truncate_rows
from meda_engine.compression import CompressionOutcome, build_method, compress_cache
from meda_engine.config import CompressionConfig
from meda_engine.detokenizer import Detokenizer
from meda_engine.memory import synchronize
from meda_engine.sampling import make_generators, next_tokens


def union_plan(configs: Sequence[CompressionConfig], modality: torch.Tensor, length: int) -> RowPlan:
    """The prefill statistics that serve every config: the union of their `RowPlan`s. Raises
    ``ValueError`` when two configs need the same statistic recorded differently."""
    plans = [build_method(c).row_plan(modality, length)[0] for c in configs]
    rows = {p.score_queries for p in plans if p.column_sums or p.row_entropy}
    windows = {p.window for p in plans if p.window}
    if len(rows) > 1:
        raise ValueError(f"configs score different query rows (score_queries {sorted(rows)}): one prefill cannot serve them")
    if len(windows) > 1:
        raise ValueError(f"configs use different observation windows {sorted(windows)}: one prefill cannot serve them")
    return RowPlan(
        column_sums=any(p.column_sums for p in plans),
        row_entropy=any(p.row_entropy for p in plans),
        score_queries=rows.pop() if rows else 0,
        window=windows.pop() if windows else 0,
        cross_modal=any(p.cross_modal for p in plans),
        modality=modality,
        reconstruct=any(p.reconstruct for p in plans),
    )


@dataclass
class SharedPrefill:
    """A prompt prefilled once: its uncompressed cache and statistics (never modified by `answer`)."""

    prepared: Any  # the PreparedRequest
    cache: RaggedKVCache
    stats: PrefillStats | None
    logits: torch.Tensor  # (V,) float32 after the last context token
    positions: torch.Tensor
    next_position: int
    reserve: int
    kv_bytes_full: int
    prefill_s: float


@dataclass
class SharedAnswer:
    text: str
    token_ids: list[int]
    finish: str
    n_prompt_tokens: int
    kv_keep_ratio: float
    layer_budgets: list[int]
    layer_entropies: list[float] | None
    entropy_variant: str | None
    compress_s: float
    decode_s: float  # extend (deferred query) + decode


@torch.inference_mode()
def prefill(engine, prepared, configs: Sequence[CompressionConfig]) -> SharedPrefill:
    """Prefill ``prepared.prompt[:n_context]`` once with the statistics all ``configs`` need."""
    p, gen = prepared.prompt, prepared.generation
    dev = engine.device
    n_ctx = p.n_context
    positions, next_pos = engine.adapter.positions(engine.model, p)
    reserve = gen.max_new_tokens + (p.length - n_ctx)
    plan = union_plan(configs, p.modality[:n_ctx], n_ctx)
    stats = PrefillStats([plan], engine.dims.n_layers, engine.stats_chunk_bytes) if plan.any else None
    cache = RaggedKVCache(engine.dims.n_layers, 1, reserve=reserve)
    vision = engine.adapter.collate_vision([p], dev)
    # KVzip in the union: its reconstruction prompt follows the context in this same forward (the other
    # statistics and the K/V kept see the context alone), then its K/V are dropped
    ids, pos, types, fwd_len = engine._with_reconstruction(
        [p], [plan], [(positions, next_pos)], p.input_ids[None, :n_ctx], positions[:, None, :n_ctx],
        p.modality[None, :n_ctx].to(torch.int32))
    t0 = time.perf_counter()
    hidden = engine.forward(cache, "prefill", ids, pos, fwd_len, vision=vision, modality=types, stats=stats)
    logits = hf_glue.lm_head(engine.model)(hidden[0, n_ctx - 1]).float()
    del hidden, vision
    if fwd_len != [n_ctx]:
        truncate_rows(cache, [n_ctx], reserve)
    synchronize(dev)
    return SharedPrefill(prepared, cache, stats, logits, positions, int(next_pos), reserve, cache.row_bytes(0),
                         time.perf_counter() - t0)


def copy_cache(cache: RaggedKVCache, reserve: int) -> RaggedKVCache:
    """A one-row cache holding copies of ``cache``'s valid K/V, with the same capacity per layer."""
    layers = []
    for layer in cache.layers:
        n = layer.lengths_host[0]
        layers.append((layer.keys[:, :, :n], layer.values[:, :, :n], [n]))  # from_tensors copies
    return RaggedKVCache.from_tensors(layers, reserve)


def copy_stats(stats: PrefillStats | None) -> PrefillStats | None:
    """Fresh per-layer records (`compress_cache` clears the ones it used); the score tensors are read,
    never written, by the scorers and selection, so the copies share them."""
    if stats is None:
        return None
    out = PrefillStats(stats.plans, stats.n_layers, stats.chunk_bytes)
    out.layers = [[dataclasses.replace(rec) for rec in layer] for layer in stats.layers]
    return out


@dataclass
class _Row:
    cache: RaggedKVCache
    outcome: CompressionOutcome
    kv_kept: int
    compress_s: float
    logits: torch.Tensor
    detok: Detokenizer
    generator: Any
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None
    decode_s: float = 0.0


def _start(engine, shared: SharedPrefill, config: CompressionConfig) -> _Row:
    """Compress a copy of the shared prefill with ``config`` and feed the deferred query tokens."""
    p, gen = shared.prepared.prompt, shared.prepared.generation
    dev = engine.device
    n_ctx = p.n_context
    n_query = p.length - n_ctx
    method = build_method(config)
    _, variant = method.row_plan(p.modality[:n_ctx], n_ctx)
    t0 = time.perf_counter()
    cache = copy_cache(shared.cache, shared.reserve)
    if method.scorer is not None:
        outcome = compress_cache(cache, copy_stats(shared.stats), [method], [p.modality[:n_ctx]], [n_ctx], [variant],
                                 reserve=shared.reserve)[0]
    else:
        outcome = CompressionOutcome(cache.layer_lengths(0), None, None)
    synchronize(dev)
    t1 = time.perf_counter()
    kv_kept = cache.row_bytes(0)
    logits = shared.logits
    if n_query:
        hidden = engine.forward(cache, "extend", p.input_ids[None, n_ctx:], shared.positions[:, None, n_ctx:], [n_query])
        logits = hf_glue.lm_head(engine.model)(hidden[0, n_query - 1]).float()
        del hidden
    synchronize(dev)
    row = _Row(cache, outcome, kv_kept, t1 - t0, logits, Detokenizer(engine.tokenizer, gen.stop),
               make_generators([gen], dev)[0])
    row.decode_s = time.perf_counter() - t1
    return row


def _accept(engine, row: _Row, tok: int, max_new_tokens: int) -> None:
    """One sampled token for a row, with the scheduler's stop rules (`Scheduler._accept`)."""
    if tok in engine._eos:
        row.finish = "stop"
        return
    row.tokens.append(tok)
    _, stopped = row.detok.push(tok)
    if stopped:
        row.finish = "stop"
    elif len(row.tokens) >= max_new_tokens:
        row.finish = "length"


@torch.inference_mode()
def answer_many(engine, shared: SharedPrefill, configs: Sequence[CompressionConfig], *,
                max_rows: int = 16) -> list[SharedAnswer]:
    """Answer ``configs`` from the shared prefill, decoding up to ``max_rows`` of them together as the
    scheduler decodes its running rows (`Engine.decode_rows`: each row attends over its own cache;
    a row leaves the batch when it finishes). ``max_rows=1`` decodes each config alone."""
    p, gen = shared.prepared.prompt, shared.prepared.generation
    out: list[SharedAnswer] = []
    for start in range(0, len(configs), max(1, max_rows)):
        rows = [_start(engine, shared, c) for c in configs[start : start + max(1, max_rows)]]
        for r in rows:
            _accept(engine, r, int(next_tokens(r.logits[None], [gen], [r.generator])[0]), gen.max_new_tokens)
            r.logits = None  # type: ignore[assignment]
        while True:
            live = [r for r in rows if r.finish is None]
            if not live:
                break
            t0 = time.perf_counter()
            logits = engine.decode_rows([r.cache for r in live], [r.tokens[-1] for r in live],
                                        [shared.next_position + len(r.tokens) - 1 for r in live])
            toks = next_tokens(logits, [gen] * len(live), [r.generator for r in live]).tolist()
            synchronize(engine.device)
            dt = (time.perf_counter() - t0) / len(live)
            for r, tok in zip(live, toks):
                r.decode_s += dt
                _accept(engine, r, int(tok), gen.max_new_tokens)
        for r in rows:
            r.detok.flush()
            out.append(SharedAnswer(
                text=r.detok.text, token_ids=list(r.tokens), finish=r.finish or "length", n_prompt_tokens=p.length,
                kv_keep_ratio=r.kv_kept / shared.kv_bytes_full if shared.kv_bytes_full else 1.0,
                layer_budgets=list(r.outcome.layer_tokens), layer_entropies=r.outcome.layer_entropies,
                entropy_variant=r.outcome.entropy_variant, compress_s=r.compress_s, decode_s=r.decode_s))
            r.cache = None  # type: ignore[assignment]
    return out


def answer(engine, shared: SharedPrefill, config: CompressionConfig) -> SharedAnswer:
    """Compress a copy of the shared prefill with ``config``, feed the deferred query, decode it alone."""
    return answer_many(engine, shared, [config], max_rows=1)[0]
