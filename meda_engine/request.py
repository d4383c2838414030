"""The contract the pipeline and the endpoint share: `Request` in, `Result` (with `Telemetry`) out.

Media arrive already decoded: an image is an ``(H, W, 3)`` uint8 array (or a PIL image), a video is
``(T, H, W, 3)`` uint8 frames that were sampled by the caller (see `meda_engine.media`).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .config import CompressionConfig, ConfigError, GenerationConfig


@dataclass
class Image:
    pixels: Any  # (H, W, 3) uint8 array or PIL.Image


@dataclass
class Video:
    frames: Any  # (T, H, W, 3) uint8, already sampled
    fps: float | None = None  # rate of the given frames (frames per second of video time)

    @property
    def n_frames(self) -> int:
        return int(np.asarray(self.frames).shape[0]) if self.frames is not None else 0


Part = str | Image | Video


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: list[Part]

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant"):
            raise ConfigError(f"message role must be system, user or assistant, got {self.role!r}")
        if isinstance(self.content, (str, Image, Video)):
            self.content = [self.content]
        for part in self.content:
            if not isinstance(part, (str, Image, Video)):
                raise ConfigError(f"message content parts must be text, Image or Video, got {type(part).__name__}")


@dataclass
class Request:
    """One prompt to answer.

    Either give ``messages`` (a chat, the last one from the user), or the shorthand ``prompt`` with
    optional ``images`` / ``video`` / ``system``, which becomes one user message (media first).

    Where the prompt is split between prefill (then compression) and the tokens fed on top of the
    compressed cache:

    * default: the whole prompt is prefilled and compressed, question included (as MEDA does); the
      first new token comes from the prefill's logits, so it still saw the full cache;
    * ``answer_from_compressed_cache``: all but the last prompt token are prefilled and compressed; the
      last one is fed on the compressed cache, so *every* generated token is decoded from it (the
      query-aware evaluation protocol);
    * ``query_after_compression``: everything up to the last visual token is prefilled and compressed,
      the rest (the question, the assistant header) comes after (the query-agnostic protocol).
    """

    prompt: str | None = None
    images: list[Any] = field(default_factory=list)
    video: Any = None  # frames (T, H, W, 3) or a Video
    video_fps: float | None = None
    system: str | None = None
    messages: list[Message] | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    compression: CompressionConfig | None = None  # None: the engine call's default
    query_after_compression: bool = False
    answer_from_compressed_cache: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    def __post_init__(self) -> None:
        if self.messages is None:
            parts: list[Part] = [Image(x) if not isinstance(x, Image) else x for x in self.images]
            if self.video is not None:
                parts.append(self.video if isinstance(self.video, Video) else Video(self.video, self.video_fps))
            if self.prompt:
                parts.append(self.prompt)
            msgs = [Message("system", [self.system])] if self.system else []
            msgs.append(Message("user", parts))
            self.messages = msgs
        elif self.prompt or self.images or self.video is not None:
            raise ConfigError("give either messages or prompt/images/video, not both")
        if not self.messages or self.messages[-1].role != "user":
            raise ConfigError("the last message must come from the user")
        if not any(
            (isinstance(p, str) and p.strip()) or isinstance(p, (Image, Video)) for m in self.messages for p in m.content
        ):
            raise ConfigError("empty prompt: the request has no text, image or video")

    @property
    def media(self) -> list[Image | Video]:
        return [p for m in self.messages for p in m.content if isinstance(p, (Image, Video))]


@dataclass
class Telemetry:
    """Measured facts about one request. Byte counts come from the cache tensors actually held."""

    method: str
    budget: float | int
    entropy_variant: str | None
    n_prompt_tokens: int
    n_text_tokens: int
    n_visual_tokens: int
    n_frames: int
    n_generated_tokens: int
    kv_bytes_full: int  # this request's prompt KV after prefill (all layers, K+V)
    kv_bytes_kept: int  # this request's prompt KV after compression
    kv_keep_ratio: float  # kv_bytes_kept / kv_bytes_full, as achieved
    kv_bytes_allocated: int  # storage bytes this request's cache held (its decode room included; no other row's)
    layer_budgets: list[int]  # prompt tokens kept per layer
    layer_entropies: list[float] | None  # per layer, for entropy-based methods
    prefill_s: float  # this request's prefill time
    compress_s: float  # this request's compression time
    decode_s: float  # summed time of the decode steps this request's row ran in
    decode_tokens_per_s: float  # 1 / time_per_output_token_s
    peak_mem_bytes: int  # device peak (CUDA) or process RSS high-water mark while the engine ran it
    peak_mem_kind: str  # "cuda_max_allocated" or "rss_hwm"
    batch_size: int  # most rows decoding together while this request ran
    device: str
    dtype: str
    queue_wait_s: float = 0.0  # submitted -> admitted (its prefill began)
    time_to_first_token_s: float = 0.0  # submitted -> first token sampled
    time_per_output_token_s: float = 0.0  # decode_s / decode steps this row ran (tokens after the first)
    e2e_s: float = 0.0  # submitted -> finished
    kv_bytes_held: int = 0  # storage bytes of this row's cache while it decoded (measured, = allocated)
    preemptions: int = 0  # times this request was preempted (the scheduler reserves decode room: 0)
    budget_floor_applied: bool = False  # the 1-token-per-layer floor kept more than the budget asks (budget x L < 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Result:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    telemetry: Telemetry

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "telemetry": self.telemetry.to_dict(),
        }
