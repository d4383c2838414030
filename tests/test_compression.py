"""Unit tests of the compression parts and the attention statistics, against direct references on
small random tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from meda_engine.attention import (
    attention_from_rows,
    cross_modal_entropy,
    decode_attention,
    extend_attention,
    query_rows,
)
from meda_engine.cache import RaggedKVCache
from meda_engine.compression import (
    EntropyAllocator,
    KVMerger,
    PyramidAllocator,
    UniformAllocator,
    clamp_to_mean,
    ratios_to_tokens,
    select_tokens,
)
from meda_engine.compression.merge import evicted_indices, gather_tokens
from meda_engine.compression.scorers import RecencyScorer, WindowAttentionScorer
from meda_engine.attention import RowStats

torch.set_num_threads(1)


def rand_qkv(n_q_heads=4, n_kv=2, length=37, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q_heads, length, d, generator=g)
    k = torch.randn(n_kv, length, d, generator=g)
    v = torch.randn(n_kv, length, d, generator=g)
    return q, k, v


def eager_probs(q, k, scaling):
    """Reference: the full causal attention map ``(H_q, L, L)``."""
    n_kv = k.shape[0]
    kk = k.repeat_interleave(q.shape[0] // n_kv, dim=0)
    s = q @ kk.transpose(1, 2) * scaling
    causal = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)


# --------------------------------------------------------------------------------------- allocators
def test_clamp_to_mean_conserves_and_clamps():
    weights = [0.1, 5.0, 1.0, 0.01, 2.0, 0.3]
    r = clamp_to_mean(weights, 0.4, 0.05, 1.0)
    assert math.isclose(sum(r) / len(r), 0.4, rel_tol=1e-12)
    assert all(0.05 - 1e-12 <= x <= 1.0 + 1e-12 for x in r)
    assert r[1] == pytest.approx(1.0) and r[3] == pytest.approx(0.05)
    # Unclamped layers keep their proportions.
    free = [i for i, x in enumerate(r) if 0.05 < x < 1.0]
    ratios = [r[i] / weights[i] for i in free]
    assert max(ratios) == pytest.approx(min(ratios))


def test_entropy_allocator_is_softmax_scaled_to_mean():
    ent = [1.2, 0.7, 2.0, 1.5]
    rho = 0.2
    r = EntropyAllocator(temperature=1.0, min_ratio=0.0, max_ratio=1.0).ratios(rho, 4, ent)
    z = sum(math.exp(e) for e in ent)
    expected = [math.exp(e) / z * 4 * rho for e in ent]
    assert r == pytest.approx(expected, rel=1e-9)
    # Extreme entropies: the clamps hold and the total is conserved exactly.
    r2 = EntropyAllocator(temperature=0.1, min_ratio=0.05, max_ratio=0.6).ratios(0.3, 4, [5.0, 0.0, 0.1, 4.9])
    assert sum(r2) / 4 == pytest.approx(0.3, abs=1e-12)
    assert min(r2) >= 0.05 - 1e-12 and max(r2) <= 0.6 + 1e-12
    # Temperature flattens the allocation.
    hot = EntropyAllocator(temperature=100.0).ratios(0.3, 4, ent)
    assert max(hot) - min(hot) < max(r) - min(r)


def test_pyramid_and_uniform_allocators():
    r = PyramidAllocator(beta=20).ratios(0.2, 8)
    assert sum(r) / 8 == pytest.approx(0.2)
    assert all(a > b for a, b in zip(r, r[1:]))
    assert r[0] / r[-1] == pytest.approx(2 * 20 - 1)
    assert UniformAllocator().ratios(0.3, 5) == [0.3] * 5
    high = PyramidAllocator().ratios(0.8, 6)  # would exceed 1 at the bottom: clamped, mean kept
    assert max(high) <= 1.0 and sum(high) / 6 == pytest.approx(0.8)


@pytest.mark.parametrize("length", [1, 7, 100, 1234])
def test_ratios_to_tokens_conserve_total(length):
    ratios = clamp_to_mean([0.3, 2.0, 1.0, 0.5, 1.7], 0.37, 0.0, 1.0)
    counts = ratios_to_tokens(ratios, length)
    assert sum(counts) == min(max(round(0.37 * 5 * length), 5 * min(1, length)), 5 * length)
    assert all(1 <= c <= length for c in counts)
    assert all(abs(c - r * length) < 1.0 + 1e-9 for c, r in zip(counts, ratios) if 1 < r * length < length)


# --------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("n_q_heads,n_kv", [(4, 2), (4, 4), (6, 1)])
def test_attention_from_rows_matches_eager_statistics(n_q_heads, n_kv):
    q, k, _ = rand_qkv(n_q_heads, n_kv, length=53)
    scaling = 8 ** -0.5
    p = eager_probs(q, k, scaling)
    g = n_q_heads // n_kv
    rows = query_rows(53, 0)
    assert rows.tolist() == list(range(53))
    col, ent = attention_from_rows(q, k, scaling, rows, chunk_bytes=1, want_row_entropy=True)  # many small chunks
    torch.testing.assert_close(col, p.sum(dim=1).view(n_kv, g, -1).mean(dim=1), atol=1e-5, rtol=1e-5)
    ref_ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    assert ent == pytest.approx(float(ref_ent), rel=1e-5)
    # A subset of rows (evenly spaced, ending at the last): statistics of exactly those rows.
    rows = query_rows(53, 10)
    assert rows[-1] == 52 and rows.numel() <= 10 and len(set(torch.diff(rows).tolist())) == 1
    col, ent = attention_from_rows(q, k, scaling, rows, chunk_bytes=1 << 20, want_row_entropy=True)
    sub = p[:, rows]
    torch.testing.assert_close(col, sub.sum(dim=1).view(n_kv, g, -1).mean(dim=1), atol=1e-5, rtol=1e-5)
    assert ent == pytest.approx(float(-(sub * torch.log(sub.clamp_min(1e-12))).sum(-1).mean()), rel=1e-5)


def test_window_scores_match_eager():
    q, k, _ = rand_qkv(4, 2, length=40)
    scaling = 0.3
    got, _ = attention_from_rows(q, k, scaling, torch.arange(34, 40), chunk_bytes=1 << 20)
    p = eager_probs(q, k, scaling)[:, -6:]
    torch.testing.assert_close(got, p.sum(1).view(2, 2, -1).mean(1), atol=1e-6, rtol=1e-5)


def test_cross_modal_entropy_matches_direct_definition():
    q, k, _ = rand_qkv(4, 2, length=30, seed=3)
    scaling = 0.35
    modality = torch.zeros(30, dtype=torch.int8)
    modality[5:22] = 2  # text 0..4, video 5..21, text 22..29
    got = cross_modal_entropy(q, k, scaling, modality, chunk_bytes=1)
    kk = k.repeat_interleave(2, dim=0)
    text = [i for i in range(30) if modality[i] == 0]
    vis = [i for i in range(30) if modality[i] != 0]

    def mean_entropy(rows, cols):
        vals = []
        for h in range(4):
            for i in rows:
                visible = [j for j in cols if j <= i]
                if not visible:
                    continue
                s = torch.stack([q[h, i] @ kk[h, j] * scaling for j in visible])
                p = torch.softmax(s, 0)
                vals.append(float(-(p * p.log()).sum()))
        return sum(vals) / len(vals)

    expected = mean_entropy(text, vis) + mean_entropy(vis, text)
    assert got == pytest.approx(expected, rel=1e-5)
    assert cross_modal_entropy(q, k, scaling, torch.zeros(30, dtype=torch.int8), 1 << 20) is None


def test_decode_and_extend_attention_respect_row_lengths():
    g = torch.Generator().manual_seed(1)
    bsz, hq, hkv, n, d = 3, 4, 2, 9, 8
    key = torch.randn(bsz, hkv, n, d, generator=g)
    value = torch.randn(bsz, hkv, n, d, generator=g)
    offsets = torch.tensor([8, 3, 5])
    query = torch.randn(bsz, hq, 1, d, generator=g)
    out = decode_attention(query, key, value, offsets, 0.5)
    for b in range(bsz):
        m = int(offsets[b]) + 1
        ref = F.scaled_dot_product_attention(query[b:b + 1], key[b:b + 1, :, :m], value[b:b + 1, :, :m], scale=0.5,
                                             enable_gqa=True)
        torch.testing.assert_close(out[b:b + 1], ref, atol=1e-5, rtol=1e-5)
    q3 = torch.randn(bsz, hq, 3, d, generator=g)
    offsets = torch.tensor([6, 2, 4])
    out3 = extend_attention(q3, key, value, offsets, 0.5)
    for b in range(bsz):
        for i in range(3):
            m = int(offsets[b]) + i + 1
            ref = F.scaled_dot_product_attention(q3[b:b + 1, :, i:i + 1], key[b:b + 1, :, :m], value[b:b + 1, :, :m],
                                                 scale=0.5, enable_gqa=True)
            torch.testing.assert_close(out3[b:b + 1, :, i:i + 1], ref, atol=1e-5, rtol=1e-5)


def test_cache_rows_append_at_their_own_lengths():
    cache = RaggedKVCache(n_layers=1, batch_size=2, reserve=4)
    k = torch.arange(2 * 1 * 5 * 2, dtype=torch.float32).view(2, 1, 5, 2)
    cache.begin_forward([5, 3], torch.device("cpu"))
    cache.update(k, k.clone(), 0)
    assert cache.layers[0].lengths_host == [5, 3]
    new = torch.full((2, 1, 1, 2), -1.0)
    cache.begin_forward([1, 1], torch.device("cpu"))
    keys, _ = cache.update(new, new.clone(), 0)
    assert cache.layers[0].lengths_host == [6, 4]
    assert keys.shape[2] == 6
    assert torch.equal(keys[1, 0, 3], torch.tensor([-1.0, -1.0]))  # row 1 wrote after its 3 real tokens
    assert torch.equal(keys[0, 0, 5], torch.tensor([-1.0, -1.0]))
    assert cache.row_bytes(1) == 4 * 2 * 4 * 2


# --------------------------------------------------------------------------------------- selection
def test_selection_keeps_exactly_the_top_scores_per_head():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 50, generator=g)
    modality = torch.full((50,), 2, dtype=torch.int8)
    idx = select_tokens(scores, 10, modality=modality, window=0, text_prior=False, keep_all_text=False)
    for h in range(2):
        assert set(idx[h].tolist()) == set(torch.topk(scores[h], 10).indices.tolist())
    assert not torch.equal(idx[0], idx[1])  # heads choose independently (GQA: per KV head)
    assert torch.equal(idx, torch.sort(idx, dim=-1).values)


def test_window_and_text_prior():
    scores = torch.linspace(1, 0, 40)[None].repeat(2, 1)  # early tokens score highest
    modality = torch.full((40,), 1, dtype=torch.int8)
    modality[[3, 20, 25]] = 0  # three text tokens among visual ones
    idx = select_tokens(scores, 12, modality=modality, window=4, text_prior=False, keep_all_text=False)
    assert set(range(36, 40)) <= set(idx[0].tolist())  # recent window kept
    assert set(range(8)) == set(idx[0].tolist()) - set(range(36, 40))  # the rest by score
    idx = select_tokens(scores, 12, modality=modality, window=4, text_prior=True, keep_all_text=False)
    assert {3, 20, 25} <= set(idx[0].tolist()) and idx.shape[1] == 12  # text first, inside the budget
    small = select_tokens(scores, 2, modality=modality, window=0, text_prior=True, keep_all_text=False)
    assert set(small[0].tolist()) == {3, 20}  # budget smaller than the text: best-scored text wins
    # Window is capped at half of the budget.
    idx = select_tokens(scores, 6, modality=modality, window=16, text_prior=False, keep_all_text=False)
    assert set(idx[0].tolist()) == {0, 1, 2, 37, 38, 39}
    # keep_all_text: all text kept outside the budget.
    idx = select_tokens(scores, 8, modality=modality, window=4, text_prior=False, keep_all_text=True)
    assert {3, 20, 25} <= set(idx[0].tolist()) and idx.shape[1] == 8 + 3


def test_recency_and_window_scorers():
    s = RecencyScorer(sink=2).score(RowStats(), 3, 10, "cpu")
    idx = select_tokens(s, 5, modality=torch.zeros(10, dtype=torch.int8), window=0, text_prior=False,
                        keep_all_text=False)
    assert idx[0].tolist() == [0, 1, 7, 8, 9]
    raw = torch.zeros(1, 11)
    raw[0, 5] = 1.0
    pooled = WindowAttentionScorer(window=4, pool_kernel=3).score(RowStats(window_scores=raw), 1, 11, "cpu")
    assert pooled[0, 4] > 0 and pooled[0, 6] > 0 and pooled[0, 2] == 0


# --------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("mode", ["average", "pivot", "weighted"])
def test_merge_values_only_keeps_keys(mode):
    _, keys, values = rand_qkv(2, 2, length=30, d=8, seed=5)
    modality = torch.ones(30, dtype=torch.int8)
    keep = select_tokens(torch.rand(2, 30, generator=torch.Generator().manual_seed(2)), 10, modality=modality,
                         window=0, text_prior=False, keep_all_text=False)
    k_m, v_m = KVMerger(mode=mode).reduce(keys, values, keep, modality)
    k_e, v_e = gather_tokens(keys, keep), gather_tokens(values, keep)
    assert torch.equal(k_m, k_e)  # keys untouched
    assert not torch.allclose(v_m, v_e)  # values absorbed the evicted ones
    assert torch.isfinite(v_m).all()
    k_mk, _ = KVMerger(mode=mode, merge_keys=True).reduce(keys, values, keep, modality)
    assert not torch.allclose(k_mk, k_e)


def test_average_merge_is_the_mean_of_pivot_and_its_evicted():
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [1.0, 0.05]]])
    values = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0]]])
    keep = torch.tensor([[0, 1]])
    _, v = KVMerger(mode="average").reduce(keys, values, keep, torch.ones(5, dtype=torch.int8))
    # tokens 2 and 4 are closest to token 0, token 3 to token 1
    assert v[0, :, 0].tolist() == pytest.approx([(1 + 3 + 5) / 3, (2 + 4) / 2])
    # within_modality: an evicted text token is not merged into a visual token
    modality = torch.tensor([1, 0, 0, 1, 1], dtype=torch.int8)
    _, v = KVMerger(mode="average").reduce(keys, values, keep, modality)
    assert v[0, :, 0].tolist() == pytest.approx([(1 + 4 + 5) / 3, (2 + 3) / 2])
    assert evicted_indices(keep, 5).tolist() == [[2, 3, 4]]


def test_merge_changes_attention_output_and_is_finite_in_half_precision():
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 64, 16, generator=g), torch.randn(2, 64, 16, generator=g)
    q = torch.randn(2, 1, 16, generator=g)
    modality = torch.ones(64, dtype=torch.int8)
    keep = select_tokens(torch.rand(2, 64, generator=g), 16, modality=modality, window=2, text_prior=False,
                         keep_all_text=False)
    k_e, v_e = gather_tokens(keys, keep), gather_tokens(values, keep)
    k_m, v_m = KVMerger().reduce(keys, values, keep, modality)
    out_e = F.scaled_dot_product_attention(q, k_e, v_e)
    out_m = F.scaled_dot_product_attention(q, k_m, v_m)
    assert not torch.allclose(out_e, out_m)
    k16, v16 = KVMerger().reduce(keys.half(), values.half(), keep, modality)
    assert k16.dtype == torch.float16 and torch.isfinite(v16).all()
