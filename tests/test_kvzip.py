"""``kvzip``: context tokens scored by how much the model attends to them while repeating the context.

The reconstruction prompt runs in the prefill forward itself, after the context; its scores must be
what transformers' own eager attention gives on the same concatenated sequence, its K/V must be gone
before compression, the answer must not see it, and a prompt the method cannot serve fails alone.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from meda_engine import CompressionConfig, ConfigError, Engine, GenerationConfig, Request
from meda_engine.scheduler import Scheduler
from meda_engine.attention import PrefillStats, RowPlan
from meda_engine.cache import RaggedKVCache
from meda_engine.compression import build_method
from tiny_models import build_checkpoint

torch.set_num_threads(1)
PROMPT = ("the red circle sits left of the blue square while the green triangle waits below them all "
          "and the yellow star is in the last frame ") * 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint("llama", tmp_path_factory.mktemp("kvzip") / "llama", seed=3)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine.from_pretrained(str(checkpoint), device="cpu", dtype="float32")


def _request(**kw):
    return Request(prompt=PROMPT, generation=GenerationConfig(max_new_tokens=8), **kw)


def test_reconstruction_scores_equal_eager_attention_of_context_plus_repeat(engine, checkpoint):
    prompt = engine.prepare(_request()).prompt
    n = prompt.n_context
    extra = engine.adapter.reconstruction_ids(prompt)
    # the repeat prompt ends with the context itself (minus the template's opening)
    assert extra[-10:].tolist() == prompt.input_ids[n - 10 : n].tolist()
    ids = torch.cat([prompt.input_ids[:n], extra])
    plan = RowPlan(modality=prompt.modality[:n], reconstruct=True, column_sums=True, n_context=n)
    stats = PrefillStats([plan], engine.dims.n_layers, chunk_bytes=4096)  # small blocks: the key-split path too
    with torch.no_grad():
        engine.forward(RaggedKVCache(engine.dims.n_layers, 1, reserve=1), "prefill", ids[None],
                       torch.arange(ids.numel())[None, None], [ids.numel()],
                       modality=torch.zeros(1, ids.numel(), dtype=torch.int32), stats=stats)
    ref = AutoModelForCausalLM.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    with torch.no_grad():
        maps = ref(ids[None], output_attentions=True).attentions
    h_kv, g = engine.dims.n_kv_heads, engine.dims.n_heads // engine.dims.n_kv_heads
    for layer, a in enumerate(maps):
        a = a[0].float()  # (H_q, N, N)
        expected = a[:, n:, :n].amax(dim=1).view(h_kv, g, n).amax(dim=1)
        torch.testing.assert_close(stats.layers[layer][0].recon_scores, expected, rtol=1e-4, atol=1e-6)
        # every other statistic sees the context alone, as without the reconstruction
        torch.testing.assert_close(stats.layers[layer][0].column_sums,
                                   a[:, :n, :n].sum(1).view(h_kv, g, n).mean(1), rtol=1e-4, atol=1e-5)


def test_kvzip_keeps_the_budget_and_holds_no_reconstruction_bytes(engine):
    req = _request()
    n = engine.prepare(req).prompt.n_context
    out = engine.generate([req], compression=CompressionConfig(method="kvzip", budget=0.25))[0]
    t = out.telemetry
    assert abs(sum(t.layer_budgets) - round(0.25 * n * engine.dims.n_layers)) <= 1
    per_token = 2 * engine.dims.n_kv_heads * engine.dims.head_dim * 4 * engine.dims.n_layers
    assert t.kv_bytes_full == n * per_token  # the context's K/V only, not the repeat's
    assert t.kv_bytes_kept == sum(t.layer_budgets) * per_token // engine.dims.n_layers
    # budget 1.0 runs no reconstruction and equals the full cache
    full = engine.generate([req], compression=CompressionConfig(method="full"))[0]
    same = engine.generate([req], compression=CompressionConfig(method="kvzip", budget=1.0))[0]
    assert same.token_ids == full.token_ids


@pytest.mark.parametrize("method", ["kvzip", "kvzip-global"])
def test_kvzip_row_in_a_batch_equals_it_alone_and_leaves_its_neighbours_alone(engine, method):
    """Batched prefill: a kvzip row (wider forward) beside a snapkv and a full row."""
    reqs = [_request(compression=CompressionConfig(method=method, budget=0.3)),
            Request(prompt=PROMPT[:150], compression=CompressionConfig(method="snapkv", budget=0.5),
                    generation=GenerationConfig(max_new_tokens=8)),
            Request(prompt=PROMPT[:90], generation=GenerationConfig(max_new_tokens=8))]
    alone = [engine.generate([r])[0].token_ids for r in reqs]
    rows = engine.prefill_rows([engine.prepare(r) for r in reqs])
    assert [r.cache.layers[0].lengths_host[0] for r in rows][2] == engine.prepare(reqs[2]).prompt.n_context
    sched = Scheduler(engine, max_num_seqs=4)
    handles = [sched.submit(r) for r in reqs]
    assert [h.result().token_ids for h in handles] == alone
    assert sched.stats().prefill_batches >= 1


def test_a_prefill_that_forgot_to_drop_the_reconstruction_is_caught(engine, monkeypatch):
    """The check above can fail: without the truncation the row decodes after the repeat prompt."""
    from meda_engine import engine as engine_mod

    req = _request()
    good = engine.generate([req], compression=CompressionConfig(method="kvzip", budget=0.5))[0]
    monkeypatch.setattr(engine_mod, "truncate_rows", lambda cache, lengths, reserve: None)
    bad = engine.generate([req], compression=CompressionConfig(method="kvzip", budget=0.5))[0]
    assert bad.telemetry.kv_bytes_full > good.telemetry.kv_bytes_full


@pytest.mark.parametrize("method", ["kvzip", "kvzip-global"])
def test_kvzip_on_a_prompt_with_video_fails_alone(tmp_path, method):
    import numpy as np

    ckpt = build_checkpoint("qwen2_vl", tmp_path / "vl", seed=1)
    eng = Engine.from_pretrained(str(ckpt), device="cpu", dtype="float32")
    video = np.random.default_rng(0).integers(0, 255, (4, 112, 112, 3), dtype=np.uint8)
    bad = Request(prompt="what is in the video ?", video=video, video_fps=2.0,
                  compression=CompressionConfig(method=method, budget=0.5), generation=GenerationConfig(max_new_tokens=4))
    good = Request(prompt="what is in the video ?", video=video, video_fps=2.0,
                   compression=CompressionConfig(method="snapkv", budget=0.5), generation=GenerationConfig(max_new_tokens=4))
    with pytest.raises(ConfigError, match="kvzip"):
        eng.adapter.reconstruction_ids(eng.prepare(bad).prompt)
    sched = Scheduler(eng, max_num_seqs=4)
    hb, hg = sched.submit(bad), sched.submit(good)
    assert hg.result().token_ids == eng.generate([good])[0].token_ids
    with pytest.raises(Exception, match="kvzip"):
        hb.result()


def test_kvzip_method_is_the_reconstruction_scorer():
    m = build_method(CompressionConfig(method="kvzip", budget=0.2))
    plan, variant = m.row_plan(torch.zeros(64, dtype=torch.int8), 64)
    assert plan.reconstruct and not plan.column_sums and variant is None


# ---- kvzip-global: the same scores, all layers ranked together ------------------------------------


def _eager_reconstruction_scores(engine, checkpoint, prompt):
    """KVzip's scores from transformers' eager attention maps alone (not the engine's statistics):
    per layer ``(H_kv, n)``, the max over the repeat rows and the group's query heads, sinks on top."""
    n = prompt.n_context
    ids = torch.cat([prompt.input_ids[:n], engine.adapter.reconstruction_ids(prompt)])
    ref = AutoModelForCausalLM.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    with torch.no_grad():
        maps = ref(ids[None], output_attentions=True).attentions
    h_kv, g = engine.dims.n_kv_heads, engine.dims.n_heads // engine.dims.n_kv_heads
    out = []
    for a in maps:
        s = a[0].float()[:, n:, :n].amax(dim=1).view(h_kv, g, n).amax(dim=1)
        s[:, :4] = s.max() + 1.0  # the sink tokens (ReconstructionScorer's default)
        out.append(s)
    return out


def _global_shares(scores, budget):
    """Each layer's share of the (layer, head, token) entries that win a global ranking, in tokens."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    order = torch.argsort(flat, descending=True, stable=True)[: round(budget * flat.numel())]
    layer_of = torch.cat([torch.full((s.numel(),), l) for l, s in enumerate(scores)])
    h_kv = scores[0].shape[0]
    return [float(c) / h_kv for c in torch.bincount(layer_of[order], minlength=len(scores))]


def _misallocated_layers(budgets, shares, length):
    """Layers whose kept count is off the global ranking's share by more than rounding (and the
    1% floor, which the allocator applies: at most one token per layer here)."""
    floor = max(1, int(0.01 * length) + 1)
    return [l for l, (b, w) in enumerate(zip(budgets, shares)) if abs(b - w) > 1.0 + max(0.0, floor - w)]


def test_kvzip_global_keeps_each_layer_its_share_of_the_global_ranking(engine, checkpoint):
    req = _request()
    prompt = engine.prepare(req).prompt
    n, n_layers = prompt.n_context, engine.dims.n_layers
    out = engine.generate([req], compression=CompressionConfig(method="kvzip-global", budget=0.25))[0]
    budgets = out.telemetry.layer_budgets
    assert sum(budgets) == round(0.25 * n * n_layers)  # the total budget, exactly
    shares = _global_shares(_eager_reconstruction_scores(engine, checkpoint, prompt), 0.25)
    assert not _misallocated_layers(budgets, shares, n), (budgets, shares)
    assert max(budgets) - min(budgets) >= 4, "the tiny model's layers should not all win alike"
    uniform = engine.generate([req], compression=CompressionConfig(method="kvzip", budget=0.25))[0]
    assert uniform.telemetry.layer_budgets != budgets
    # the bytes held follow the counts
    per_token = 2 * engine.dims.n_kv_heads * engine.dims.head_dim * 4
    assert out.telemetry.kv_bytes_kept == sum(budgets) * per_token


def test_a_per_layer_ranking_in_kvzip_global_is_caught(engine, checkpoint, monkeypatch):
    """The check above can fail: an allocator that ranks inside each layer (uniform counts) is off."""
    from meda_engine.compression.allocators import GlobalScoreAllocator

    req = _request()
    prompt = engine.prepare(req).prompt
    monkeypatch.setattr(GlobalScoreAllocator, "ratios",
                        lambda self, budget, n_layers, entropies=None, *, scores=None: [budget] * n_layers)
    out = engine.generate([req], compression=CompressionConfig(method="kvzip-global", budget=0.25))[0]
    shares = _global_shares(_eager_reconstruction_scores(engine, checkpoint, prompt), 0.25)
    assert _misallocated_layers(out.telemetry.layer_budgets, shares, prompt.n_context)


def test_global_score_allocator_conserves_the_budget_and_rejects_bad_scores():
    from meda_engine.compression.allocators import GlobalScoreAllocator

    alloc = GlobalScoreAllocator(min_ratio=0.0)
    hot = torch.ones(2, 10)
    cold = torch.zeros(2, 10)
    # layer 0 wins every entry it can: all of it at budget 0.5 over two layers
    assert alloc.ratios(0.5, 2, scores=[hot, cold]) == pytest.approx([1.0, 0.0])
    assert alloc.ratios(0.25, 2, scores=[hot, cold]) == pytest.approx([0.5, 0.0])
    r = GlobalScoreAllocator(min_ratio=0.1).ratios(0.25, 2, scores=[hot, cold])
    assert r == pytest.approx([0.4, 0.1]) and sum(r) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="finite"):
        alloc.ratios(0.5, 2, scores=[hot, torch.full((2, 10), float("nan"))])
    with pytest.raises(ValueError, match="every layer"):
        alloc.ratios(0.5, 2)
