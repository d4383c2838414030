"""Everything that depends on transformers' internals, in one place (tested with transformers 5.23).

* the engine's attention function is registered with ``AttentionInterface`` under ``ATTENTION_NAME``;
  no mask function is registered for that name, so transformers passes ``attention_mask=None`` and
  the function builds each layer's mask from that layer's own cache lengths;
* the text decoder loads with that attention, the vision tower with SDPA;
* the engine calls the base model (``model.model``) with explicit ``position_ids`` and its own cache
  object, and applies the LM head to the positions it needs only;
* M-RoPE positions come from the model's own ``get_rope_index``, checked against the convention the
  engine is pinned to (`check_mrope_convention`): in transformers 5.23 the text after a Qwen2-VL /
  Qwen2.5-VL image or video resumes at the block's start + ``max(h, w) / spatial_merge`` on all three
  axes, so after a video it lies *inside* the video's time span (earlier 5.x, like the original
  Qwen2-VL code, resumed after the block's largest position). pyproject pins ``transformers>=5.23,<5.24``;
  another install that positions differently fails here instead of decoding differently.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import AttentionInterface
from transformers.cache_utils import Cache

ATTENTION_NAME = "meda"
CONTEXT_KWARG = "meda_ctx"  # the keyword that carries the engine's ForwardContext to attention

__all__ = ["ATTENTION_NAME", "CONTEXT_KWARG", "Cache", "TextDims", "register_attention", "text_dims"]

_registered = False


def register_attention() -> None:
    """Register `meda_engine.attention.attention_forward` (idempotent; a registry, not request state)."""
    global _registered
    if _registered:
        return
    from .attention import attention_forward

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    _registered = True


def attn_implementation(config: Any) -> str | dict[str, str]:
    """The decoder uses the engine's attention; a vision tower keeps SDPA."""
    if "text_config" in getattr(config, "sub_configs", {}):
        impl = {"text_config": ATTENTION_NAME}
        if "vision_config" in config.sub_configs:
            impl["vision_config"] = "sdpa"
        return impl
    return ATTENTION_NAME


@dataclass(frozen=True)
class TextDims:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int


def text_dims(config: Any) -> TextDims:
    tc = config.get_text_config(decoder=True)
    n_heads = int(tc.num_attention_heads)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // n_heads
    return TextDims(
        n_layers=int(tc.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=int(getattr(tc, "num_key_value_heads", None) or n_heads),
        head_dim=int(head_dim),
        hidden_size=int(tc.hidden_size),
    )


def model_class_for(config: Any, multimodal: bool):
    return transformers.AutoModelForImageTextToText if multimodal else transformers.AutoModelForCausalLM


def load_model(path: str, config: Any, *, multimodal: bool, dtype: torch.dtype, device: torch.device,
               gguf_file: str | None = None):
    """Load the weights; with ``gguf_file`` (a name in ``path``) transformers dequantises the GGUF
    tensors (needs the ``gguf`` and ``accelerate`` packages) and they are cast to ``dtype``."""
    register_attention()
    cls = model_class_for(config, multimodal)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation(config), **extra)
    return model.to(device=device, dtype=dtype).eval() if gguf_file else model.to(device).eval()


def load_config_and_tokenizer(path: str, gguf_file: str | None = None):
    """``AutoConfig`` and ``AutoTokenizer`` of a checkpoint directory, or of the GGUF file in it (the
    GGUF header carries both: hyper-parameters, vocabulary, merges and chat template)."""
    from transformers import AutoConfig, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoConfig.from_pretrained(path, **extra), AutoTokenizer.from_pretrained(path, **extra)


def use_engine_attention(model: Any) -> None:
    """Switch an already-built model (e.g. from ``_from_config``) to the engine's attention."""
    register_attention()
    model.set_attn_implementation(attn_implementation(model.config))


def base_model(model: Any):
    """The part of a ``*ForCausalLM`` / ``*ForConditionalGeneration`` that returns hidden states."""
    return model.model


def lm_head(model: Any):
    return model.get_output_embeddings()


def base_forward(model: Any, *, input_ids, position_ids, cache, context, vision: dict[str, torch.Tensor],
                 mm_token_type_ids: torch.Tensor | None) -> torch.Tensor:
    """Run the decoder (and the vision tower, when pixels are given); return the last hidden states."""
    kwargs: dict[str, Any] = dict(vision)
    if mm_token_type_ids is not None:
        kwargs["mm_token_type_ids"] = mm_token_type_ids
    out = base_model(model)(
        input_ids=input_ids,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        **kwargs,
        **{CONTEXT_KWARG: context},
    )
    return out.last_hidden_state


def mrope_positions(model: Any, *, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                    image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None,
                    second_per_grid_ts: torch.Tensor | None = None) -> torch.Tensor:
    """3-D M-RoPE positions ``(3, L)`` of one unpadded prompt, from the model's ``get_rope_index``."""
    fn = base_model(model).get_rope_index
    kwargs: dict[str, Any] = {
        "mm_token_type_ids": mm_token_type_ids[None],
        "image_grid_thw": image_grid_thw,
        "video_grid_thw": None if video_grid_thw is None else video_grid_thw.clone(),
    }
    if second_per_grid_ts is not None and "second_per_grid_ts" in inspect.signature(fn).parameters:
        kwargs["second_per_grid_ts"] = second_per_grid_ts
    pos, _ = fn(input_ids[None], **kwargs)
    pos = pos[:, 0].to(torch.long)
    config = base_model(model).config
    if getattr(config, "model_type", None) in MROPE_CHECKED:
        check_mrope_convention(pos, mm_token_type_ids, image_grid_thw, video_grid_thw,
                               config.vision_config.spatial_merge_size)
    return pos


MROPE_CHECKED = {"qwen2_vl", "qwen2_5_vl"}  # model types whose get_rope_index follows the rule below


def check_mrope_convention(positions: torch.Tensor, mm_token_type_ids: torch.Tensor,
                           image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None,
                           spatial_merge_size: int) -> None:
    """Raise if the text after a vision block does not resume where transformers 5.23 puts it: the
    block's first temporal position + ``max(h, w) // spatial_merge_size`` (``positions (3, L)``,
    ``mm_token_type_ids (L,)``: 0 text, 1 image, 2 video; grids in prompt order per modality)."""
    types = mm_token_type_ids.tolist()
    grids = {1: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
             2: iter(video_grid_thw.tolist() if video_grid_thw is not None else [])}
    i, n = 0, len(types)
    while i < n:
        j = i
        while j < n and types[j] == types[i]:
            j += 1
        if types[i] != 0:
            grid = next(grids[types[i]], None)
            if grid is None:
                raise RuntimeError(f"M-RoPE check: more {'video' if types[i] == 2 else 'image'} blocks than grids")
            if j < n:  # text follows this block
                expected = int(positions[0, i]) + max(grid[1], grid[2]) // spatial_merge_size
                got = [int(positions[a, j]) for a in range(3)]
                if got != [expected] * 3:
                    raise RuntimeError(
                        f"M-RoPE positions differ from the convention this engine is pinned to (transformers "
                        f"5.23: text after a vision block at its start + max(h, w)/merge = {expected}); the "
                        f"installed transformers {transformers.__version__} puts it at {got}. Install "
                        "transformers>=5.23,<5.24 (see pyproject.toml)."
                    )
        i = j
