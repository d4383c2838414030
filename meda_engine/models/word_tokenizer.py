"""A small word-level tokenizer with Qwen's special tokens and a Qwen-style chat template.

The project's own tiny models (the quality model, the test fixtures) use it instead of Qwen's 151k BPE
vocabulary, which would make a tiny model 97% embedding. It is a standard `tokenizers` WordLevel model
wrapped in `PreTrainedTokenizerFast`, so it saves and loads like any Hugging Face tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
UNK = "[UNK]"

# Renders text parts, and one placeholder per image/video that the model adapter expands.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)


def build_word_tokenizer(words: Iterable[str], *, chat_template: str = QWEN_CHAT_TEMPLATE):
    """Tokenizer over ``QWEN_SPECIAL_TOKENS + [UNK] + words`` (ids in that order, duplicates dropped).

    Text is split on whitespace and punctuation; ``<|im_end|>`` is the end-of-turn (EOS) token and
    ``<|endoftext|>`` the padding token, as in Qwen checkpoints.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in (*QWEN_SPECIAL_TOKENS, UNK, *words):
        vocab.setdefault(tok, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=UNK
    )
    tok.chat_template = chat_template
    return tok
