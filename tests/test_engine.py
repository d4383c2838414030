"""End-to-end engine tests on tiny random models of the real architectures (CPU, no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from meda_engine import (
    CompressionConfig,
    ConfigError,
    ContextLengthError,
    Engine,
    GenerationConfig,
    Message,
    Request,
    UnsupportedModelError,
    Video,
)
from meda_engine.config import METHODS, RECONSTRUCTION_METHODS
from tiny_models import MULTIMODAL, build_checkpoint

torch.set_num_threads(1)
RNG = np.random.default_rng(0)
VIDEO = RNG.integers(0, 255, (6, 112, 112, 3), dtype=np.uint8)
LONG_VIDEO = RNG.integers(0, 255, (16, 112, 112, 3), dtype=np.uint8)
IMAGE = RNG.integers(0, 255, (60, 90, 3), dtype=np.uint8)
QUESTION = "what colour is the circle in the first frame of the video and how many squares are there ?"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {fam: build_checkpoint(fam, root / fam, seed=1) for fam in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llama")}


@pytest.fixture(scope="module")
def engines(checkpoints):
    return {fam: Engine.from_pretrained(str(path), device="cpu", dtype="float32") for fam, path in checkpoints.items()}


def hf_greedy(path, family, prompt, max_new_tokens):
    """transformers' own generate on the same checkpoint and inputs (eager attention, DynamicCache)."""
    cls = AutoModelForImageTextToText if family in MULTIMODAL else AutoModelForCausalLM
    ref = cls.from_pretrained(str(path), attn_implementation="eager").eval()
    inputs = {"input_ids": prompt.input_ids[None], "attention_mask": torch.ones(1, prompt.length, dtype=torch.long)}
    if family in MULTIMODAL:
        inputs.update(mm_token_type_ids=prompt.modality[None].int(), **prompt.vision)
        if family == "qwen2_5_vl" and "video_grid_thw" in prompt.vision:
            inputs["second_per_grid_ts"] = torch.tensor(prompt.extra["second_per_grid_ts"])
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, prompt.length:].tolist()
    eos = ref.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    for i, t in enumerate(out):
        if t in eos:
            return out[:i]
    return out


def make_request(family, *, video=VIDEO, images=(IMAGE,), max_new_tokens=12, **kw):
    mm = family in MULTIMODAL
    return Request(prompt=QUESTION, video=video if mm else None, images=list(images) if mm else [], video_fps=2.0,
                   generation=GenerationConfig(max_new_tokens=max_new_tokens), **kw)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llama"])
def test_full_and_budget_one_match_transformers_generate(family, checkpoints, engines):
    eng = engines[family]
    req = make_request(family)
    prompt = eng.prepare(req).prompt
    expected = hf_greedy(checkpoints[family], family, prompt, 12)
    assert len(set(expected)) > 1, "degenerate reference output; the test would be vacuous"
    for method in METHODS:
        out = eng.generate([req], compression=CompressionConfig(method=method, budget=1.0))[0]
        assert out.token_ids == expected, method
        assert out.telemetry.kv_keep_ratio == 1.0


def test_image_only_and_video_only_prompts_match_transformers(checkpoints, engines):
    for kw in ({"video": None}, {"images": ()}):
        req = make_request("qwen2_5_vl", **kw)
        prompt = engines["qwen2_5_vl"].prepare(req).prompt
        expected = hf_greedy(checkpoints["qwen2_5_vl"], "qwen2_5_vl", prompt, 8)
        got = engines["qwen2_5_vl"].generate([req], compression=CompressionConfig("full"), max_new_tokens=8)[0]
        assert got.token_ids == expected


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("full", *RECONSTRUCTION_METHODS)])  # kvzip: text only, tests/test_kvzip.py
def test_compressed_cache_holds_budget_per_layer_and_bytes_match(method, engines):
    eng = engines["qwen2_vl"]
    req = make_request("qwen2_vl", video=LONG_VIDEO)
    out = eng.generate([req], compression=CompressionConfig(method=method, budget=0.25))[0]
    t = out.telemetry
    n = t.n_prompt_tokens
    assert len(t.layer_budgets) == eng.dims.n_layers
    # The per-layer counts conserve the requested mean budget (within one token per layer of rounding).
    assert abs(sum(t.layer_budgets) - round(0.25 * n * eng.dims.n_layers)) <= 1
    # Bytes are measured from the tensors held; they must equal tokens x heads x head_dim x 2 (K, V) x 4 B.
    per_token = eng.dims.n_kv_heads * eng.dims.head_dim * 2 * 4
    assert t.kv_bytes_full == n * eng.dims.n_layers * per_token
    assert t.kv_bytes_kept == sum(t.layer_budgets) * per_token
    assert abs(t.kv_keep_ratio - 0.25) < 0.02
    assert out.token_ids, "generated nothing"


def test_cache_layers_physically_shrink(engines):
    """Inspect the cache right after compression: each layer's tensor is only as long as its budget
    (plus room for the new tokens), and the prefill buffers are gone."""
    from meda_engine import engine as engine_mod

    eng = engines["qwen2_vl"]
    seen = {}
    original = engine_mod.compress_cache

    def spy(cache, *args, **kwargs):
        outcomes = original(cache, *args, **kwargs)
        seen["caps"] = [layer.capacity for layer in cache.layers]
        seen["lens"] = [layer.lengths_host[0] for layer in cache.layers]
        seen["bytes"] = cache.allocated_bytes()
        return outcomes

    engine_mod.compress_cache = spy
    try:
        out = eng.generate([make_request("qwen2_vl", video=LONG_VIDEO, max_new_tokens=5)],
                           compression=CompressionConfig("meda", budget=0.2))[0]
    finally:
        engine_mod.compress_cache = original
    reserve = 5
    assert seen["lens"] == out.telemetry.layer_budgets
    assert seen["caps"] == [n + reserve for n in seen["lens"]]
    per_slot = eng.dims.n_kv_heads * eng.dims.head_dim * 2 * 4
    assert seen["bytes"] == sum(seen["caps"]) * per_slot
    assert max(seen["lens"]) < out.telemetry.n_prompt_tokens


def test_meda_budgets_follow_entropy_and_differ_by_layer(engines):
    eng = engines["qwen2_vl"]
    out = eng.generate([make_request("qwen2_vl", video=LONG_VIDEO)], compression=CompressionConfig("meda", budget=0.3))[0]
    t = out.telemetry
    assert t.entropy_variant == "paper"
    ent = t.layer_entropies
    assert ent is not None and len(ent) == eng.dims.n_layers and all(np.isfinite(ent))
    # Higher entropy -> more cache (softmax allocation is monotone in the entropy).
    order_e = np.argsort(ent)
    assert all(t.layer_budgets[order_e[i]] <= t.layer_budgets[order_e[i + 1]] + 1 for i in range(len(ent) - 1))
    code = eng.generate([make_request("qwen2_vl", video=LONG_VIDEO)],
                        compression=CompressionConfig("meda", budget=0.3, entropy="code"))[0]
    assert code.telemetry.entropy_variant == "code"
    assert code.telemetry.layer_entropies != ent


def test_batched_equals_one_at_a_time(engines):
    """Different prompt lengths, media, methods and budgets in one batch: each output equals its
    output when run alone."""
    eng = engines["qwen2_vl"]
    reqs = [
        Request(prompt=QUESTION, video=LONG_VIDEO, video_fps=2.0, compression=CompressionConfig("meda", budget=0.2),
                generation=GenerationConfig(max_new_tokens=10)),
        Request(prompt="describe the image .", images=[IMAGE], compression=CompressionConfig("snapkv", budget=0.5),
                generation=GenerationConfig(max_new_tokens=6)),
        Request(prompt="how many frames ?", video=VIDEO, video_fps=2.0,
                generation=GenerationConfig(max_new_tokens=12)),  # engine default: full
        Request(prompt=QUESTION, video=VIDEO, images=[IMAGE], video_fps=2.0,
                compression=CompressionConfig("pyramidkv", budget=0.4), generation=GenerationConfig(max_new_tokens=9)),
        Request(prompt=QUESTION, video=LONG_VIDEO, video_fps=2.0, compression=CompressionConfig("lookm", budget_tokens=24),
                generation=GenerationConfig(max_new_tokens=7)),
    ]
    batched = eng.generate(reqs)
    alone = [eng.generate([r])[0] for r in reqs]
    assert len({r.telemetry.n_prompt_tokens for r in batched}) >= 3
    for b, a in zip(batched, alone):
        assert b.token_ids == a.token_ids
        assert b.telemetry.layer_budgets == a.telemetry.layer_budgets
        assert b.telemetry.kv_bytes_kept == a.telemetry.kv_bytes_kept
        assert b.telemetry.batch_size == len(reqs)
    assert [len(r.token_ids) for r in batched] == [len(r.token_ids) for r in alone]
    assert all(len(r.token_ids) <= q.generation.max_new_tokens for r, q in zip(batched, reqs))


def test_text_lm_batched_and_compressed(engines):
    eng = engines["llama"]
    reqs = [Request(prompt=QUESTION * k, compression=CompressionConfig(m, budget=0.3),
                    generation=GenerationConfig(max_new_tokens=8))
            for k, m in ((1, "h2o"), (3, "meda"), (2, "streamingllm"))]
    batched = eng.generate(reqs)
    for r, b in zip(reqs, batched):
        assert eng.generate([r])[0].token_ids == b.token_ids
    assert batched[1].telemetry.entropy_variant == "code"  # no visual tokens: the paper variant is undefined


def test_query_agnostic_protocol(engines):
    eng = engines["qwen2_vl"]
    full_q = eng.generate([make_request("qwen2_vl", query_after_compression=True)], compression=CompressionConfig("full"))
    full = eng.generate([make_request("qwen2_vl")], compression=CompressionConfig("full"))
    # Without compression, feeding the question after the video is the same computation.
    assert full_q[0].token_ids == full[0].token_ids
    comp = eng.generate([make_request("qwen2_vl", video=LONG_VIDEO, query_after_compression=True)],
                        compression=CompressionConfig("snapkv", budget=0.2))[0]
    prompt = eng.prepare(make_request("qwen2_vl", video=LONG_VIDEO, query_after_compression=True)).prompt
    # Only the context (up to the last visual token) was compressed.
    assert prompt.n_context < prompt.length
    assert abs(sum(comp.telemetry.layer_budgets) - round(0.2 * prompt.n_context * eng.dims.n_layers)) <= 1


def test_answer_from_compressed_cache(engines):
    """All but the last prompt token are compressed; every answer token is decoded from the compressed cache."""
    for fam in ("qwen2_vl", "llama"):
        eng = engines[fam]
        split = eng.generate([make_request(fam, answer_from_compressed_cache=True)], compression=CompressionConfig("full"))
        whole = eng.generate([make_request(fam)], compression=CompressionConfig("full"))
        assert split[0].token_ids == whole[0].token_ids  # the same computation, fed in two parts
    req = make_request("qwen2_vl", video=LONG_VIDEO, answer_from_compressed_cache=True)
    prompt = engines["qwen2_vl"].prepare(req).prompt
    assert prompt.n_context == prompt.length - 1
    out = engines["qwen2_vl"].generate([req], compression=CompressionConfig("snapkv", budget=0.2))[0]
    n_layers = engines["qwen2_vl"].dims.n_layers
    assert abs(sum(out.telemetry.layer_budgets) - round(0.2 * (prompt.length - 1) * n_layers)) <= 1


def test_stop_strings_eos_and_sampling(engines):
    eng = engines["llama"]
    base = eng.generate([make_request("llama", max_new_tokens=12)])[0]
    assert base.finish_reason in ("length", "stop")
    words = base.text.split()
    assert len(words) >= 3
    stopped = eng.generate([Request(prompt=QUESTION, generation=GenerationConfig(max_new_tokens=12, stop=(words[2],)))])[0]
    assert stopped.finish_reason == "stop" and words[2] not in stopped.text
    s1 = eng.generate([Request(prompt=QUESTION, generation=GenerationConfig(max_new_tokens=10, temperature=1.0, seed=7))])
    s2 = eng.generate([Request(prompt=QUESTION, generation=GenerationConfig(max_new_tokens=10, temperature=1.0, seed=7))])
    s3 = eng.generate([Request(prompt=QUESTION, generation=GenerationConfig(max_new_tokens=10, temperature=1.0, seed=8))])
    assert s1[0].token_ids == s2[0].token_ids
    assert s1[0].token_ids != s3[0].token_ids


def test_stream_yields_text_then_result(engines):
    eng = engines["qwen2_vl"]
    events = list(eng.stream([make_request("qwen2_vl", max_new_tokens=6)], compression=CompressionConfig("meda", budget=0.3)))
    deltas = "".join(e.delta for e in events if e.result is None)
    final = [e.result for e in events if e.result is not None]
    assert len(final) == 1 and final[0].text == deltas


def test_telemetry_is_complete(engines):
    out = engines["qwen2_vl"].generate([make_request("qwen2_vl")], compression=CompressionConfig("meda", budget=0.5))[0]
    t = out.telemetry
    assert t.n_text_tokens + t.n_visual_tokens == t.n_prompt_tokens and t.n_visual_tokens > 0
    assert t.n_frames == VIDEO.shape[0]
    assert t.prefill_s > 0 and t.compress_s >= 0 and t.decode_s >= 0
    assert t.peak_mem_bytes > 0 and t.peak_mem_kind in ("rss_hwm", "rss_lifetime_peak")
    assert t.kv_bytes_allocated >= t.kv_bytes_kept > 0
    assert t.to_dict()["method"] == "meda"


def test_errors_are_clear(engines, tmp_path):
    eng = engines["qwen2_vl"]
    with pytest.raises(ConfigError, match="unknown compression method"):
        CompressionConfig(method="magic")
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="budget"):
            CompressionConfig(budget=bad)
    with pytest.raises(ConfigError, match="empty prompt"):
        Request(prompt="   ")
    with pytest.raises(ConfigError, match="empty prompt"):
        Request(messages=[Message("user", [""])])
    many = np.zeros((600, 112, 112, 3), dtype=np.uint8)  # 600 frames x 16 tokens / 2 > 4096-token context
    with pytest.raises(ContextLengthError, match="exceeds the model's context"):
        eng.prepare(Request(prompt="what ?", video=Video(many)))
    with pytest.raises(ConfigError, match="text-only"):
        engines["llama"].prepare(Request(prompt="what ?", images=[IMAGE]))
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(UnsupportedModelError, match="no adapter for model_type 'bert'"):
        Engine.from_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
