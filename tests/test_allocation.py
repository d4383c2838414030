"""Per-layer KV budget allocation: exact totals in every case (ties, huge entropy spreads, tiny
budgets), clear errors on non-finite entropies, the floor flag, and a test-only injection of the
old per-layer rounding bug that the sweep catches."""

from __future__ import annotations

import math
import random

import pytest

from meda_engine.attention import PrefillStats, RowPlan
from meda_engine.compression import EntropyAllocator, clamp_to_mean, clamp_to_mean_log, ratios_to_tokens
from meda_engine.compression import compressor
from meda_engine.compression.allocators import token_target
from meda_engine.compression.methods import build_method
from meda_engine.config import CompressionConfig

BUDGETS = [0.001, 0.01, 0.05, 0.1, 0.15, 0.2, 1 / 3, 0.5, 0.75, 0.99]
LENGTHS = [1, 2, 3, 7, 10, 33, 100, 513, 1040, 4097]
LAYERS = [1, 2, 3, 7, 24, 28]


def entropy_profiles(n: int, rng: random.Random) -> list[tuple[str, list[float], float]]:
    """(name, entropies, temperature): random, all tied, tied pairs, and spreads far past 45 x T."""
    base = [rng.gauss(3.0, 0.7) for _ in range(n)]
    pairs = [round(rng.uniform(0, 4), 1) for _ in range((n + 1) // 2)]
    return [
        ("random", base, 1.0),
        ("tied", [2.5] * n, 1.0),
        ("tied_pairs", [pairs[i // 2] for i in range(n)], 1.0),
        ("spread_60", [60.0 * i / max(1, n - 1) for i in range(n)], 1.0),
        ("spread_1000_T0.1", [rng.uniform(0, 1000) for _ in range(n)], 0.1),
        ("one_outlier", [0.0] * (n - 1) + [500.0], 1.0),
    ]


def sweep_cases():
    rng = random.Random(0)
    for n in LAYERS:
        for name, ent, temp in entropy_profiles(n, rng):
            for budget in BUDGETS:
                for length in LENGTHS:
                    yield n, name, ent, temp, budget, length


def allocation(budget: float, length: int, ent: list[float], temp: float) -> tuple[list[int], bool]:
    """The engine's allocation for one row: `compressor.allocate` on real statistics records."""
    n = len(ent)
    method = build_method(CompressionConfig(method="meda", budget=budget, entropy="code", temperature=temp))
    stats = PrefillStats([RowPlan()], n)
    for l in range(n):
        stats.layers[l][0].row_entropy = ent[l]
    counts, used, floor = compressor.allocate(method, stats, 0, length, n, "code")
    assert used == ent
    return counts, floor


def sweep_violations() -> tuple[int, list[str]]:
    bad, cases = [], 0
    for n, name, ent, temp, budget, length in sweep_cases():
        cases += 1
        if budget >= 1.0:
            continue
        counts, floor = allocation(budget, length, ent, temp)
        asked = round(budget * length * n)
        expected = min(max(asked, n), n * length)
        problems = []
        if len(counts) != n:
            problems.append(f"{len(counts)} counts")
        if sum(counts) != expected:
            problems.append(f"total {sum(counts)} != {expected}")
        if not all(1 <= c <= length for c in counts):
            problems.append(f"bounds {min(counts)}..{max(counts)}")
        if floor != (asked < n):
            problems.append(f"floor flag {floor}")
        if problems:
            bad.append(f"n={n} {name} T={temp} budget={budget} L={length}: {', '.join(problems)}")
    return cases, bad


def test_sweep_totals_are_exact_and_bounded():
    cases, bad = sweep_violations()
    assert cases == len(LAYERS) * 6 * len(BUDGETS) * len(LENGTHS)
    assert not bad, f"{len(bad)} of {cases} cases wrong, e.g. {bad[:5]}"


def test_sweep_catches_per_layer_rounding(monkeypatch):
    """Inject the bug the apportionment replaces (round each layer on its own) and watch the sweep fail."""

    def per_layer_round(ratios, length, *, minimum=1, budget=None):
        return [min(max(round(r * length), minimum), length) for r in ratios]

    monkeypatch.setattr(compressor, "ratios_to_tokens", per_layer_round)
    cases, bad = sweep_violations()
    assert len(bad) > 50, bad[:3]
    assert any("total" in b for b in bad)


def test_sweep_catches_a_capped_continuous_solver(monkeypatch):
    """Inject the old bisection (scale bounded by 1e18, so a spread above ~45 x T cannot reach the
    target) and watch the sweep fail: the apportionment alone must not hide a wrong solver."""

    def capped(log_weights, mean, low, high):
        m = max(log_weights)
        w = [math.exp(x - m) for x in log_weights]
        target = mean * len(w)
        tot = lambda c: sum(min(high, max(low, c * x)) for x in w)  # noqa: E731
        lo, hi = 0.0, 1.0
        while tot(hi) < target and hi < 1e18:
            hi *= 2
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if tot(mid) < target else (lo, mid)
        return [min(high, max(low, hi * x)) for x in w]

    from meda_engine.compression import allocators

    def misses() -> int:
        n_bad = 0
        for n, name, ent, temp, budget, length in sweep_cases():
            if name in ("spread_60", "one_outlier", "spread_1000_T0.1") and length == 1:
                ratios = EntropyAllocator(temp).ratios(budget, n, ent)
                n_bad += not math.isclose(math.fsum(ratios), budget * n, rel_tol=1e-9, abs_tol=1e-12)
        return n_bad

    assert misses() == 0  # the exact solver meets the mean at every spread ...
    monkeypatch.setattr(allocators, "clamp_to_mean_log", capped)
    assert misses() > 10  # ... the capped bisection does not


@pytest.mark.parametrize("spread", [10.0, 45.0, 46.0, 100.0, 800.0, 5000.0])
def test_huge_spread_keeps_mean_and_order(spread):
    ent = [0.0, spread * 0.25, spread * 0.5, spread]
    r = EntropyAllocator(temperature=1.0, min_ratio=0.01, max_ratio=1.0).ratios(0.3, 4, ent)
    assert math.fsum(r) / 4 == pytest.approx(0.3, abs=1e-12)
    assert all(a <= b for a, b in zip(r, r[1:]))  # monotone in the entropy
    assert min(r) >= 0.01 and max(r) <= 1.0


def test_clamp_to_mean_log_matches_the_linear_form():
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(1, 12)
        w = [rng.uniform(0, 3) for _ in range(n)]
        low, high = rng.uniform(0, 0.2), rng.uniform(0.5, 1.0)
        mean = rng.uniform(low, high)
        r = clamp_to_mean(w, mean, low, high)
        assert math.fsum(r) == pytest.approx(mean * n, rel=1e-12, abs=1e-12)
        assert all(low - 1e-15 <= x <= high + 1e-15 for x in r)
        free = [i for i, x in enumerate(r) if low < x < high]
        if len(free) > 1:  # one scale for every free layer
            scale = [r[i] / w[i] for i in free]
            assert max(scale) == pytest.approx(min(scale), rel=1e-9)
        assert clamp_to_mean_log([math.log(x) for x in w], mean, low, high) == pytest.approx(r, rel=1e-12)


def test_zero_weights_are_filled_last():
    r = clamp_to_mean([0.0, 1.0, 2.0], 0.9, 0.1, 1.0)
    assert r[1] == r[2] == 1.0 and r[0] == pytest.approx(0.7)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_entropies_raise(bad):
    with pytest.raises(ValueError, match="finite"):
        EntropyAllocator().ratios(0.2, 3, [1.0, bad, 2.0])
    with pytest.raises(ValueError, match="meda: cannot allocate the per-layer KV budget.*finite"):
        allocation(0.2, 100, [1.0, bad, 2.0], 1.0)
    with pytest.raises(ValueError, match="finite"):
        ratios_to_tokens([0.2, bad], 10, budget=0.2)


def test_floor_flag_and_target():
    assert token_target(0.001, 100, 24) == (24, True)  # 2.4 tokens asked, 24 kept: the floor wins
    assert token_target(0.01, 100, 24) == (24, False)
    assert token_target(0.2, 0, 24) == (0, False)
    counts, floor = allocation(0.001, 100, [1.0] * 24, 1.0)
    assert counts == [1] * 24 and floor
    counts, floor = allocation(0.2, 100, [1.0] * 24, 1.0)
    assert counts == [20] * 24 and not floor


def test_ratios_to_tokens_exact_even_when_ratios_drift():
    """The apportionment meets the budget's total even for ratios that do not sum to it."""
    for ratios in ([0.0] * 5, [1.0] * 5, [0.5, 0.1, 0.9, 0.0, 0.3]):
        for length in (1, 9, 1000):
            counts = ratios_to_tokens(ratios, length, budget=0.37)
            assert sum(counts) == min(max(round(0.37 * length * 5), 5), 5 * length)
            assert all(1 <= c <= length for c in counts)


# ------------------------------------------------------------- statistics memory: stats_chunk_bytes
# The statistics' score blocks (attention.stats_chunks) must fit in chunk_bytes at any length: the
# old rule never went below 16 query rows over all heads and keys (171 MiB at 28 heads x 100k keys
# against 64 MiB).
import torch  # noqa: E402

from meda_engine import attention  # noqa: E402
from meda_engine.attention import StatsChunks, attention_from_rows, cross_modal_entropy, stats_chunks  # noqa: E402

MiB = 2**20


@pytest.mark.parametrize("n_kv,group,n_rows,n_keys", [(4, 7, 512, 100_000), (2, 14, 512, 1_000_000),
                                                      (28, 1, 16, 5_000_000), (1, 1, 1, 10), (8, 2, 300, 777)])
@pytest.mark.parametrize("chunk_bytes", [12, 1000, MiB, 64 * MiB])
def test_stats_chunk_plan_fits(n_kv, group, n_rows, n_keys, chunk_bytes):
    p = stats_chunks(n_kv, group, n_rows, n_keys, chunk_bytes)
    assert 3 * 4 * p.block_elems <= chunk_bytes
    assert 1 <= p.kv_heads <= n_kv and 1 <= p.group_heads <= group and 1 <= p.rows <= n_rows and 1 <= p.keys <= n_keys
    if p.keys < n_keys:  # keys are cut only when one row of one head does not fit
        assert 3 * 4 * n_keys > chunk_bytes


class MatmulWatch:
    """Wraps torch.matmul (the statistics' scoring matmul) and records the largest result held."""

    def __init__(self, monkeypatch):
        self.largest = 0
        real = torch.matmul

        def watched(a, b, *args, **kwargs):
            out = real(a, b, *args, **kwargs)
            self.largest = max(self.largest, out.untyped_storage().nbytes())
            return out

        monkeypatch.setattr(torch, "matmul", watched)


def big_qk(n_q=28, n_kv=4, length=100_000, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_q, length, d, generator=g), torch.randn(n_kv, length, d, generator=g)


def test_stats_memory_bounded_at_100k_keys(monkeypatch):
    torch.set_num_threads(1)
    q, k = big_qk()
    rows = torch.arange(100_000 - 16, 100_000)  # 16 query rows over 100k keys, 28 query heads
    ref_col, ref_ent = attention_from_rows(q, k, 0.35, rows, chunk_bytes=2**40, want_row_entropy=True)
    watch = MatmulWatch(monkeypatch)
    for chunk in (64 * MiB, 8 * MiB, MiB):  # rows; then query heads of a group; then keys (two passes)
        watch.largest = 0
        col, ent = attention_from_rows(q, k, 0.35, rows, chunk_bytes=chunk, want_row_entropy=True)
        assert 0 < watch.largest <= chunk // 3, (chunk, watch.largest)
        torch.testing.assert_close(col, ref_col, rtol=1e-4, atol=1e-6)
        assert ent == pytest.approx(ref_ent, rel=1e-6)
    assert stats_chunks(4, 7, 16, 100_000, MiB).keys < 100_000  # the last one really cut the keys


def test_stats_bound_catches_the_old_16_row_floor(monkeypatch):
    """Inject the old chunk rule (>= 16 rows over all heads and keys): the watch sees the bound broken."""
    q, k = big_qk(length=40_000)
    rows = torch.arange(40_000 - 16, 40_000)

    def old_rule(n_kv, group, n_rows, n_keys, chunk_bytes, temporaries=3):
        per_row = n_kv * group * n_keys * 4 * temporaries
        return StatsChunks(n_kv, group, max(16, chunk_bytes // per_row), n_keys)

    monkeypatch.setattr(attention, "stats_chunks", old_rule)
    watch = MatmulWatch(monkeypatch)
    attention_from_rows(q, k, 0.35, rows, chunk_bytes=8 * MiB)
    assert watch.largest > 8 * MiB


def test_cross_modal_entropy_chunked_equals_unchunked(monkeypatch):
    q, k = big_qk(n_q=28, n_kv=4, length=600, seed=1)
    modality = torch.zeros(600, dtype=torch.int8)
    modality[20:520] = 1  # 500 visual tokens between text
    ref = cross_modal_entropy(q, k, 0.35, modality, chunk_bytes=2**40)
    watch = MatmulWatch(monkeypatch)
    got = cross_modal_entropy(q, k, 0.35, modality, chunk_bytes=4096)  # keys cut for the 500 visual keys
    assert stats_chunks(4, 7, 100, 500, 4096).keys < 500
    assert watch.largest <= 4096 // 3
    assert got == pytest.approx(ref, rel=1e-6)


# ------------------------------------------------------------ M-RoPE positions: the pinned convention
from meda_engine import hf_glue  # noqa: E402


def video_prompt(tok):
    """3 text tokens, a video of grid (t=4, h=4, w=4) = 4 x 2 x 2 = 16 tokens after the 2x2 merge, 3 text."""
    vid = tok.convert_tokens_to_ids("<|video_pad|>")
    ids = torch.tensor([5, 6, 7] + [vid] * 16 + [8, 9, 10])
    mm = torch.tensor([0] * 3 + [2] * 16 + [0] * 3, dtype=torch.int32)
    return ids, mm, torch.tensor([[4, 4, 4]])


@pytest.mark.parametrize("family,t_step", [("qwen2_vl", 1), ("qwen2_5_vl", 2)])
def test_mrope_text_after_video_follows_the_pinned_convention(family, t_step):
    """transformers 5.23 (the pinned range): the text after a video resumes at the video's start +
    max(h, w)/merge = 3 + 2, inside the video's time span (temporal positions 3 .. 3 + 3*t_step)."""
    import tiny_models

    model, tok = tiny_models.build_model(family)
    ids, mm, grid = video_prompt(tok)
    pos = hf_glue.mrope_positions(model, input_ids=ids, mm_token_type_ids=mm, image_grid_thw=None,
                                  video_grid_thw=grid)
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[0, 3:19].tolist() == [3 + t_step * (i // 4) for i in range(16)]  # 4 temporal groups
    assert pos[1, 3:19].tolist() == [3, 3, 4, 4] * 4 and pos[2, 3:19].tolist() == [3, 4] * 8
    assert pos[:, 19:].tolist() == [[5, 6, 7]] * 3  # inside the time span, not after 3 + 3 * t_step
    assert int(pos[0, 3:19].max()) >= 6


def test_mrope_other_convention_fails_loudly(monkeypatch):
    """An install that places the text after the video's largest position (earlier 5.x) must raise,
    not decode differently: inject that behaviour into get_rope_index."""
    import tiny_models

    model, tok = tiny_models.build_model("qwen2_vl")
    ids, mm, grid = video_prompt(tok)
    base = hf_glue.base_model(model)
    real = base.get_rope_index

    def after_the_video(input_ids, **kwargs):
        pos, delta = real(input_ids, **kwargs)
        pos = pos.clone()
        pos[:, 0, 19:] += int(pos[:, 0, 3:19].max()) + 1 - int(pos[0, 0, 19])
        return pos, delta

    monkeypatch.setattr(base, "get_rope_index", after_the_video)
    with pytest.raises(RuntimeError, match="pinned to"):
        hf_glue.mrope_positions(model, input_ids=ids, mm_token_type_ids=mm, image_grid_thw=None, video_grid_thw=grid)
