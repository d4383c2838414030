"""The engine against independent references (tiny random Qwen2-VL with video / M-RoPE, and Llama).

1. A compressed decode (evict, no merge) equals a full-cache decode of the plain transformers model
   in which, per layer and KV head, the evicted prompt positions are masked out (`reference_impl`:
   its own attention function, its own DynamicCache, the model's own positions), for the protocols
   "question inside the compressed prompt", ``answer_from_compressed_cache`` and
   ``query_after_compression``: logits within 1e-4 at every step.
2. The kept set per (layer, KV head) of H2O, SnapKV and StreamingLLM equals one re-derived from
   eager attention maps, with prompts longer than ``score_queries``.
3. The bytes a row holds, measured from the storages its cache references, equal what the engine
   reports, and the prefill K/V storages are unreachable once the row is compressed.

Each check is a plain function; the ``*_bug_is_caught`` tests inject a bug into the engine
(positions continuing from the compressed length, a selection keeping the lowest scores, prefill
buffers kept alive) and require the check to fail.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import reference_impl as ref
from meda_engine import CompressionConfig, Engine, GenerationConfig, Request
from meda_engine import engine as engine_mod
from meda_engine.cache import RaggedLayer
from meda_engine.compression import compressor as compressor_mod
from tiny_models import MULTIMODAL, PREPROCESSOR, build_model

torch.set_num_threads(1)
VIDEO = np.random.default_rng(3).integers(0, 255, (8, 112, 112, 3), dtype=np.uint8)  # 64 visual tokens
QUESTION = "what colour is the circle in the first frame of the video and how many squares are there ?"
ATOL = 1e-4
KEY_TOL = 1e-3  # a kept key vs the reference prompt key it is (SDPA vs eager prefill: ~1e-6)


@pytest.fixture(scope="module")
def models():
    """Per family: the engine, a reference model with the masked attention, an eager reference.
    All three are built from the same seed, so they hold the same weights."""
    out = {}
    for fam in ("qwen2_vl", "llama"):
        model, tok = build_model(fam, seed=1)
        eng = Engine.from_model(model, tok, PREPROCESSOR.get(fam))
        masked, _ = build_model(fam, seed=1)
        ref.use_reference_attention(masked)
        eager, _ = build_model(fam, seed=1, attn_implementation="eager")
        for other in (masked, eager):
            for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
                assert torch.equal(a, b), name
        out[fam] = (eng, masked, eager)
    return out


def make_request(family: str, protocol: str = "inside", max_new_tokens: int = 5, repeat: int = 1) -> Request:
    mm = family in MULTIMODAL
    return Request(prompt=" ".join([QUESTION] * repeat), video=VIDEO if mm else None, video_fps=2.0,
                   generation=GenerationConfig(max_new_tokens=max_new_tokens),
                   query_after_compression=protocol == "query_after",
                   answer_from_compressed_cache=protocol == "answer_from")


def _capture_rows(mp: pytest.MonkeyPatch, eng: Engine) -> list[dict]:
    """Spy on `Engine.prefill_rows` (whatever implementation the class has now): record, right after
    each row is compressed (and extended), its prompt, first logits and each layer's kept prompt keys."""
    rows: list[dict] = []
    original = eng.prefill_rows

    def spy(batch, default=None):
        out = original(batch, default)
        for prepared, row in zip(batch, out):
            kept = row.outcome.layer_tokens
            rows.append({
                "prompt": prepared.prompt,
                "logits": row.logits.clone(),
                "layer_tokens": list(kept),
                "kept_keys": [layer.keys[0, :, :n].clone() for layer, n in zip(row.cache.layers, kept)],
            })
        return out

    mp.setattr(eng, "prefill_rows", spy)
    return rows


# ---------------------------------------------------------------------------------------------------
# 1. compressed decode == masked full-cache decode
# ---------------------------------------------------------------------------------------------------
def check_compressed_decode(eng: Engine, reference, request: Request, comp: CompressionConfig,
                            min_steps: int = 3, path: str = "scheduler") -> dict:
    """Run ``request`` through the engine and through the masked reference with the same fed tokens;
    every step's logits must agree within `ATOL`. ``path``: ``scheduler`` (`Engine.generate`:
    `prefill_rows` + `decode_rows`) or ``static`` (`Engine.generate_static`: `decode_step` on the
    batch cache; its first logits are not exposed, so the comparison starts at the first decode
    step). Returns facts for extra checks."""
    multimodal = eng.adapter.multimodal
    steps: list[tuple[int, torch.Tensor]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eng, "_eos", set())  # never stop early: every step is compared
        if path == "scheduler":
            rows = _capture_rows(mp, eng)
            decode = eng.decode_rows

            def spy_decode(caches, token_ids, positions):
                out = decode(caches, token_ids, positions)
                steps.append((int(token_ids[0]), out[0].clone()))
                return out

            mp.setattr(eng, "decode_rows", spy_decode)
            eng.generate([request], compression=comp)
        else:
            rows = []
            compress = engine_mod.compress_cache

            def spy_compress(cache, *args, **kwargs):
                outcomes = compress(cache, *args, **kwargs)
                kept = outcomes[0].layer_tokens
                rows.append({"logits": None, "layer_tokens": list(kept),
                             "kept_keys": [layer.keys[0, :, :n].clone() for layer, n in zip(cache.layers, kept)]})
                return outcomes

            mp.setattr(engine_mod, "compress_cache", spy_compress)
            step = eng.decode_step

            def spy_step(cache, token_ids, positions):
                out = step(cache, token_ids, positions)
                steps.append((int(token_ids[0]), out[0].clone()))
                return out

            mp.setattr(eng, "decode_step", spy_step)
            eng.generate_static([request], compression=comp)
            rows[0]["prompt"] = eng.prepare(request).prompt
    assert len(rows) == 1 and len(steps) >= min_steps
    cap = rows[0]
    prompt, n_ctx = cap["prompt"], cap["prompt"].n_context
    assert all(n < n_ctx for n in cap["layer_tokens"]), "a layer evicted nothing: the check would be vacuous"

    keep: list[torch.Tensor] = []

    def keep_from_keys(ctx_keys):
        for kept, full in zip(cap["kept_keys"], ctx_keys):
            keep.append(ref.match_rows(kept, full, KEY_TOL))
        return keep

    fed = [t for t, _ in steps]
    expected = ref.reference_decode(reference, prompt, n_ctx, keep_from_keys, fed, multimodal)
    got = [cap["logits"]] + [lg for _, lg in steps]
    for i, (g, e) in enumerate(zip(got, expected)):
        if g is not None:
            torch.testing.assert_close(g, e, rtol=0, atol=ATOL, msg=lambda m, i=i: f"step {i}: {m}")
    return {"keep": keep, "fed": fed, "got": got, "prompt": prompt, "n_ctx": n_ctx}


CASES = [
    ("qwen2_vl", "inside", CompressionConfig("meda", budget=0.3, merge="none", window=4)),
    ("qwen2_vl", "query_after", CompressionConfig("snapkv", budget=0.3, window=4)),
    ("qwen2_vl", "answer_from", CompressionConfig("h2o", budget=0.25, window=4, score_queries=16)),
    ("llama", "inside", CompressionConfig("h2o", budget=0.3, window=4)),
    ("llama", "answer_from", CompressionConfig("meda", budget=0.3, merge="none", window=4)),
]


@pytest.mark.parametrize(("family", "protocol", "comp"), CASES, ids=[f"{c[0]}-{c[1]}-{c[2].method}" for c in CASES])
def test_compressed_decode_equals_masked_full_cache_decode(models, family, protocol, comp):
    eng, masked, _ = models[family]
    req = make_request(family, protocol, repeat=1 if family in MULTIMODAL else 3)
    facts = check_compressed_decode(eng, masked, req, comp)
    prompt, n_ctx = facts["prompt"], facts["n_ctx"]
    assert (n_ctx < prompt.length) == (protocol != "inside")
    # Per-head masks matter: some layer keeps different positions in different KV heads.
    assert any(not torch.equal(k[0], k[h]) for k in facts["keep"] for h in range(1, k.shape[0]))
    # Not vacuous: without the eviction mask the reference decodes differently.
    unmasked = ref.reference_decode(masked, prompt, n_ctx, None, facts["fed"], eng.adapter.multimodal)
    assert max(float((g - u).abs().max()) for g, u in zip(facts["got"][1:], unmasked[1:])) > 100 * ATOL


@pytest.mark.parametrize(("family", "protocol"), [("qwen2_vl", "query_after"), ("llama", "inside")])
def test_static_path_decode_equals_masked_full_cache_decode(models, family, protocol):
    eng, masked, _ = models[family]
    req = make_request(family, protocol, repeat=1 if family in MULTIMODAL else 3)
    check_compressed_decode(eng, masked, req, CompressionConfig("meda", budget=0.3, merge="none", window=4),
                            path="static")


@pytest.mark.parametrize("family", ["qwen2_vl", "llama"])
def test_positions_from_compressed_length_bug_is_caught(models, family, monkeypatch):
    """Bug (a): decode positions continue from the compressed cache length, not the prompt's."""
    eng, masked, _ = models[family]
    req = make_request(family, "inside", repeat=1 if family in MULTIMODAL else 3)
    comp = CompressionConfig("h2o", budget=0.3, window=4)
    check_compressed_decode(eng, masked, req, comp)  # passes without the bug
    original = Engine.prefill_rows

    def buggy(self, batch, default=None):
        rows = original(self, batch, default)
        for row in rows:
            row.next_position = row.cache.layer_lengths(0)[0]
        return rows

    monkeypatch.setattr(Engine, "prefill_rows", buggy)
    with pytest.raises(AssertionError, match="step 1"):
        check_compressed_decode(eng, masked, req, comp)


@pytest.mark.parametrize("family", ["qwen2_vl", "llama"])
def test_static_positions_from_compressed_length_bug_is_caught(models, family, monkeypatch):
    """Bug (a) on the static path: `decode_step` fed the compressed cache length as the position."""
    eng, masked, _ = models[family]
    req = make_request(family, "inside", repeat=1 if family in MULTIMODAL else 3)
    comp = CompressionConfig("h2o", budget=0.3, window=4)
    check_compressed_decode(eng, masked, req, comp, path="static")  # passes without the bug
    original = Engine.decode_step

    def buggy(self, cache, token_ids, positions):
        return original(self, cache, token_ids, torch.tensor(cache.layers[0].lengths_host))

    monkeypatch.setattr(Engine, "decode_step", buggy)
    with pytest.raises(AssertionError, match="step 1"):
        check_compressed_decode(eng, masked, req, comp, path="static")


# ---------------------------------------------------------------------------------------------------
# 2. kept sets == reference from eager attention maps
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def eager_maps(eager, prompt, n_ctx: int, multimodal: bool):
    """Attention maps ``(H_q, L, L)`` and prompt keys ``(H_kv, L, D)`` per layer, eager attention."""
    if hasattr(eager.model, "rope_deltas"):
        eager.model.rope_deltas = None
    cache = DynamicCache(config=eager.config)
    out = eager(**ref.hf_inputs(prompt, 0, n_ctx, multimodal), past_key_values=cache, use_cache=True,
                output_attentions=True)
    return [a[0] for a in out.attentions], [layer.keys[0, :, :n_ctx] for layer in cache.layers]


def reference_kept(method: str, comp: CompressionConfig, attn: torch.Tensor, n_kv: int, n_keep: int):
    """The reference kept mask ``(H_kv, L)`` and the scores it ranks by (None: position only)."""
    length = attn.shape[-1]
    if method == "streamingllm":
        return ref.streaming_keep(length, n_keep, comp.sink, comp.window, n_kv), None
    if method == "h2o":
        scores = ref.h2o_scores(attn, n_kv, comp.score_queries)
    elif method == "snapkv":
        scores = ref.window_scores(attn, n_kv, comp.window, comp.pool_kernel)
    else:
        raise AssertionError(method)
    return ref.select_reference(scores, n_keep, comp.window), scores


def assert_same_kept(got: torch.Tensor, want: torch.Tensor, scores: torch.Tensor | None, where: str) -> None:
    """Equal masks, except swaps between positions whose reference scores tie (within float noise)."""
    assert torch.equal(got.sum(dim=1), want.sum(dim=1)), f"{where}: kept counts differ"
    diff = got ^ want
    if not diff.any():
        return
    assert scores is not None, f"{where}: kept positions differ: {torch.nonzero(diff).tolist()}"
    tol = 1e-5 * float(scores.abs().max())
    for h in range(got.shape[0]):
        if not diff[h].any():
            continue
        boundary = float(scores[h][want[h]].min())  # the weakest reference pick (forced ones score high)
        gap = float((scores[h][diff[h]] - boundary).abs().max())
        assert gap <= tol, f"{where}, head {h}: positions {torch.nonzero(diff[h]).flatten().tolist()} differ (gap {gap:.2e})"


def check_kept_sets(eng: Engine, eager, request: Request, comp: CompressionConfig) -> list[torch.Tensor]:
    """The engine's kept prompt positions per (layer, KV head), read from its cache, equal the
    reference's. Returns the eager maps (for the caller's own checks)."""
    with pytest.MonkeyPatch.context() as mp:
        rows = _capture_rows(mp, eng)
        eng.generate([request], compression=comp, max_new_tokens=1)
    cap = rows[0]
    prompt, n_ctx = cap["prompt"], cap["prompt"].n_context
    attn, keys = eager_maps(eager, prompt, n_ctx, eng.adapter.multimodal)
    n_kv = keys[0].shape[0]
    for l, (kept, full) in enumerate(zip(cap["kept_keys"], keys)):
        n_keep = cap["layer_tokens"][l]
        assert n_keep < n_ctx
        got = ref.match_rows(kept, full, KEY_TOL)
        want, scores = reference_kept(comp.method, comp, attn[l], n_kv, n_keep)
        assert_same_kept(got, want, scores, f"{comp.method} layer {l}")
    return attn


SELECTION = [
    ("qwen2_vl", CompressionConfig("h2o", budget=0.3, window=4, score_queries=16)),
    ("qwen2_vl", CompressionConfig("snapkv", budget=0.3, window=6, pool_kernel=5, score_queries=16)),
    ("qwen2_vl", CompressionConfig("streamingllm", budget=0.3, window=4, sink=4, score_queries=16)),
    ("llama", CompressionConfig("h2o", budget=0.25, window=4, score_queries=20)),
    ("llama", CompressionConfig("snapkv", budget=0.25, window=8, pool_kernel=3, score_queries=20)),
]


@pytest.mark.parametrize(("family", "comp"), SELECTION, ids=[f"{f}-{c.method}" for f, c in SELECTION])
def test_kept_sets_equal_eager_attention_reference(models, family, comp):
    eng, _, eager = models[family]
    req = make_request(family, repeat=1 if family in MULTIMODAL else 3)
    attn = check_kept_sets(eng, eager, req, comp)
    length = attn[0].shape[-1]
    assert length > 2 * comp.score_queries  # the scored rows are a strict subsample
    if comp.method == "h2o":
        # The subsample matters: scoring every row would keep a different set somewhere.
        n_keep = round(comp.budget * length)
        n_kv = eng.dims.n_kv_heads
        assert any(
            not torch.equal(ref.select_reference(ref.h2o_scores(a, n_kv, comp.score_queries), n_keep, comp.window),
                            ref.select_reference(ref.h2o_scores(a, n_kv, 0), n_keep, comp.window))
            for a in attn
        )


@pytest.mark.parametrize("method", ["h2o", "snapkv", "streamingllm"])
def test_lowest_scores_selection_bug_is_caught(models, method, monkeypatch):
    """Bug (b): the selection keeps the lowest-scored tokens (the forced recent window stays)."""
    eng, _, eager = models["qwen2_vl"]
    comp = CompressionConfig(method, budget=0.3, window=4, score_queries=16)
    check_kept_sets(eng, eager, make_request("qwen2_vl"), comp)  # passes without the bug
    original = compressor_mod.select_tokens
    monkeypatch.setattr(compressor_mod, "select_tokens", lambda scores, n_keep, **kw: original(-scores, n_keep, **kw))
    with pytest.raises(AssertionError, match="differ"):
        check_kept_sets(eng, eager, make_request("qwen2_vl"), comp)


# ---------------------------------------------------------------------------------------------------
# 3. bytes held, measured from storage; prefill buffers freed
# ---------------------------------------------------------------------------------------------------
def storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def check_storage(eng: Engine, request: Request, comp: CompressionConfig) -> dict:
    """After a row is prefilled and compressed: no prefill K/V storage is reachable, each layer's
    storage holds only its kept tokens plus the decode room, and the measured bytes equal the
    engine's ``kv_bytes_held`` / ``kv_bytes_allocated``."""
    facts: dict = {}
    prefill_refs: list[weakref.ref] = []
    with pytest.MonkeyPatch.context() as mp:
        compress = engine_mod.compress_cache

        def spy_compress(cache, *args, **kwargs):
            tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            prefill_refs.extend(weakref.ref(t.untyped_storage()) for t in tensors)
            facts["prefill_bytes"] = storage_bytes(tensors)
            del tensors
            return compress(cache, *args, **kwargs)

        mp.setattr(engine_mod, "compress_cache", spy_compress)
        original = eng.prefill_rows

        def spy_prefill(batch, default=None):
            (row,) = original(batch, default)
            (prepared,) = batch
            gc.collect()
            facts["alive"] = sum(r() is not None for r in prefill_refs)
            layers = row.cache.layers
            facts["held"] = storage_bytes(t for layer in layers for t in (layer.keys, layer.values))
            facts["layer_storage"] = [layer.keys.untyped_storage().nbytes() for layer in layers]
            facts["layer_tokens"] = list(row.outcome.layer_tokens)
            facts["room"] = prepared.generation.max_new_tokens + prepared.prompt.length - prepared.prompt.n_context
            facts["slot_bytes"] = layers[0].keys[0, :, 0].numel() * layers[0].keys.element_size()
            return [row]

        mp.setattr(eng, "prefill_rows", spy_prefill)
        tele = eng.generate([request], compression=comp)[0].telemetry
    assert len(prefill_refs) == 2 * eng.dims.n_layers
    assert facts["alive"] == 0, f"{facts['alive']} prefill K/V storages still reachable after compression"
    assert facts["held"] == tele.kv_bytes_held == tele.kv_bytes_allocated
    for n, nbytes in zip(facts["layer_tokens"], facts["layer_storage"]):
        assert nbytes <= (n + facts["room"]) * facts["slot_bytes"], "a layer holds more than its kept tokens + room"
    assert 0 < tele.kv_bytes_kept <= facts["held"] < facts["prefill_bytes"]
    return facts


@pytest.mark.parametrize(("family", "protocol", "method"),
                         [("qwen2_vl", "inside", "meda"), ("qwen2_vl", "query_after", "snapkv"), ("llama", "inside", "h2o")])
def test_storage_measured_and_prefill_buffers_freed(models, family, protocol, method):
    eng, _, _ = models[family]
    facts = check_storage(eng, make_request(family, protocol, repeat=1 if family in MULTIMODAL else 3),
                          CompressionConfig(method, budget=0.25))
    assert facts["held"] < 0.6 * facts["prefill_bytes"]  # a 0.25 budget really freed memory


LEAK: list[torch.Tensor] = []


def test_prefill_buffers_kept_alive_bug_is_caught(models, monkeypatch):
    """Bug (c): compression keeps a reference (here a one-slot view) to each prefill buffer."""
    eng, _, _ = models["qwen2_vl"]
    check_storage(eng, make_request("qwen2_vl"), CompressionConfig("h2o", budget=0.25))  # passes without the bug
    original = RaggedLayer.replace

    def leaky(self, keys, values, lengths):
        LEAK.extend([self.keys[:, :, :1], self.values[:, :, :1]])
        original(self, keys, values, lengths)

    monkeypatch.setattr(RaggedLayer, "replace", leaky)
    try:
        with pytest.raises(AssertionError, match="still reachable"):
            check_storage(eng, make_request("qwen2_vl"), CompressionConfig("h2o", budget=0.25))
    finally:
        LEAK.clear()


def test_uncompacted_layer_bug_is_caught(models, monkeypatch):
    """Bug (c'): compression frees the prefill buffers but packs the kept tokens into new buffers of
    the prefill's size (nothing saved)."""
    eng, _, _ = models["llama"]
    check_storage(eng, make_request("llama", repeat=3), CompressionConfig("h2o", budget=0.25))  # passes without the bug
    original = RaggedLayer.replace

    def no_shrink(self, keys, values, lengths):
        big_k = torch.zeros_like(self.keys)
        big_v = torch.zeros_like(self.values)
        big_k[:, :, : keys.shape[2]] = keys
        big_v[:, :, : values.shape[2]] = values
        original(self, big_k, big_v, lengths)

    monkeypatch.setattr(RaggedLayer, "replace", no_shrink)
    with pytest.raises(AssertionError, match="more than its kept tokens"):
        check_storage(eng, make_request("llama", repeat=3), CompressionConfig("h2o", budget=0.25))
