"""``meda-window``: MEDA's entropy allocation on SnapKV's observation-window scores.

Checked against references re-derived from eager attention maps (`reference_impl`, as
`test_reference` checks H2O / SnapKV / StreamingLLM):

1. the per-layer counts are MEDA's allocation (softmax of the layer entropies, clamped, total
   conserved) of the reference ``code`` entropy (mean row entropy over the ``score_queries`` rows),
   and sum exactly to ``round(budget * L * n_layers)``; they are not uniform;
2. within each layer, the kept positions per KV head are SnapKV's selection (window scores, pooled,
   the forced recent window) at that layer's count: the method differs from ``snapkv`` only in the
   allocation;
3. with the allocation replaced by a uniform one (an injected bug), check 1 fails; with the selection
   keeping the lowest scores, check 2 fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import reference_impl as ref
from meda_engine import CompressionConfig, Engine, GenerationConfig, Request
from meda_engine.compression import EntropyAllocator, UniformAllocator, compressor, ratios_to_tokens
from tiny_models import PREPROCESSOR, build_model

torch.set_num_threads(1)
VIDEO = np.random.default_rng(3).integers(0, 255, (8, 112, 112, 3), dtype=np.uint8)
QUESTION = "what colour is the circle in the first frame of the video and how many squares are there ?"
KEY_TOL = 1e-3


@pytest.fixture(scope="module")
def models():
    out = {}
    for fam in ("llama", "qwen2_vl"):
        model, tok = build_model(fam, seed=1)
        eng = Engine.from_model(model, tok, PREPROCESSOR.get(fam))
        eager, _ = build_model(fam, seed=1, attn_implementation="eager")
        out[fam] = (eng, eager)
    return out


def request(family: str) -> Request:
    video = VIDEO if family == "qwen2_vl" else None
    return Request(prompt=" ".join([QUESTION] * (1 if video is not None else 3)), video=video, video_fps=2.0,
                   generation=GenerationConfig(max_new_tokens=1))


def run(eng: Engine, req: Request, comp: CompressionConfig) -> dict:
    """The engine's per-layer kept prompt keys and counts, read from the row right after compression."""
    got: dict = {}
    original = eng.prefill_rows

    def spy(batch, default=None):
        (row,) = original(batch, default)
        (prepared,) = batch
        got["prompt"] = prepared.prompt
        got["tokens"] = list(row.outcome.layer_tokens)
        got["entropies"] = row.outcome.layer_entropies
        got["variant"] = row.outcome.entropy_variant
        got["kept"] = [layer.keys[0, :, :n].clone() for layer, n in zip(row.cache.layers, row.outcome.layer_tokens)]
        return [row]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eng, "prefill_rows", spy)
        eng.generate([req], compression=comp)
    return got


@torch.no_grad()
def eager_maps(eager, prompt, multimodal: bool):
    if hasattr(eager.model, "rope_deltas"):
        eager.model.rope_deltas = None
    cache = DynamicCache(config=eager.config)
    n = prompt.n_context
    out = eager(**ref.hf_inputs(prompt, 0, n, multimodal), past_key_values=cache, use_cache=True,
                output_attentions=True)
    return [a[0] for a in out.attentions], [layer.keys[0, :, :n] for layer in cache.layers]


def code_entropy(attn: torch.Tensor, score_queries: int) -> float:
    """Mean row entropy (nats) of the causal maps ``(H_q, L, L)`` over the scored rows and heads."""
    rows = ref.subsampled_rows(attn.shape[-1], score_queries)
    p = attn[:, rows, :].double()
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())


def meda_ratios(entropies: list[float], budget: float, temperature: float, low: float, high: float) -> list[float]:
    """MEDA's allocation, written independently: ``r_l = clamp(c * softmax(E / T)_l, low, high)`` with
    ``c`` found by bisection (in log space) so that ``mean(r) == budget``."""
    m = max(entropies)
    w = [math.exp((e - m) / temperature) for e in entropies]
    lo, hi = -50.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        r = [min(high, max(low, math.exp(mid) * x)) for x in w]
        lo, hi = (mid, hi) if sum(r) / len(r) < budget else (lo, mid)
    return [min(high, max(low, math.exp(hi) * x)) for x in w]


def check(eng: Engine, eager, family: str, comp: CompressionConfig) -> dict:
    got = run(eng, request(family), comp)
    prompt = got["prompt"]
    n = prompt.n_context
    n_layers = eng.dims.n_layers
    attn, keys = eager_maps(eager, prompt, eng.adapter.multimodal)
    # 1. the allocation: MEDA's, on the reference code entropy
    assert got["variant"] == "code"  # a text-only prompt, or entropy="code"
    want_ent = [code_entropy(a, comp.score_queries) for a in attn]
    assert got["entropies"] == pytest.approx(want_ent, abs=1e-4)
    ratios = meda_ratios(got["entropies"], comp.budget, comp.temperature, min(comp.min_layer_ratio, comp.budget),
                         max(comp.max_layer_ratio, comp.budget))
    want = [r * n for r in ratios]
    assert all(abs(k - w) <= 1 for k, w in zip(got["tokens"], want)), f"not MEDA's allocation: {got['tokens']} vs {want}"
    assert sum(got["tokens"]) == round(comp.budget * n * n_layers)
    # 2. the selection: SnapKV's, at each layer's count
    for l, (kept, full) in enumerate(zip(got["kept"], keys)):
        k = got["tokens"][l]
        if k >= n:
            continue
        mask = ref.match_rows(kept, full, KEY_TOL)
        scores = ref.window_scores(attn[l], keys[0].shape[0], comp.window, comp.pool_kernel)
        want = ref.select_reference(scores, k, comp.window)
        assert torch.equal(mask.sum(dim=1), want.sum(dim=1)), f"layer {l}: kept counts differ"
        diff = mask ^ want
        if diff.any():  # only swaps between reference scores tied within float noise
            tol = 1e-5 * float(scores.abs().max())
            for h in range(mask.shape[0]):
                if diff[h].any():
                    boundary = float(scores[h][want[h]].min())
                    gap = float((scores[h][diff[h]] - boundary).abs().max())
                    assert gap <= tol, f"layer {l} head {h}: kept positions differ (gap {gap:.2e})"
    return got


CASES = [
    ("llama", CompressionConfig("meda-window", budget=0.3, window=4, score_queries=20)),
    ("llama", CompressionConfig("meda-window", budget=0.15, window=4, pool_kernel=3, temperature=0.5)),
    ("qwen2_vl", CompressionConfig("meda-window", budget=0.25, window=6, entropy="code", score_queries=32)),
]


@pytest.mark.parametrize(("family", "comp"), CASES, ids=[f"{f}-{c.budget}" for f, c in CASES])
def test_meda_window_allocates_by_entropy_and_selects_like_snapkv(models, family, comp):
    eng, eager = models[family]
    got = check(eng, eager, family, comp)
    n = got["prompt"].n_context
    uniform = ratios_to_tokens(UniformAllocator().ratios(comp.budget, eng.dims.n_layers), n, budget=comp.budget)
    assert got["tokens"] != uniform, "the allocation is uniform: the check would not tell it from snapkv"
    # same layer counts as meda (the same allocation), different kept sets than meda (another scorer)
    meda = run(eng, request(family), comp.replace(method="meda", merge="none", text_prior=False))
    assert meda["tokens"] == got["tokens"]
    assert any(not torch.equal(a, b) for a, b in zip(meda["kept"], got["kept"]))


def test_meda_window_defaults_evict_without_text_prior():
    cfg = CompressionConfig("meda-window")
    assert cfg.merge_mode == "none" and not cfg.use_text_prior and cfg.entropy == "paper"


@pytest.mark.parametrize("bug", ["uniform_allocation", "lowest_scores"])
def test_meda_window_bugs_are_caught(models, monkeypatch, bug):
    eng, eager = models["llama"]
    comp = CASES[0][1]
    check(eng, eager, "llama", comp)  # passes without the bug
    if bug == "uniform_allocation":
        monkeypatch.setattr(EntropyAllocator, "ratios", lambda self, budget, n_layers, entropies=None: [budget] * n_layers)
        match = "not MEDA's allocation"
    else:
        original = compressor.select_tokens
        monkeypatch.setattr(compressor, "select_tokens", lambda scores, n_keep, **kw: original(-scores, n_keep, **kw))
        match = "differ"
    with pytest.raises(AssertionError, match=match):
        check(eng, eager, "llama", comp)


def test_meda_window_budget_is_exact_over_lengths_and_budgets(models):
    eng, _ = models["llama"]
    for repeat in (1, 2, 5):
        for budget in (0.05, 0.1, 0.2, 0.5):
            req = Request(prompt=" ".join([QUESTION] * repeat), generation=GenerationConfig(max_new_tokens=2))
            out = eng.generate([req], compression=CompressionConfig("meda-window", budget=budget, window=4))[0]
            t = out.telemetry
            n = t.n_prompt_tokens
            want = max(round(budget * n * eng.dims.n_layers), eng.dims.n_layers)
            assert sum(t.layer_budgets) == want and all(1 <= k <= n for k in t.layer_budgets)
            assert t.kv_keep_ratio == pytest.approx(sum(t.layer_budgets) / (n * eng.dims.n_layers))
            assert t.entropy_variant == "code" and len(t.layer_entropies) == eng.dims.n_layers
            assert math.isfinite(sum(t.layer_entropies))
