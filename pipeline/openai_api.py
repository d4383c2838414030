"""The OpenAI chat-completions wire format: parse and bound a request, shape responses and stream chunks.

Pure functions and pydantic models, no Ray and no I/O, so the endpoint's request handling can be
unit-tested directly. The flow is::

    body bytes --parse_chat_request--> ChatCompletionRequest --plan_chat--> ChatPlan
    ChatPlan + loaded media --ChatPlan.to_request--> meda_engine.Request
    meda_engine.Result --completion_body / chunk_body--> JSON

Every rejection is an `APIError` carrying its HTTP status and an OpenAI-style error body, so the
ingress turns it into a response without guessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meda_engine import CompressionConfig, ConfigError, GenerationConfig, Image, Message, Request, Result, Video

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                413: "invalid_request_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the endpoint refuses (or failed): HTTP status plus an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        # every error names a code clients can branch on
        self.code = code or ("internal_error" if status >= 500 else "invalid_request")
        self.param = param

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------- request schema
class _Strict(BaseModel):
    # Unknown fields are refused (422) rather than silently ignored: a misspelt option must not
    # quietly fall back to a server default. Strict types: "yes" is not a boolean, 4.0 and "4" are
    # not integers, true is not a number (an integer is still accepted where a float is expected).
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class MediaURL(_Strict):
    url: str = Field(min_length=1)
    detail: str | None = None  # OpenAI's image detail; ignored, the model's pixel budget decides


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: MediaURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None  # accepted for compatibility; the chat template has no slot for it


class VideoOptions(_Strict):
    """Per-request frame sampling (extra_body ``video``): a frame count or a rate, not both."""

    frames: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # torch.Generator's range
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # the engine answers with one choice
    user: str | None = None
    kv_compression: dict[str, Any] | None = None  # any CompressionConfig field, validated by CompressionConfig
    video: VideoOptions | None = None


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """JSON bytes -> validated request; 400 for malformed JSON, 422 for a schema violation."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise APIError(422, "invalid request: " + _describe(e), code="invalid_request") from None


def _describe(error: ValidationError, limit: int = 3) -> str:
    items = error.errors(include_url=False)
    parts = [f"{'.'.join(str(x) for x in item['loc']) or 'body'}: {item['msg']}" for item in items[:limit]]
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(parts) + more


# ---------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Limits:
    """Server-side bounds and defaults for what one request may ask for."""

    default_max_tokens: int = 256
    max_tokens: int = 2048
    default_temperature: float = 0.0  # greedy unless the client asks otherwise (reproducible captions)
    max_images: int = 8
    max_videos: int = 1
    default_video_frames: int = 16
    default_video_fps: float | None = None  # when set, sample at this rate instead of a fixed count
    max_video_frames: int = 64  # per video, whatever the sampling
    max_stop: int = 4


@dataclass(frozen=True)
class MediaRef:
    """An image or video the request points at, to be fetched and decoded by the ingress."""

    kind: Literal["image", "video"]
    url: str


@dataclass(frozen=True)
class VideoSampling:
    """How frames are taken from each video: ``frames`` evenly spaced, or ``fps`` (capped)."""

    frames: int | None
    fps: float | None
    max_frames: int


@dataclass
class ChatPlan:
    """A validated request before its media are loaded."""

    messages: list[tuple[str, list[str | MediaRef]]]
    generation: GenerationConfig
    compression: CompressionConfig
    video: VideoSampling
    stream: bool = False
    include_usage: bool = False
    media: list[MediaRef] = field(init=False)

    def __post_init__(self) -> None:
        self.media = [p for _, parts in self.messages for p in parts if isinstance(p, MediaRef)]

    def to_request(self, loaded: list[Image | Video]) -> Request:
        """The engine request, with ``loaded[i]`` standing in for ``self.media[i]``."""
        if len(loaded) != len(self.media):
            raise ValueError(f"expected {len(self.media)} loaded media, got {len(loaded)}")
        it = iter(loaded)
        messages = [Message(role, [next(it) if isinstance(p, MediaRef) else p for p in parts])
                    for role, parts in self.messages]
        return Request(messages=messages, generation=self.generation, compression=self.compression)


def plan_chat(req: ChatCompletionRequest, limits: Limits, default_compression: CompressionConfig) -> ChatPlan:
    """Check a parsed request against the limits and resolve its settings (400 on a violation)."""
    messages = [_plan_message(m) for m in req.messages]
    refs = [p for _, parts in messages for p in parts if isinstance(p, MediaRef)]
    _check_count("image", sum(r.kind == "image" for r in refs), limits.max_images)
    _check_count("video", sum(r.kind == "video" for r in refs), limits.max_videos)
    try:
        plan = ChatPlan(messages, _generation(req, limits), merge_compression(default_compression, req.kv_compression),
                        _video_sampling(req.video, limits), stream=req.stream,
                        include_usage=bool(req.stream_options and req.stream_options.include_usage))
        # Request validates the chat itself (last message from the user, not empty); check it now,
        # before any media is fetched.
        plan.to_request([Image(None) if r.kind == "image" else Video(None) for r in plan.media])
    except ConfigError as e:
        raise APIError(400, str(e), code="invalid_request") from None
    return plan


def _plan_message(msg: ChatMessage) -> tuple[str, list[str | MediaRef]]:
    role = "system" if msg.role == "developer" else msg.role  # OpenAI's newer name for the system role
    if isinstance(msg.content, str):
        return role, [msg.content]
    parts: list[str | MediaRef] = []
    for part in msg.content:
        if isinstance(part, TextPart):
            parts.append(part.text)
        elif role != "user":
            raise APIError(400, f"images and videos are only accepted in user messages, not {msg.role}",
                           code="invalid_request", param="messages")
        elif isinstance(part, ImagePart):
            parts.append(MediaRef("image", part.image_url.url))
        else:
            parts.append(MediaRef("video", part.video_url.url))
    return role, parts


def _check_count(kind: str, n: int, limit: int) -> None:
    if n > limit:
        raise APIError(400, f"too many {kind}s: {n} (this server accepts at most {limit} per request)",
                       code="too_many_media", param="messages")


def _generation(req: ChatCompletionRequest, limits: Limits) -> GenerationConfig:
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", code="invalid_request",
                       param="max_tokens")
    max_tokens = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of {limits.max_tokens}",
                       code="max_tokens_too_large", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits.max_stop:
        raise APIError(400, f"at most {limits.max_stop} stop sequences, got {len(stop)}", code="too_many_stop",
                       param="stop")
    temperature = limits.default_temperature if req.temperature is None else req.temperature
    return GenerationConfig(max_new_tokens=max_tokens, temperature=temperature,
                            top_p=1.0 if req.top_p is None else req.top_p, stop=tuple(s for s in stop if s),
                            seed=req.seed)


def merge_compression(default: CompressionConfig, overrides: dict[str, Any] | None) -> CompressionConfig:
    """The server's default settings with the request's ``kv_compression`` fields on top.

    Knobs the request leaves out keep the server's value, except the method-dependent ones
    (``text_prior``, ``merge``): when the request names another method they fall back to that
    method's own default instead of inheriting values chosen for the server's method.
    """
    if not overrides:
        return default
    base = default.to_dict()
    if "method" in overrides and overrides["method"] != default.method:
        base.update(text_prior=None, merge=None)
    if "budget" in overrides and "budget_tokens" not in overrides:
        base["budget_tokens"] = None  # a fraction asked for replaces the server's token count
    try:
        return CompressionConfig.from_dict({**base, **overrides})
    except ConfigError as e:  # every wrong type or range, per field (CompressionConfig is strict)
        raise APIError(400, f"invalid kv_compression: {e}", code="invalid_kv_compression",
                       param="kv_compression") from None


def _video_sampling(opts: VideoOptions | None, limits: Limits) -> VideoSampling:
    frames = opts.frames if opts else None
    fps = opts.fps if opts else None
    if frames is not None and fps is not None:
        raise APIError(400, "video: give frames or fps, not both", code="invalid_request", param="video")
    if frames is not None and frames > limits.max_video_frames:
        raise APIError(400, f"video.frames {frames} exceeds this server's limit of {limits.max_video_frames}",
                       code="too_many_frames", param="video")
    if frames is None and fps is None:
        frames, fps = (None, limits.default_video_fps) if limits.default_video_fps else (
            limits.default_video_frames, None)
    return VideoSampling(frames=frames, fps=fps, max_frames=limits.max_video_frames)


# ---------------------------------------------------------------------------------------- responses
def usage(result: Result) -> dict[str, int]:
    prompt, completion = result.telemetry.n_prompt_tokens, result.telemetry.n_generated_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def completion_body(result: Result, *, model: str, created: int) -> dict[str, Any]:
    """A ``chat.completion`` object, with the request's KV telemetry under ``meda``."""
    return {
        "id": completion_id(result.request_id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": usage(result),
        "meda": result.telemetry.to_dict(),
    }


def chunk_body(request_id: str, *, model: str, created: int, delta: dict[str, str] | None = None,
               finish_reason: str | None = None, result: Result | None = None,
               with_usage: bool = False) -> dict[str, Any]:
    """A ``chat.completion.chunk``. The final one (``result`` given) carries the telemetry; with
    ``with_usage`` it is the usage-only chunk OpenAI sends for ``stream_options.include_usage``."""
    body: dict[str, Any] = {"id": completion_id(request_id), "object": "chat.completion.chunk",
                            "created": created, "model": model}
    if with_usage and result is not None:
        body.update(choices=[], usage=usage(result))
        return body
    body["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    if result is not None:
        body["meda"] = result.telemetry.to_dict()
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event; ``data`` is a JSON object or a literal such as ``[DONE]``."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def models_body(names: list[str], created: int) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "meda"} for n in names]}
