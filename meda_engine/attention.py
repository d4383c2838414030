"""The attention function the decoder layers call (registered with transformers in `hf_glue`).

It does three jobs, and never materialises a full ``L x L`` attention map:

* **Prefill**: causal attention with SDPA (flash attention on GPU), then, for rows whose method needs
  them, statistics recomputed from the same queries and keys in row chunks: the attention each key
  receives (summed over the prompt's query rows, or an evenly spaced subset of at most
  ``score_queries`` rows: the exact sum costs about as much again as the attention itself), row
  entropies, SnapKV's window (the last ``w`` rows) and MEDA's cross-modal entropy (only the text x
  visual blocks). The score blocks of the statistics are cut over rows, heads and, if need be,
  keys (`stats_chunks`), so they hold at most ``PrefillStats.chunk_bytes`` at any length.
* **Decode** (one query per row): attention over each row's valid cache slots, with a per-row key
  mask built from the layer's own lengths (so layers of different lengths need no shared mask).
  On CPU a grouped-query matmul path in float32 (SDPA with one query is slow on CPU, and so are
  bf16 matmuls on CPUs without native bf16 GEMM); on CUDA, SDPA.
* **Extend** (several new tokens on top of a cache, the query-agnostic protocol): SDPA with the mask
  ``key_slot <= offset[row] + query_index``.

Shapes (transformers' convention): ``query (B, H_q, q, D)``, ``key``/``value`` ``(B, H_kv, k, D)``;
returns ``(B, q, H_q, D)``. Statistics are kept per KV head: query-head values are averaged over the
heads of each GQA group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .hf_glue import CONTEXT_KWARG

if TYPE_CHECKING:
    from .cache import RaggedKVCache

NEG = float("-inf")  # masked score
# Log-probabilities are clamped here before exponentiating: exp() of inputs below about -87 (results
# that underflow to denormals) runs up to 15x slower on CPU, and 0 * -inf would make entropies NaN.
# e^-80 ~ 2e-35 is zero for every statistic computed here.
LOGP_FLOOR = -80.0


@dataclass
class RowPlan:
    """Which statistics to record for one row during prefill."""

    column_sums: bool = False  # attention each key receives from the prompt's queries (H2O, LOOK-M, MEDA)
    row_entropy: bool = False  # mean entropy of the causal attention rows (MEDA "code")
    score_queries: int = 0  # query rows (evenly spaced, ending at the last) for the two above; 0 = all
    window: int = 0  # observation window (SnapKV / PyramidKV), 0 = none
    cross_modal: bool = False  # MEDA "paper" entropy
    modality: torch.Tensor | None = None  # (L,) int8, 0 = text, needed by cross_modal
    # KVzip: the context is followed in the same forward by its reconstruction prompt; ``n_context``
    # (set by the engine) is where the context ends. Every other statistic sees the context alone
    # (rows and keys < n_context, exactly as without the reconstruction: attention is causal).
    reconstruct: bool = False
    n_context: int = 0  # 0 = the row's whole forward length

    @property
    def any(self) -> bool:
        return self.column_sums or self.row_entropy or self.window > 0 or self.cross_modal or self.reconstruct


@dataclass
class RowStats:
    """One row's statistics in one layer. Score tensors are ``(H_kv, L)`` float32 on the device."""

    column_sums: torch.Tensor | None = None
    window_scores: torch.Tensor | None = None
    recon_scores: torch.Tensor | None = None  # KVzip: max attention from the reconstruction rows
    row_entropy: float | None = None
    cross_modal_entropy: float | None = None


@dataclass
class PrefillStats:
    plans: list[RowPlan]
    n_layers: int
    chunk_bytes: int = 64 * 2**20
    layers: list[list[RowStats]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers = [[RowStats() for _ in self.plans] for _ in range(self.n_layers)]


@dataclass
class ForwardContext:
    """Travels with one model forward (as a keyword argument) to every attention call."""

    cache: "RaggedKVCache"
    phase: str  # "prefill" | "extend" | "decode"
    stats: PrefillStats | None = None


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ctx: ForwardContext | None = kwargs.get(CONTEXT_KWARG)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if ctx is None:
        # Called outside the engine (no cache semantics known): plain causal attention.
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=None if attention_mask is None else attention_mask.bool(),
            is_causal=attention_mask is None and query.shape[2] > 1, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None
    layer = ctx.cache.layers[module.layer_idx]
    if getattr(layer, "views", None) is not None and ctx.phase == "decode":  # RowBatchCache: rows own their storage
        out = rows_decode_attention(query, layer.views, scaling)
    elif ctx.phase == "prefill":
        out = prefill_attention(query, key, value, scaling, ctx.cache.new_lengths, ctx.stats, module.layer_idx)
    elif query.shape[2] == 1:
        out = decode_attention(query, key, value, layer.offsets, scaling)
    else:
        out = extend_attention(query, key, value, layer.offsets, scaling)
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------------------
def prefill_attention(query, key, value, scaling: float, lengths: list[int], stats: PrefillStats | None,
                      layer_idx: int) -> torch.Tensor:
    """Causal attention over each row's first ``lengths[b]`` slots (SDPA), then the planned statistics
    from the same queries and keys (see `attention_from_rows`, `cross_modal_entropy`)."""
    bsz, n_q_heads, q_len, _ = query.shape
    gqa = n_q_heads != key.shape[1]
    if all(n == q_len for n in lengths):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:  # right padding: each row on its own real tokens, pad positions left at zero
        out = torch.zeros_like(query)
        for b, n in enumerate(lengths):
            if n:
                out[b, :, :n] = F.scaled_dot_product_attention(
                    query[b : b + 1, :, :n], key[b : b + 1, :, :n], value[b : b + 1, :, :n],
                    is_causal=True, scale=scaling, enable_gqa=gqa)[0]
    if stats is None:
        return out
    for b, n in enumerate(lengths):
        plan = stats.plans[b]
        if n == 0 or not plan.any:
            continue
        rec = stats.layers[layer_idx][b]
        if plan.reconstruct and plan.n_context < n:
            rec.recon_scores = max_attention_from_rows(query[b, :, :n], key[b, :, :n], scaling,
                                                       torch.arange(plan.n_context, n), plan.n_context,
                                                       chunk_bytes=stats.chunk_bytes)
        n = plan.n_context or n  # the context alone from here on
        qb, kb = query[b, :, :n], key[b, :, :n]
        if plan.column_sums or plan.row_entropy:
            rows = query_rows(n, plan.score_queries)
            received, rec.row_entropy = attention_from_rows(
                qb, kb, scaling, rows, chunk_bytes=stats.chunk_bytes, want_row_entropy=plan.row_entropy)
            # Scale a subsample up to the all-query magnitude (ranking is unaffected).
            rec.column_sums = received * (n / rows.numel()) if plan.column_sums else None
        if plan.window:
            rows = torch.arange(max(0, n - plan.window), n)
            rec.window_scores, _ = attention_from_rows(qb, kb, scaling, rows, chunk_bytes=stats.chunk_bytes)
        if plan.cross_modal:
            rec.cross_modal_entropy = cross_modal_entropy(qb, kb, scaling, plan.modality, stats.chunk_bytes)
    return out


def _group(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``(H_q, n, D)`` -> ``(H_kv, G, n, D)``: the query heads that share a KV head, side by side."""
    h, n, d = q.shape
    return q.view(n_kv, h // n_kv, n, d)


@dataclass(frozen=True)
class StatsChunks:
    """How the statistics' score blocks are cut: KV heads, query heads of a group, query rows and
    keys per block. ``block_elems`` (= the product) float32 scores, times ``temporaries`` live
    score-sized tensors, fit in ``chunk_bytes`` whenever ``chunk_bytes >= 4 * temporaries``."""

    kv_heads: int
    group_heads: int
    rows: int
    keys: int

    @property
    def block_elems(self) -> int:
        return self.kv_heads * self.group_heads * self.rows * self.keys


def stats_chunks(n_kv: int, group: int, n_rows: int, n_keys: int, chunk_bytes: int,
                 temporaries: int = 3) -> StatsChunks:
    """The largest blocks with ``temporaries * 4 * block_elems <= chunk_bytes``: as many query rows as
    fit over all heads and keys; if one row over all heads does not fit, fewer KV heads, then fewer
    query heads of a group; if one row of one head over all keys does not fit, the keys are cut too
    (the softmax then takes two passes over the key blocks: log-sum-exp, then the statistics)."""
    budget = max(1, chunk_bytes // (4 * temporaries))
    n_rows, n_keys = max(1, n_rows), max(1, n_keys)
    if n_keys > budget:
        return StatsChunks(1, 1, 1, budget)
    if group * n_keys > budget:
        return StatsChunks(1, budget // n_keys, 1, n_keys)
    if n_kv * group * n_keys > budget:
        return StatsChunks(budget // (group * n_keys), group, 1, n_keys)
    return StatsChunks(n_kv, group, min(n_rows, budget // (n_kv * group * n_keys)), n_keys)


def _block_stats(qb: torch.Tensor, kb: torch.Tensor, visible: torch.Tensor, scaling: float, key_step: int,
                 want_received: bool):
    """Softmax statistics of one block. ``qb (h, G', c, D)`` float32, ``kb (h, e, D)`` float32 (the KV
    heads of the block), ``visible (c, e)`` bool. Returns the attention each key receives summed over
    the block's query heads and rows ``(h, e)`` (or None), and the row entropies ``(h, G', c)`` in
    nats (NaN for a row that sees no key). Keys are processed ``key_step`` at a time."""
    h, gb, c, d = qb.shape
    e = kb.shape[1]
    q2 = qb.reshape(h, gb * c, d)
    if key_step >= e:
        scores = torch.matmul(q2, kb.transpose(1, 2)).mul_(scaling)  # (h, G'*c, e)
        scores.view(h, gb, c, e).masked_fill_(~visible, NEG)
        logp = torch.log_softmax(scores, dim=-1).clamp_(min=LOGP_FLOOR)
        del scores
        probs = logp.exp()
        ent = -torch.linalg.vecdot(probs, logp).view(h, gb, c)
        return (probs.sum(dim=1) if want_received else None), ent
    lse = torch.full((h, gb * c), NEG, device=qb.device)
    for k0 in range(0, e, key_step):  # pass 1: the softmax normaliser over key blocks
        k1 = min(e, k0 + key_step)
        scores = torch.matmul(q2, kb[:, k0:k1].transpose(1, 2)).mul_(scaling)
        scores.view(h, gb, c, k1 - k0).masked_fill_(~visible[:, k0:k1], NEG)
        lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=-1))
        del scores
    received = torch.zeros((h, e), device=qb.device) if want_received else None
    ent = torch.zeros((h, gb * c), device=qb.device)
    for k0 in range(0, e, key_step):  # pass 2: probabilities, entropy and received attention
        k1 = min(e, k0 + key_step)
        logp = torch.matmul(q2, kb[:, k0:k1].transpose(1, 2)).mul_(scaling)
        logp.view(h, gb, c, k1 - k0).masked_fill_(~visible[:, k0:k1], NEG)
        logp.sub_(lse[..., None]).clamp_(min=LOGP_FLOOR)
        probs = logp.exp()
        ent -= torch.linalg.vecdot(probs, logp)
        if received is not None:
            received[:, k0:k1] += probs.sum(dim=1)
        del logp, probs
    return received, ent.view(h, gb, c)


def query_rows(length: int, max_rows: int) -> torch.Tensor:
    """At most ``max_rows`` query positions, evenly spaced and ending at the last one (0 = all)."""
    if max_rows <= 0 or max_rows >= length:
        return torch.arange(length)
    stride = -(-length // max_rows)
    return torch.arange(length - 1, -1, -stride).flip(0)


def attention_from_rows(q, k, scaling: float, rows: torch.Tensor, *, chunk_bytes: int, want_row_entropy: bool = False):
    """Causal attention probabilities of the query positions ``rows`` only, reduced on the fly.

    ``q (H_q, L, D)``, ``k (H_kv, L, D)``, ``rows (n,)`` ascending. Returns the attention each key
    receives from those rows, ``(H_kv, L)`` float32 (sum over rows, mean over the query heads of a
    group), and, if asked, the mean entropy of those rows in nats (over rows and heads). Cost is
    O(n * L); the score blocks (`stats_chunks`: rows, then heads, then keys) hold at most
    ``chunk_bytes`` together (three live score-sized float32 tensors per block).
    """
    n_kv, length, d = k.shape
    qg = _group(q, n_kv)
    g = qg.shape[1]
    rows = rows.to(q.device)
    received = torch.zeros((n_kv, length), dtype=torch.float32, device=q.device)
    ent_total = torch.zeros((), dtype=torch.float64, device=q.device)
    plan = stats_chunks(n_kv, g, rows.numel(), length, chunk_bytes)
    for s in range(0, rows.numel(), plan.rows):
        r = rows[s : s + plan.rows]
        e = int(r[-1]) + 1  # keys after the chunk's last row are never visible
        visible = torch.arange(e, device=q.device)[None, :] <= r[:, None]  # (c, e)
        for h0 in range(0, n_kv, plan.kv_heads):
            h1 = min(n_kv, h0 + plan.kv_heads)
            kb = k[h0:h1, :e].float()
            for g0 in range(0, g, plan.group_heads):
                qb = qg[h0:h1, g0 : g0 + plan.group_heads, r].float()
                got, ent = _block_stats(qb, kb, visible, scaling, plan.keys, want_received=True)
                received[h0:h1, :e] += got
                if want_row_entropy:
                    ent_total += ent.sum(dtype=torch.float64)
                del got, ent, qb
    received /= g
    ent = float(ent_total) / (q.shape[0] * rows.numel()) if want_row_entropy else None
    return received, ent


def _block_max(qb: torch.Tensor, kb: torch.Tensor, visible: torch.Tensor, scaling: float, key_step: int,
               n_keys: int) -> torch.Tensor:
    """The largest attention probability each of the first ``n_keys`` keys gets from any row and
    query head of the block, ``(h, n_keys)``. Shapes as `_block_stats`; the softmax runs over every
    visible key, cut into ``key_step`` blocks when they do not fit (two passes: log-sum-exp, then the
    maxima)."""
    h, gb, c, d = qb.shape
    e = kb.shape[1]
    q2 = qb.reshape(h, gb * c, d)
    lse = torch.full((h, gb * c), NEG, device=qb.device)
    for k0 in range(0, e, key_step):
        k1 = min(e, k0 + key_step)
        scores = torch.matmul(q2, kb[:, k0:k1].transpose(1, 2)).mul_(scaling)
        scores.view(h, gb, c, k1 - k0).masked_fill_(~visible[:, k0:k1], NEG)
        lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=-1))
        del scores
    out = torch.zeros((h, n_keys), device=qb.device)
    for k0 in range(0, n_keys, key_step):
        k1 = min(n_keys, k0 + key_step)
        logp = torch.matmul(q2, kb[:, k0:k1].transpose(1, 2)).mul_(scaling)
        logp.view(h, gb, c, k1 - k0).masked_fill_(~visible[:, k0:k1], NEG)
        out[:, k0:k1] = logp.sub_(lse[..., None]).amax(dim=1).exp()
        del logp
    return out


def max_attention_from_rows(q, k, scaling: float, rows: torch.Tensor, n_keys: int, *, chunk_bytes: int):
    """KVzip's score: for each of the first ``n_keys`` keys, the largest causal attention probability
    it receives from any of the query positions ``rows`` and any query head of its KV head.

    ``q (H_q, L, D)``, ``k (H_kv, L, D)``, ``rows (n,)`` ascending, all ``>= n_keys - 1``. Returns
    ``(H_kv, n_keys)`` float32. The score blocks are cut as `attention_from_rows`'s."""
    n_kv, length, d = k.shape
    qg = _group(q, n_kv)
    g = qg.shape[1]
    rows = rows.to(q.device)
    out = torch.zeros((n_kv, n_keys), dtype=torch.float32, device=q.device)
    plan = stats_chunks(n_kv, g, rows.numel(), length, chunk_bytes)
    for s in range(0, rows.numel(), plan.rows):
        r = rows[s : s + plan.rows]
        e = int(r[-1]) + 1
        visible = torch.arange(e, device=q.device)[None, :] <= r[:, None]  # (c, e)
        for h0 in range(0, n_kv, plan.kv_heads):
            h1 = min(n_kv, h0 + plan.kv_heads)
            kb = k[h0:h1, :e].float()
            for g0 in range(0, g, plan.group_heads):
                qb = qg[h0:h1, g0 : g0 + plan.group_heads, r].float()
                torch.maximum(out[h0:h1], _block_max(qb, kb, visible, scaling, plan.keys, n_keys), out=out[h0:h1])
                del qb
    return out


def _masked_entropy_mean(qsel, ksel, q_pos, k_pos, scaling: float, chunk_bytes: int) -> tuple[float, int]:
    """Sum of row entropies of softmax(q k^T) restricted to keys with ``k_pos <= q_pos`` (causal), over
    rows that see at least one key, and the number of such (row, head) pairs.

    ``qsel (H_q, nq, D)``, ``ksel (H_kv, nk, D)``, positions ``(nq,)`` and ``(nk,)``.
    """
    n_kv, nk, d = ksel.shape
    if nk == 0 or qsel.shape[1] == 0:
        return 0.0, 0
    qg = _group(qsel, n_kv)
    g = qg.shape[1]
    total, count = 0.0, 0
    plan = stats_chunks(n_kv, g, qsel.shape[1], nk, chunk_bytes)
    for s in range(0, qsel.shape[1], plan.rows):
        e = min(qsel.shape[1], s + plan.rows)
        visible = k_pos[None, :] <= q_pos[s:e, None]  # (c, nk)
        valid_rows = visible.any(dim=1)  # (c,)
        if not bool(valid_rows.any()):
            continue
        for h0 in range(0, n_kv, plan.kv_heads):
            h1 = min(n_kv, h0 + plan.kv_heads)
            kb = ksel[h0:h1].float()
            for g0 in range(0, g, plan.group_heads):
                qb = qg[h0:h1, g0 : g0 + plan.group_heads, s:e].float()
                _, ent = _block_stats(qb, kb, visible, scaling, plan.keys, want_received=False)
                total += float(ent[..., valid_rows].sum(dtype=torch.float64))  # rows seeing no key: NaN, dropped
                count += int(valid_rows.sum()) * ent.shape[0] * ent.shape[1]
    return total, count


def cross_modal_entropy(q, k, scaling: float, modality: torch.Tensor, chunk_bytes: int) -> float | None:
    """MEDA's layer statistic (paper): E_TV + E_VT, the mean row entropies of text queries attending
    visual keys only and of visual queries attending text keys only (each softmax renormalised over
    the other modality, causal). A direction with no causally valid rows contributes 0. Returns None
    when the prompt has no text or no visual tokens."""
    modality = modality.to(q.device)
    pos = torch.arange(modality.shape[0], device=q.device)
    text_pos = pos[modality == 0]
    vis_pos = pos[modality != 0]
    if text_pos.numel() == 0 or vis_pos.numel() == 0:
        return None
    e_tv, n_tv = _masked_entropy_mean(q[:, text_pos], k[:, vis_pos], text_pos, vis_pos, scaling, chunk_bytes)
    e_vt, n_vt = _masked_entropy_mean(q[:, vis_pos], k[:, text_pos], vis_pos, text_pos, scaling, chunk_bytes)
    return (e_tv / n_tv if n_tv else 0.0) + (e_vt / n_vt if n_vt else 0.0)


# ---------------------------------------------------------------------------------------------------
# decode and extend
# ---------------------------------------------------------------------------------------------------
def decode_attention(query, key, value, offsets: torch.Tensor, scaling: float) -> torch.Tensor:
    """One new query per row over slots ``<= offsets[b]`` of its row. Returns ``(B, H_q, 1, D)``."""
    bsz, n_q_heads, _, d = query.shape
    n_kv, n_keys = key.shape[1], key.shape[2]
    # With one row the written extent is exactly that row's valid slots: no mask needed.
    valid = None if bsz == 1 else torch.arange(n_keys, device=query.device)[None, :] <= offsets[:, None]
    if query.device.type == "cuda":
        mask = None if valid is None else valid[:, None, None, :]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                              enable_gqa=n_q_heads != n_kv)
    # CPU: grouped-query matmuls in float32. bf16/fp16 matmuls with one query run on a slow path on
    # CPUs without native bf16 GEMM (measured 6x slower than upcasting K and V and using fp32 here).
    g = n_q_heads // n_kv
    q3 = query.reshape(bsz * n_kv, g, d).float()
    k3 = key.reshape(bsz * n_kv, n_keys, d).float()  # a view for fp32 caches: no copy
    v3 = value.reshape(bsz * n_kv, n_keys, d).float()
    scores = torch.bmm(q3, k3.transpose(1, 2)).mul_(scaling)  # (B*H_kv, G, k)
    if valid is not None:
        scores.view(bsz, n_kv, g, n_keys).masked_fill_(~valid[:, None, None, :], NEG)
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, v3).to(value.dtype).view(bsz, n_q_heads, 1, d)


def rows_decode_attention(query, views: list[tuple[torch.Tensor, torch.Tensor]], scaling: float) -> torch.Tensor:
    """One new query per row, row ``b`` over its own keys and values ``views[b]`` ``(1, H_kv, n_b, D)``
    (a `RowBatchCache` layer). Each row runs the one-row `decode_attention`, so a row's result is the
    same whatever its batch-mates hold, and nothing is padded. Returns ``(B, H_q, 1, D)``."""
    return torch.cat([decode_attention(query[b : b + 1], k, v, None, scaling) for b, (k, v) in enumerate(views)])


def extend_attention(query, key, value, offsets: torch.Tensor, scaling: float) -> torch.Tensor:
    """Several new tokens per row on top of a cache: slot ``j`` is visible to query ``i`` of row ``b``
    iff ``j <= offsets[b] + i``."""
    q_len, n_keys = query.shape[2], key.shape[2]
    slots = torch.arange(n_keys, device=query.device)
    limit = offsets[:, None] + torch.arange(q_len, device=query.device)[None, :]  # (B, q)
    mask = slots[None, None, :] <= limit[:, :, None]  # (B, q, k)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], scale=scaling,
                                          enable_gqa=query.shape[1] != key.shape[1])
