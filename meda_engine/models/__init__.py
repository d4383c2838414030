"""Model-family adapters and checkpoint loading."""

from __future__ import annotations

from typing import Any

from .base import TEXT, IMAGE, VIDEO, ContextLengthError, ModelAdapter, PreparedPrompt, UnsupportedModelError
from .causal_lm import CausalLMAdapter
from .qwen_vl import Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter

ADAPTER_CLASSES: tuple[type[ModelAdapter], ...] = (Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter, CausalLMAdapter)


def adapter_class_for(model_type: str) -> type[ModelAdapter]:
    for cls in ADAPTER_CLASSES:
        if model_type in cls.model_types:
            return cls
    supported = sorted(t for cls in ADAPTER_CLASSES for t in cls.model_types)
    raise UnsupportedModelError(f"no adapter for model_type {model_type!r}; supported: {', '.join(supported)}")


def build_adapter(config: Any, tokenizer: Any, preprocessor_config: dict | None = None, **kwargs) -> ModelAdapter:
    cls = adapter_class_for(config.model_type)
    if cls.multimodal:
        return cls(config, tokenizer, preprocessor_config, **kwargs)
    return cls(config, tokenizer, preprocessor_config)


__all__ = [
    "ADAPTER_CLASSES",
    "IMAGE",
    "TEXT",
    "VIDEO",
    "CausalLMAdapter",
    "ContextLengthError",
    "ModelAdapter",
    "PreparedPrompt",
    "Qwen25VLAdapter",
    "Qwen2VLAdapter",
    "Qwen3VLAdapter",
    "UnsupportedModelError",
    "adapter_class_for",
    "build_adapter",
]
