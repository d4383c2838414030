"""meda_engine: MEDA compressed-KV inference for multimodal LLMs on torch + transformers.

    from meda_engine import Engine, CompressionConfig, Request
    engine = Engine.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", device="cuda", dtype="bfloat16")
    outs = engine.generate([Request(prompt="Describe the video.", video=frames)],
                           compression=CompressionConfig(method="meda", budget=0.2), max_new_tokens=64)
    outs[0].text, outs[0].telemetry
"""

from .config import METHODS, CompressionConfig, ConfigError, GenerationConfig, parse_budget
from .engine import Engine, PreparedRequest, StreamEvent
from .models import ContextLengthError, UnsupportedModelError
from .models.loading import CheckpointNotFoundError
from .models.vision import MediaError
from .request import Image, Message, Request, Result, Telemetry, Video

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "CheckpointNotFoundError",
    "CompressionConfig",
    "ConfigError",
    "ContextLengthError",
    "Engine",
    "GenerationConfig",
    "Image",
    "MediaError",
    "Message",
    "PreparedRequest",
    "Request",
    "Result",
    "StreamEvent",
    "Telemetry",
    "UnsupportedModelError",
    "Video",
    "parse_budget",
]
