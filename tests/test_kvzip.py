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


def test_kvzip_row_in_a_batch_equals_it_alone_and_leaves_its_neighbours_alone(engine):
    """Batched prefill: a kvzip row (wider forward) beside a snapkv and a full row."""
    reqs = [_request(compression=CompressionConfig(method="kvzip", budget=0.3)),
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


def test_kvzip_on_a_prompt_with_video_fails_alone(tmp_path):
    import numpy as np

    ckpt = build_checkpoint("qwen2_vl", tmp_path / "vl", seed=1)
    eng = Engine.from_pretrained(str(ckpt), device="cpu", dtype="float32")
    video = np.random.default_rng(0).integers(0, 255, (4, 112, 112, 3), dtype=np.uint8)
    bad = Request(prompt="what is in the video ?", video=video, video_fps=2.0,
                  compression=CompressionConfig(method="kvzip", budget=0.5), generation=GenerationConfig(max_new_tokens=4))
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
