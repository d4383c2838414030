"""Tiny random models of real architectures, built from the configs in tests/fixtures (no downloads).

`build_checkpoint(family, directory)` writes a complete Hugging Face checkpoint directory (config,
safetensors, word-level tokenizer with Qwen special tokens and chat template, preprocessor config),
so tests exercise the same loading path as a real checkpoint. Weights are re-drawn with a larger
standard deviation than transformers' init, so that greedy decoding produces varied tokens (with
the default 0.02 a tiny model repeats one token, which would make equality tests vacuous).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from meda_engine.models.word_tokenizer import build_word_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
MULTIMODAL = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
WORDS = (
    "what colour shape is the a an of in on and then frame video image describe circle square triangle "
    "star red green blue yellow white black how many which after before first last one two three four ? . ,"
).split()

# Small pixel budgets keep prompts short: a 112x112 frame pair is 16 tokens, a 56x56 image 4 tokens.
PREPROCESSOR = {
    "qwen2_vl": {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136,
                 "max_pixels": 12544, "video_min_pixels": 3136, "video_max_pixels": 12544},
    "qwen3_vl": {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 4096,
                 "max_pixels": 16384, "video_min_pixels": 4096, "video_max_pixels": 16384,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}
PREPROCESSOR["qwen2_5_vl"] = PREPROCESSOR["qwen2_vl"]


def tokenizer():
    return build_word_tokenizer(WORDS)


def build_model(family: str, *, seed: int = 0, init_std: float = 0.15, attn_implementation: str = "sdpa"):
    tok = tokenizer()
    spec = json.loads((FIXTURES / f"{family}.json").read_text())
    ids = {
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.pad_token_id,
    }
    if family in MULTIMODAL:
        spec["text_config"].update(vocab_size=len(tok), **ids)
        spec.update(
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        )
        cls = AutoModelForImageTextToText
    else:
        spec.update(vocab_size=len(tok), **ids)
        cls = AutoModelForCausalLM
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = cls.from_config(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, init_std)
    return model, tok


def build_checkpoint(family: str, directory: Path, *, seed: int = 0) -> Path:
    model, tok = build_model(family, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    if family in PREPROCESSOR:
        (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR[family]))
    return directory
