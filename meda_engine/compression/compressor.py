"""Compress a prefilled `RaggedKVCache` in place, once, right after prefill.

For each request (row): its method's allocator turns the layer statistics into a token count per
layer (every layer's statistics are known by then, as MEDA's global allocation needs); then, layer
by layer, each row's kept (and merged) tokens are packed into a new, smaller buffer and the prefill
buffer of that layer is released, so peak memory is the full cache plus one compressed layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import PrefillStats
from ..cache import RaggedKVCache
from .allocators import ratios_to_tokens, token_target
from .methods import Method
from .selection import select_tokens


@dataclass
class CompressionOutcome:
    layer_tokens: list[int]  # prompt tokens kept per layer, as held in the cache
    layer_entropies: list[float] | None
    entropy_variant: str | None
    budget_floor_applied: bool = False  # the 1-token-per-layer floor kept more than the budget asks


def _allocation_error(method: Method, exc: ValueError) -> ValueError:
    return ValueError(f"{method.name}: cannot allocate the per-layer KV budget: {exc}")


def allocate(method: Method, stats: PrefillStats | None, row: int, length: int, n_layers: int,
             variant: str | None, *, n_kv_heads: int = 1, device: torch.device | str = "cpu",
             ) -> tuple[list[int], list[float] | None, bool]:
    """Tokens to keep per layer for one row, the layer entropies used (if any), and whether the
    1-token-per-layer floor raised the total above the budget.

    The counts sum exactly to ``round(rho * length * n_layers)`` (``rho`` = the config's keep
    fraction for this length), each within ``[1, length]`` (`ratios_to_tokens`); where that total is
    below ``n_layers`` the floor wins and the flag is set. Non-finite layer entropies raise
    ``ValueError`` (never a silent minimum allocation). A score-driven allocator (`GlobalScoreAllocator`)
    gets every layer's ``(H_kv, L)`` token scores (``n_kv_heads``, ``device``: what a recency scorer builds
    them with)."""
    rho = method.config.keep_fraction(length)
    if method.scorer is None or rho >= 1.0:
        return [length] * n_layers, None, False
    entropies = None
    if method.uses_entropy:
        assert stats is not None
        field = "cross_modal_entropy" if variant == "paper" else "row_entropy"
        entropies = [float(getattr(stats.layers[l][row], field)) for l in range(n_layers)]
    extra = {}
    if method.allocator.uses_scores:  # a global allocator ranks every layer's token scores together
        assert stats is not None
        extra["scores"] = [method.scorer.score(stats.layers[l][row], n_kv_heads, length, device)
                           for l in range(n_layers)]
    try:
        ratios = method.allocator.ratios(rho, n_layers, entropies, **extra)
        counts = ratios_to_tokens(ratios, length, minimum=1, budget=rho)
    except ValueError as exc:
        raise _allocation_error(method, exc) from exc
    _, floor_applied = token_target(rho, length, n_layers, minimum=1)
    return counts, entropies, floor_applied


def compress_cache(cache: RaggedKVCache, stats: PrefillStats | None, methods: list[Method],
                   modalities: list[torch.Tensor], lengths: list[int], variants: list[str | None],
                   reserve: int) -> list[CompressionOutcome]:
    n_layers = len(cache.layers)
    n_kv, dev = cache.layers[0].keys.shape[1], cache.layers[0].keys.device
    plans = [allocate(m, stats, b, lengths[b], n_layers, variants[b], n_kv_heads=n_kv, device=dev)
             for b, m in enumerate(methods)]
    for l, layer in enumerate(cache.layers):
        layer.reserve = reserve
        assert layer.keys is not None and layer.values is not None
        untouched = all(
            plans[b][0][l] >= lengths[b] or methods[b].scorer is None for b in range(len(methods))
        )
        if untouched:
            continue
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        for b, method in enumerate(methods):
            n = lengths[b]
            k_row, v_row = layer.keys[b, :, :n], layer.values[b, :, :n]
            n_keep = plans[b][0][l]
            if method.scorer is None or n_keep >= n:
                kept.append((k_row, v_row))
                continue
            cfg = method.config
            scores = method.scorer.score(stats.layers[l][b] if stats else None, k_row.shape[0], n, k_row.device)
            idx = select_tokens(scores, n_keep, modality=modalities[b], window=cfg.window,
                                text_prior=cfg.use_text_prior, keep_all_text=cfg.keep_all_text)
            if method.merger is not None:
                kept.append(method.merger.reduce(k_row, v_row, idx, modalities[b]))
            else:
                gather = idx[..., None].expand(-1, -1, k_row.shape[-1])
                kept.append((torch.gather(k_row, 1, gather), torch.gather(v_row, 1, gather)))
        new_len = [k.shape[1] for k, _ in kept]
        shape = (len(kept), layer.keys.shape[1], max(new_len) + reserve, layer.keys.shape[3])
        new_k = torch.zeros(shape, dtype=layer.keys.dtype, device=layer.keys.device)
        new_v = torch.zeros_like(new_k)
        for b, (k, v) in enumerate(kept):
            new_k[b, :, : k.shape[1]] = k
            new_v[b, :, : v.shape[1]] = v
        del kept
        layer.replace(new_k, new_v, new_len)
        if stats is not None:  # this layer's statistics are no longer needed
            for rec in stats.layers[l]:
                rec.column_sums = rec.window_scores = None
    return [
        CompressionOutcome(cache.layer_lengths(b), plans[b][1], variants[b], plans[b][2]) for b in range(len(methods))
    ]
