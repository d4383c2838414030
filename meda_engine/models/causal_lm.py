"""Adapter for plain causal LMs (Llama, Qwen2, Qwen3, Mistral): text-only prompts, 1-D positions."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..config import ConfigError
from ..request import Request
from .base import ModelAdapter, PreparedPrompt

# Used only when a checkpoint ships no chat template (base models).
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}\n"
    "{% endfor -%}"
    "{%- if add_generation_prompt %}assistant: {% endif -%}"
)


class CausalLMAdapter(ModelAdapter):
    family: ClassVar[str] = "causal_lm"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "qwen2", "qwen3", "mistral")
    multimodal: ClassVar[bool] = False
    position_axes: ClassVar[int] = 1

    def default_chat_template(self) -> str | None:
        return PLAIN_CHAT_TEMPLATE

    def render(self, request: Request) -> str:
        """Chat-template text with each message's content as one string: text-only templates (e.g.
        SmolLM2's, shipped in its GGUF) concatenate ``message['content']`` and fail on a parts list."""
        msgs = [{"role": m.role, "content": "".join(p for p in m.content if isinstance(p, str))}
                for m in request.messages]
        template = None if getattr(self.tokenizer, "chat_template", None) else self.default_chat_template()
        kwargs = {"chat_template": template} if template else {}
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **kwargs)

    def prepare(self, request: Request, *, max_new_tokens: int | None = None) -> PreparedPrompt:
        if request.media:
            raise ConfigError(f"{self.config.model_type} is a text-only model; the request has images or video")
        input_ids = self._tokenize(self.render(request))
        if input_ids.numel() == 0:
            raise ConfigError("empty prompt: it tokenises to no tokens")
        self._check_context(int(input_ids.shape[0]), 0, max_new_tokens)
        modality = torch.zeros(input_ids.shape, dtype=torch.int8)
        return PreparedPrompt(input_ids=input_ids, modality=modality, n_context=self._context_split(modality, request))
