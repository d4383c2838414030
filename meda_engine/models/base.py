"""What every model-family adapter provides, and the prepared form of one prompt.

An adapter turns a `Request` into token ids, a per-token modality (text / image / video), pixel
tensors and explicit positions. It knows which prompt positions are visual; MEDA needs that. It
holds no per-request state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..config import ConfigError
from ..request import Image, Request, Video

TEXT, IMAGE, VIDEO = 0, 1, 2


class UnsupportedModelError(ValueError):
    """The checkpoint's model family has no adapter."""


class ContextLengthError(ValueError):
    """The prompt (with its frames) plus the tokens to generate do not fit the model's context."""


@dataclass
class PreparedPrompt:
    """One request, tokenised and preprocessed, on the CPU and unpadded.

    Shapes: ``input_ids`` (L,) int64; ``modality`` (L,) int8 with 0 text, 1 image, 2 video;
    ``vision`` holds this prompt's pixel rows and grids (keys as the model's forward names them).
    ``n_context`` tokens are prefilled (and compressed); the rest, if any, are fed on top of the
    compressed cache (query-agnostic protocol).
    """

    input_ids: torch.Tensor
    modality: torch.Tensor
    vision: dict[str, torch.Tensor] = field(default_factory=dict)
    n_context: int = 0
    n_frames: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific facts, e.g. second_per_grid_ts

    def __post_init__(self) -> None:
        if self.n_context <= 0:
            self.n_context = int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_visual(self) -> int:
        return int((self.modality != TEXT).sum())

    @property
    def n_text(self) -> int:
        return self.length - self.n_visual


class ModelAdapter:
    """Base class; subclasses set `family` and implement the hooks below."""

    family: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    multimodal: ClassVar[bool] = False
    position_axes: ClassVar[int] = 1  # 3 for M-RoPE

    def __init__(self, config: Any, tokenizer: Any, preprocessor_config: dict | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.preprocessor_config = preprocessor_config or {}
        text_cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.text_config = text_cfg
        self.max_context = int(getattr(text_cfg, "max_position_embeddings", 0) or 0) or None

    # ---- prompt -----------------------------------------------------------------------------
    def default_chat_template(self) -> str | None:
        return None

    def render(self, request: Request) -> str:
        """Chat-template text with one placeholder per image / video part."""
        msgs = []
        for m in request.messages:
            parts = []
            for p in m.content:
                if isinstance(p, str):
                    parts.append({"type": "text", "text": p})
                elif isinstance(p, Image):
                    parts.append({"type": "image"})
                elif isinstance(p, Video):
                    parts.append({"type": "video"})
            msgs.append({"role": m.role, "content": parts})
        template = None if getattr(self.tokenizer, "chat_template", None) else self.default_chat_template()
        kwargs = {"chat_template": template} if template else {}
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **kwargs)

    def prepare(self, request: Request, *, max_new_tokens: int | None = None) -> PreparedPrompt:
        raise NotImplementedError

    def _tokenize(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def _check_context(self, n_tokens: int, n_frames: int, max_new_tokens: int | None) -> None:
        if self.max_context is None:
            return
        need = n_tokens + (max_new_tokens or 0)
        if need > self.max_context:
            frames = f" ({n_frames} video frames)" if n_frames else ""
            raise ContextLengthError(
                f"prompt of {n_tokens} tokens{frames} plus {max_new_tokens or 0} new tokens exceeds the model's "
                f"context of {self.max_context} tokens; use fewer frames or a smaller pixel budget"
            )

    # KVzip's reconstruction prompt (`compression.ReconstructionScorer`)
    RECONSTRUCT_INSTRUCTION: ClassVar[str] = "\n\nRepeat the previous context exactly."

    def reconstruction_ids(self, prompt: PreparedPrompt) -> torch.Tensor:
        """The tokens that follow the context in a KVzip prefill: the instruction, the chat template's
        turn change to the assistant, then the context again without the template's opening (as
        kvpress's `KVzipPress.prepare`). Prompts holding images or video raise `ConfigError`."""
        n = prompt.n_context
        if bool((prompt.modality[:n] != TEXT).any()):
            raise ConfigError("kvzip scores the context by having the model repeat it as text; prompts with "
                              "images or video are not supported (use another method)")
        prefix_len, suffix = self._template_frame()
        instruction = self._tokenize(self.RECONSTRUCT_INSTRUCTION)
        return torch.cat([instruction, suffix, prompt.input_ids[min(prefix_len, n - 1) : n]])

    def _template_frame(self) -> tuple[int, torch.Tensor]:
        """Tokens of the chat template before a user message, and the template's text after one (the
        assistant's turn), found by rendering a dummy message (idempotent, computed once)."""
        frame = getattr(self, "_frame", None)
        if frame is None:
            dummy, sep = "dummy context", "\n" + "#" * 13
            template = None if getattr(self.tokenizer, "chat_template", None) else self.default_chat_template()
            kwargs = {"chat_template": template} if template else {}
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": dummy + sep}],
                                                      add_generation_prompt=True, tokenize=False, **kwargs)
            head, suffix = text.split(sep, 1)
            frame = (int(self._tokenize(head.split(dummy)[0]).numel()), self._tokenize(suffix))
            self._frame = frame
        return frame

    @staticmethod
    def _context_split(modality: torch.Tensor, request: Request) -> int:
        """How many prompt tokens are prefilled (and compressed) before the rest is fed (see `Request`)."""
        if request.query_after_compression:
            visual = torch.nonzero(modality != TEXT).flatten()
            if visual.numel() == 0:
                raise ConfigError("query_after_compression needs an image or video in the prompt")
            return int(visual[-1]) + 1
        if request.answer_from_compressed_cache and modality.shape[0] > 1:
            return int(modality.shape[0]) - 1
        return int(modality.shape[0])

    # ---- positions and batching -------------------------------------------------------------
    def positions(self, model: Any, prompt: PreparedPrompt) -> tuple[torch.Tensor, int]:
        """Positions ``(position_axes, L)`` of the prompt and the position of the first new token."""
        pos = torch.arange(prompt.length, dtype=torch.long)[None]
        return pos, prompt.length

    def model_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """``(axes, B, q)`` -> the layout the model's forward takes."""
        return positions[0] if self.position_axes == 1 else positions

    def collate_vision(self, prompts: list[PreparedPrompt], device: torch.device) -> dict[str, torch.Tensor]:
        return {}

    @property
    def eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            ids.add(int(tok_eos))
        cfg_eos = getattr(self.text_config, "eos_token_id", None)
        if isinstance(cfg_eos, int):
            ids.add(cfg_eos)
        elif isinstance(cfg_eos, (list, tuple)):
            ids.update(int(i) for i in cfg_eos)
        return sorted(ids)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.text_config, "pad_token_id", None)
        if pad is None:
            pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        return int(pad)


def expand_placeholders(text: str, replacements: list[str], pattern: str) -> str:
    """Replace the i-th match of ``pattern`` in ``text`` with ``replacements[i]``."""
    matches = list(re.finditer(pattern, text))
    if len(matches) != len(replacements):
        raise ConfigError(
            f"the chat template produced {len(matches)} media placeholders for {len(replacements)} images/videos"
        )
    out, last = [], 0
    for m, rep in zip(matches, replacements):
        out.append(text[last : m.start()])
        out.append(rep)
        last = m.end()
    out.append(text[last:])
    return "".join(out)
