"""Independent references for the engine's compressed decode and token selection (tests only).

Nothing here imports the engine's cache, attention or compression code. The references run the plain
Hugging Face model (its own DynamicCache and, for Qwen2-VL, its own M-RoPE position bookkeeping):

* `masked_attention` is an attention function registered with transformers under ``REF_ATTENTION``:
  eager math (repeat K/V over the GQA group, softmax, weighted sum) with a causal mask built from the
  DynamicCache's slots, and, while `evicted` is active, every evicted prompt position masked out
  per (layer, KV head). A full-cache decode under that mask is what a compressed decode must equal.
* `window_scores`, `h2o_scores`, `pool`, `select_reference` and `streaming_keep` re-derive the
  baselines' kept sets from eager attention maps (``output_attentions=True``) following the written
  definitions (design note meda-algorithm.md, `CompressionConfig` docs).
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers import AttentionInterface

REF_ATTENTION = "meda_test_reference"


class _State:
    keep: list[torch.Tensor] | None = None  # per layer (H_kv, n_ctx) bool, True = kept
    n_ctx: int = 0


_STATE = _State()


def masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``query (1, H_q, q, D)`` over ``key/value (1, H_kv, k, D)``, the ``q`` queries being the last
    ``q`` slots of the DynamicCache. Ignores transformers' mask: builds its own (causal, and the
    evicted prompt positions of this layer's KV heads when `evicted` is active)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    bsz, n_q, q_len, _ = query.shape
    n_kv, k_len = key.shape[1], key.shape[2]
    assert bsz == 1, "the reference decodes one sequence"
    g = n_q // n_kv
    k = key.float().repeat_interleave(g, dim=1)  # query head h reads KV head h // g (transformers' repeat_kv)
    v = value.float().repeat_interleave(g, dim=1)
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling  # (1, H_q, q, k)
    q_slot = k_len - q_len + torch.arange(q_len)
    visible = (torch.arange(k_len)[None, :] <= q_slot[:, None])[None, None].expand(bsz, n_q, q_len, k_len).clone()
    if _STATE.keep is not None:
        keep = _STATE.keep[module.layer_idx].repeat_interleave(g, dim=0)  # (H_q, n_ctx)
        visible[:, :, :, : _STATE.n_ctx] &= keep[None, :, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(REF_ATTENTION, masked_attention)


def use_reference_attention(model) -> None:
    impl: str | dict = REF_ATTENTION
    if "text_config" in getattr(model.config, "sub_configs", {}):
        impl = {"text_config": REF_ATTENTION}
        if "vision_config" in model.config.sub_configs:
            impl["vision_config"] = "sdpa"
    model.set_attn_implementation(impl)


@contextlib.contextmanager
def evicted(keep: list[torch.Tensor], n_ctx: int):
    """While active, prompt position ``j < n_ctx`` of layer ``l``, KV head ``h`` is visible only if
    ``keep[l][h, j]``."""
    _STATE.keep, _STATE.n_ctx = keep, n_ctx
    try:
        yield
    finally:
        _STATE.keep, _STATE.n_ctx = None, 0


def hf_inputs(prompt, start: int, end: int, multimodal: bool) -> dict:
    """Model inputs for prompt tokens ``[start, end)`` (pixels only with the first chunk)."""
    ids = prompt.input_ids[start:end][None]
    out = {"input_ids": ids}
    if multimodal:
        out["mm_token_type_ids"] = prompt.modality[start:end][None].int()
        if start == 0:
            out.update(prompt.vision)
    return out


@torch.no_grad()
def reference_decode(model, prompt, n_ctx: int, keep, fed: list[int], multimodal: bool) -> list[torch.Tensor]:
    """Full-cache reference of prefill(context) -> [evict] -> extend(rest of prompt) -> decode ``fed``.

    ``keep`` is None (no eviction) or a function of the per-layer context keys ``(H_kv, n_ctx, D)``
    returning per layer ``(H_kv, n_ctx)`` bool: the evicted prompt positions are masked from the
    moment the context was prefilled. Positions are the model's own (DynamicCache length, Qwen2-VL's
    ``rope_deltas``). Returns the logits before each fed token and after the last."""
    from transformers import DynamicCache

    if hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None
    cache = DynamicCache(config=model.config)
    out = model(**hf_inputs(prompt, 0, n_ctx, multimodal), past_key_values=cache, use_cache=True)
    logits = out.logits[0, -1].float()
    ctx_keys = [layer.keys[0, :, :n_ctx].clone() for layer in cache.layers]
    mask = evicted(keep(ctx_keys), n_ctx) if keep is not None else contextlib.nullcontext()
    result = []
    with mask:
        if n_ctx < prompt.length:
            out = model(**hf_inputs(prompt, n_ctx, prompt.length, multimodal), past_key_values=cache, use_cache=True)
            logits = out.logits[0, -1].float()
        result.append(logits)
        for tok in fed:
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            result.append(out.logits[0, -1].float())
    return result


# ---- selection references -------------------------------------------------------------------------
def group_mean(per_query_head: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``(H_q, L)`` -> ``(H_kv, L)``: mean over the query heads that share a KV head."""
    h, length = per_query_head.shape
    return per_query_head.view(n_kv, h // n_kv, length).mean(dim=1)


def subsampled_rows(length: int, score_queries: int) -> list[int]:
    """The documented row subset: stride ``ceil(L / score_queries)``, ending at the last row."""
    if score_queries <= 0 or score_queries >= length:
        return list(range(length))
    stride = math.ceil(length / score_queries)
    return sorted(range(length - 1, -1, -stride))


def h2o_scores(attn: torch.Tensor, n_kv: int, score_queries: int) -> torch.Tensor:
    """``attn (H_q, L, L)`` (softmax maps) -> attention received by each key from the scored rows."""
    rows = subsampled_rows(attn.shape[-1], score_queries)
    return group_mean(attn[:, rows, :].double().sum(dim=1), n_kv)


def window_scores(attn: torch.Tensor, n_kv: int, window: int, pool_kernel: int) -> torch.Tensor:
    """SnapKV: sum over the last ``window`` query rows, group mean, then a centred mean over
    ``pool_kernel`` neighbours (clipped at the ends, no padding counted)."""
    length = attn.shape[-1]
    s = group_mean(attn[:, length - max(1, window):, :].double().sum(dim=1), n_kv)
    p = pool_kernel // 2
    pooled = torch.empty_like(s)
    for j in range(length):
        pooled[:, j] = s[:, max(0, j - p): min(length, j + p + 1)].mean(dim=1)
    return pooled


def forced_recent(window: int, n_keep: int) -> int:
    return max(0, min(window, n_keep // 2))


def select_reference(scores: torch.Tensor, n_keep: int, window: int) -> torch.Tensor:
    """``(H_kv, L)`` bool: the last ``min(window, n_keep // 2)`` positions, plus the highest-scored
    of the others up to ``n_keep``."""
    n_kv, length = scores.shape
    w = forced_recent(window, n_keep)
    keep = torch.zeros((n_kv, length), dtype=torch.bool)
    keep[:, length - w:] = True
    free = scores[:, : length - w]
    top = torch.argsort(free, dim=1, descending=True)[:, : n_keep - w]
    keep.scatter_(1, top, True)
    return keep


def streaming_keep(length: int, n_keep: int, sink: int, window: int, n_kv: int) -> torch.Tensor:
    """StreamingLLM: the first ``sink`` tokens and the most recent ones (the forced recent window
    first, so with a tiny budget fewer sinks fit)."""
    n_sink = min(sink, n_keep - forced_recent(window, n_keep))
    keep = torch.zeros((n_kv, length), dtype=torch.bool)
    keep[:, :n_sink] = True
    keep[:, length - (n_keep - n_sink):] = True
    return keep


def match_rows(kept: torch.Tensor, full: torch.Tensor, tol: float) -> torch.Tensor:
    """Which prompt position each kept key is: ``kept (H, n, D)``, ``full (H, L, D)`` -> ``(H, L)``
    bool. Asserts every kept key equals (within ``tol``) exactly one distinct prompt key."""
    dist = torch.cdist(kept.double(), full.double())  # (H, n, L)
    best, idx = dist.min(dim=-1)
    assert float(best.max()) <= tol, f"a kept key matches no prompt key (distance {float(best.max()):.2e})"
    mask = torch.zeros(full.shape[:2], dtype=torch.bool)
    mask.scatter_(1, idx, True)
    assert torch.equal(mask.sum(dim=1), torch.full((full.shape[0],), kept.shape[1])), "a prompt key is kept twice"
    return mask
