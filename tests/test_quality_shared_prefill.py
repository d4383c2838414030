"""One prefill shared by every config of an accuracy matrix (`meda_quality.shared_prefill`).

Every answer computed from the shared prefill equals `Engine.generate` on the same request alone,
token for token, with the same per-layer kept counts and keep ratio, for every method (MEDA's
ablations and ``meda-window`` included), in the three protocols (question inside the compressed
prompt, answer from the compressed cache, question after compression), on a tiny Llama and a tiny
Qwen2-VL with video (M-RoPE, cross-modal entropy). The configs run one after another on one shared
prefill, in an order where a compressing config precedes each other config, and the shared cache and
statistics are bitwise unchanged afterwards. Two injected bugs (the cache or the statistics not
copied per config) make the check fail.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from meda_engine import CompressionConfig, Engine, GenerationConfig, Request
from meda_engine.engine import PreparedRequest
from meda_quality import shared_prefill as sp
from tiny_models import PREPROCESSOR, build_model

torch.set_num_threads(1)
VIDEO = np.random.default_rng(3).integers(0, 255, (8, 112, 112, 3), dtype=np.uint8)  # 64 visual tokens
QUESTION = "what colour is the circle in the first frame of the video and how many squares are there ?"
KNOBS = {"window": 4, "score_queries": 16}
CONFIGS = [
    CompressionConfig("meda", budget=0.3, entropy="code", **KNOBS),  # compresses first: the rest must not see it
    CompressionConfig("full", **KNOBS),
    CompressionConfig("streamingllm", budget=0.3, **KNOBS),
    CompressionConfig("h2o", budget=0.3, **KNOBS),
    CompressionConfig("snapkv", budget=0.3, **KNOBS),
    CompressionConfig("pyramidkv", budget=0.3, **KNOBS),
    CompressionConfig("lookm", budget=0.3, **KNOBS),
    CompressionConfig("meda", budget=0.3, **KNOBS),  # paper entropy where the prompt has video
    CompressionConfig("meda", budget=0.3, entropy="code", merge="pivot", **KNOBS),
    CompressionConfig("meda", budget=0.2, entropy="code", merge="none", **KNOBS),
    CompressionConfig("meda-window", budget=0.3, **KNOBS),
    CompressionConfig("meda-window", budget=0.15, **KNOBS),
]


@pytest.fixture(scope="module")
def engines():
    out = {}
    for fam in ("llama", "qwen2_vl"):
        model, tok = build_model(fam, seed=1)
        out[fam] = Engine.from_model(model, tok, PREPROCESSOR.get(fam))
    return out


def prepared(eng: Engine, family: str, protocol: str, n_new: int = 8) -> PreparedRequest:
    video = VIDEO if family == "qwen2_vl" else None
    req = Request(prompt=" ".join([QUESTION] * (1 if video is not None else 3)), video=video, video_fps=2.0,
                  generation=GenerationConfig(max_new_tokens=n_new))
    p = eng.prepare(req)
    n = p.prompt.length
    n_ctx = {"inside": n, "answer_from": n - 1, "query_after": n - 6}[protocol]
    return dataclasses.replace(p, prompt=dataclasses.replace(p.prompt, n_context=n_ctx))


def snapshot(shared: sp.SharedPrefill) -> list[torch.Tensor]:
    out = [t.clone() for layer in shared.cache.layers for t in (layer.keys, layer.values)]
    for layer in shared.stats.layers:
        for rec in layer:
            out += [t.clone() for t in (rec.column_sums, rec.window_scores) if t is not None]
    return out


def check_shared_equals_alone(eng: Engine, prep: PreparedRequest, batched: bool = False,
                              configs=CONFIGS) -> list[list[int]]:
    alone = [eng.generate([prep], compression=c)[0] for c in configs]
    shared = sp.prefill(eng, prep, configs)
    before = snapshot(shared)
    outs = []
    answers = sp.answer_many(eng, shared, configs, max_rows=5) if batched else None
    for i, (cfg, ref) in enumerate(zip(configs, alone)):
        got = answers[i] if batched else sp.answer(eng, shared, cfg)
        where = f"{cfg.method} budget={cfg.budget} merge={cfg.merge_mode} entropy={cfg.entropy}"
        assert got.token_ids == ref.token_ids, where
        assert got.text == ref.text and got.finish == ref.finish_reason, where
        assert got.layer_budgets == ref.telemetry.layer_budgets, where
        assert got.kv_keep_ratio == pytest.approx(ref.telemetry.kv_keep_ratio, abs=1e-12), where
        assert got.layer_entropies == ref.telemetry.layer_entropies, where
        outs.append(got.token_ids)
    after = snapshot(shared)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)), \
        "answering changed the shared prefill"
    return outs


@pytest.mark.parametrize(("family", "protocol", "batched"),
                         [("llama", "inside", False), ("llama", "answer_from", False), ("llama", "query_after", False),
                          ("qwen2_vl", "answer_from", False), ("llama", "answer_from", True),
                          ("llama", "query_after", True), ("qwen2_vl", "query_after", True)])
def test_shared_prefill_answers_equal_answers_alone(engines, family, protocol, batched):
    """``batched``: the configs' decodes run together, 5 rows at a time (`answer_many`)."""
    outs = check_shared_equals_alone(engines[family], prepared(engines[family], family, protocol), batched)
    # not vacuous: the configs decode differently, so a config seeing another's state would show
    assert len({tuple(o) for o in outs}) >= 3


@pytest.mark.parametrize("bug", ["cache", "stats", "rows"])
def test_sharing_without_copies_is_caught(engines, monkeypatch, bug):
    eng = engines["llama"]
    prep = prepared(eng, "llama", "answer_from")
    if bug == "cache":
        monkeypatch.setattr(sp, "copy_cache", lambda cache, reserve: cache)
    elif bug == "stats":
        monkeypatch.setattr(sp, "copy_stats", lambda stats: stats)
    else:  # batched decode feeding every row the first row's last token
        original = eng.decode_rows
        monkeypatch.setattr(eng, "decode_rows", lambda caches, toks, pos: original(caches, [toks[0]] * len(toks), pos))
    with pytest.raises(AssertionError):
        check_shared_equals_alone(eng, prep, batched=bug == "rows")


def test_union_plan_refuses_configs_recorded_differently(engines):
    eng = engines["llama"]
    prep = prepared(eng, "llama", "answer_from")
    with pytest.raises(ValueError, match="observation windows"):
        sp.prefill(eng, prep, [CompressionConfig("snapkv", budget=0.3, window=4),
                               CompressionConfig("snapkv", budget=0.3, window=8)])
    with pytest.raises(ValueError, match="score_queries"):
        sp.prefill(eng, prep, [CompressionConfig("h2o", budget=0.3, score_queries=16),
                               CompressionConfig("meda", budget=0.3, score_queries=32)])
    # a config that records nothing, or the full cache, shares with anything
    plan = sp.union_plan([CompressionConfig("full"), CompressionConfig("streamingllm", budget=0.3),
                          CompressionConfig("snapkv", budget=0.3, window=4)], prep.prompt.modality, 40)
    assert plan.window == 4 and not plan.column_sums and not plan.row_entropy


@pytest.mark.parametrize(("protocol", "batched"), [("answer_from", False), ("query_after", True)])
def test_shared_prefill_with_kvzip_in_the_union(engines, protocol, batched):
    """A text prompt: kvzip's reconstruction runs in the shared forward, and every other config still
    answers exactly as alone (its statistics and K/V see the context only)."""
    eng = engines["llama"]
    configs = [CompressionConfig("kvzip", budget=0.3, **KNOBS), *CONFIGS[1:7],
               CompressionConfig("kvzip", budget=0.15, **KNOBS)]
    check_shared_equals_alone(eng, prepared(eng, "llama", protocol), batched, configs)
