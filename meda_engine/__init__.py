"""meda_engine: MEDA compressed-KV inference for multimodal LLMs on torch + transformers.

    from meda_engine import Engine, CompressionConfig, Request
    engine = Engine.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", device="cuda", dtype="bfloat16")
    outs = engine.generate([Request(prompt="Describe the video.", video=frames)],
                           compression=CompressionConfig(method="meda", budget=0.2), max_new_tokens=64)
    outs[0].text, outs[0].telemetry

Names are imported on first use, so that light modules (``meda_engine.media``, ``meda_engine.config``)
can be used, e.g. in decode tasks, without loading torch and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "METHODS": "config",
    "CompressionConfig": "config",
    "ConfigError": "config",
    "GenerationConfig": "config",
    "parse_budget": "config",
    "Engine": "engine",
    "PreparedRequest": "engine",
    "StreamEvent": "engine",
    "ContextLengthError": "models.base",
    "UnsupportedModelError": "models.base",
    "CheckpointNotFoundError": "models.loading",
    "MediaError": "models.vision",
    "Image": "request",
    "Message": "request",
    "Request": "request",
    "Result": "request",
    "Telemetry": "request",
    "Video": "request",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'meda_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
