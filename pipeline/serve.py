"""The online endpoint: an OpenAI-compatible Ray Serve application with per-request KV compression.

Two deployments::

    HTTP -> MedaIngress (CPU, FastAPI)                      -> MedaModel (GPU or CPU, one Engine)
            auth, body limit, parse + bound the request,       prepare (tokenise, pixels) per request,
            fetch + decode media in a thread pool,             @serve.batch: one Engine.stream call per
            build a meda_engine.Request (its own               batch, run in a worker thread; events are
            CompressionConfig), responses / SSE, metrics       routed back to each caller

Compression and sampling settings travel inside each `Request`, so concurrent requests with different
settings share no state. Build the application with `app_builder` (``serve_config.yaml`` passes its
``args``) or run it locally with ``meda serve``; see docs/serving.md.
"""

import argparse
import asyncio
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from meda_engine import (
    CompressionConfig,
    ConfigError,
    ContextLengthError,
    MediaError,
    PreparedRequest,
    Request,
    Result,
    StreamEvent,
    parse_budget,
)

from .fetch import MediaLoadError, MediaPolicy, check_url, load_image, load_video
from .openai_api import (
    APIError,
    ChatPlan,
    Limits,
    MediaRef,
    chunk_body,
    completion_body,
    models_body,
    parse_chat_request,
    plan_chat,
    sse,
)

logger = logging.getLogger("ray.serve")
MiB = 2**20


class ServeSettings(BaseModel):
    """Everything the application is parametrised by (``args`` in serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    # the model
    model: str  # hub id, local checkpoint directory or s3:// prefix
    served_model_name: str | None = None  # the name clients pass as `model`; default: `model`
    device: str = "auto"
    dtype: str = "auto"
    max_pixels_per_frame: int | None = None
    torch_threads: int | None = None  # torch intra-op threads per model replica (None: torch's default)

    # server-default compression; requests override any field through `kv_compression`
    method: str = "meda"
    budget: float | int = 0.2
    compression: dict[str, Any] = Field(default_factory=dict)

    # request limits
    max_body_bytes: int = 32 * MiB
    max_prompt_tokens: int = 32768
    default_max_tokens: int = 256
    max_tokens: int = 2048
    default_temperature: float = 0.0
    max_images: int = 8
    max_videos: int = 1
    default_video_frames: int = 16
    default_video_fps: float | None = None
    max_video_frames: int = 64
    max_decode_pixels: int | None = None  # downscale decoded frames to this; None: meda_engine.media's defaults
    decode_timeout_s: float = 60.0
    media_threads: int = 8

    # media URL policy (pipeline.fetch)
    allowed_schemes: list[str] = Field(default_factory=lambda: ["data", "s3", "https"])
    allow_http: bool = False
    allowed_buckets: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    allow_private_networks: bool = False
    max_media_bytes: int = 256 * MiB
    fetch_timeout_s: float = 30.0
    storage: dict[str, Any] = Field(default_factory=dict)  # filesystem_for kwargs: endpoint_url, region, anon...

    # auth: keys given here, plus a comma-separated list in the environment variable `api_key_env`
    api_keys: list[str] = Field(default_factory=list)
    api_key_env: str | None = "MEDA_API_KEY"

    # deployments
    num_gpus: float = 0.0  # per model replica
    num_cpus: float = 1.0  # per model replica
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float | None = None  # per model replica; default max_batch_size
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    ingress_num_cpus: float = 1.0
    ingress_min_replicas: int = 1
    ingress_max_replicas: int = 2
    ingress_max_ongoing_requests: int = 64

    @model_validator(mode="after")
    def _check(self) -> "ServeSettings":
        self.default_compression()  # fail at build time, not on the first request
        if self.max_batch_size < 1 or self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError("need max_batch_size >= 1 and 0 <= min_replicas <= max_replicas >= 1")
        return self

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model

    def default_compression(self) -> CompressionConfig:
        return CompressionConfig.from_dict({**self.compression, "method": self.method,
                                            "budget": parse_budget(self.budget)})

    def limits(self) -> Limits:
        return Limits(default_max_tokens=self.default_max_tokens, max_tokens=self.max_tokens,
                      default_temperature=self.default_temperature, max_images=self.max_images,
                      max_videos=self.max_videos, default_video_frames=self.default_video_frames,
                      default_video_fps=self.default_video_fps, max_video_frames=self.max_video_frames)

    def media_policy(self) -> MediaPolicy:
        schemes = [s.lower() for s in self.allowed_schemes] + (["http"] if self.allow_http else [])
        return MediaPolicy(allowed_schemes=tuple(dict.fromkeys(schemes)), allowed_buckets=tuple(self.allowed_buckets),
                           allowed_hosts=tuple(self.allowed_hosts), allow_private_networks=self.allow_private_networks,
                           max_bytes=self.max_media_bytes, timeout_s=self.fetch_timeout_s,
                           storage_options=dict(self.storage))

    def resolve_api_keys(self) -> list[str]:
        from_env = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return [k for k in (*self.api_keys, *from_env.split(",")) if k.strip()]


@dataclass
class Rejection:
    """A request the model replica refuses (prompt too long, bad pixels): a value, not an exception,
    so it crosses the DeploymentHandle unchanged."""

    status: int
    message: str
    code: str

    def to_api_error(self) -> APIError:
        return APIError(self.status, self.message, code=self.code)


# ------------------------------------------------------------------------------------------ model
@dataclass
class _Failure:
    error: BaseException


async def _in_thread(make_iterator: Callable[[], Iterator], executor: ThreadPoolExecutor) -> AsyncIterator[list]:
    """Drive a blocking iterator in ``executor``; yield the items produced so far, as lists.

    Grouping whatever is ready keeps the per-token overhead on the event loop small when the
    consumer is slower than the engine. An exception in the iterator is re-raised here.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def work() -> None:
        try:
            for item in make_iterator():
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            loop.call_soon_threadsafe(queue.put_nowait, _Failure(e))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    future = loop.run_in_executor(executor, work)
    ended = False
    while not ended:
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        for item in items:
            if isinstance(item, _Failure):
                raise item.error
        ended = items[-1] is done
        items = [x for x in items if x is not done]
        if items:
            yield items
    await future


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30, graceful_shutdown_timeout_s=60)
class MedaModel:
    """One Engine per replica. Requests are prepared concurrently, then batched into one
    `Engine.stream` call that runs in a worker thread, so the replica's event loop stays free to
    accept requests and answer health checks while a batch generates."""

    FAILURES_BEFORE_UNHEALTHY = 3

    def __init__(self, settings: dict[str, Any]):
        import torch

        from meda_engine import Engine

        self.settings = ServeSettings(**settings)
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self.engine = Engine.from_pretrained(s.model, device=s.device, dtype=s.dtype,
                                             max_pixels_per_frame=s.max_pixels_per_frame,
                                             max_batch_size=s.max_batch_size)
        # One worker: the engine runs one batch at a time anyway (it holds a lock per call).
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="meda-engine")
        self._failed_batches = 0
        self._batch.set_max_batch_size(s.max_batch_size)
        self._batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    async def generate(self, request: Request) -> Result | Rejection:
        """The finished `Result`, or why the request was refused."""
        prepared = await self._prepare(request)
        if isinstance(prepared, Rejection):
            return prepared
        result = None
        # Consume the whole stream (rather than returning at the result) so Serve's batcher can
        # close this caller's stream cleanly.
        async for events in self._batch(prepared):
            result = next((e.result for e in events if e.result is not None), result)
        if result is None:
            raise RuntimeError(f"the engine finished request {request.request_id} without a result")
        return result

    async def stream(self, request: Request) -> AsyncIterator[list[StreamEvent] | Rejection]:
        """Streaming form: first a `Rejection` (and nothing else) or an empty list once the prompt is
        accepted, then lists of `StreamEvent`s; the last event carries the `Result`."""
        prepared = await self._prepare(request)
        if isinstance(prepared, Rejection):
            yield prepared
            return
        yield []  # accepted: the ingress may now start the HTTP stream
        async for events in self._batch(prepared):
            if events:
                yield events

    def check_health(self) -> None:
        # A replica whose batches keep failing (a wedged device, say) is restarted by Serve.
        if self._failed_batches >= self.FAILURES_BEFORE_UNHEALTHY:
            raise RuntimeError(f"{self._failed_batches} engine batches failed in a row")

    async def _prepare(self, request: Request) -> PreparedRequest | Rejection:
        """Tokenise and preprocess off the event loop; refuse what cannot or may not run."""
        try:
            prepared = await asyncio.to_thread(self.engine.prepare, request)
        except ContextLengthError as e:
            return Rejection(400, str(e), "context_length_exceeded")
        except MediaError as e:
            return Rejection(400, str(e), "invalid_media")
        except ConfigError as e:
            return Rejection(400, str(e), "invalid_request")
        limit = self.settings.max_prompt_tokens
        if prepared.prompt.length > limit:
            return Rejection(400, f"the prompt has {prepared.prompt.length} tokens; this server accepts at most "
                                  f"{limit} (use fewer frames or images, or shorter text)", "context_length_exceeded")
        return prepared

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # resized from the settings in __init__
    async def _batch(self, batch: list[PreparedRequest]) -> AsyncIterator[list]:
        """Run one batch; each yield hands every caller the events produced for it since the last
        yield (a list, possibly empty), or StopIteration once its result was delivered."""
        finished = [False] * len(batch)
        try:
            async for events in _in_thread(lambda: self.engine.stream(batch), self._worker):
                per_request: list[list[StreamEvent]] = [[] for _ in batch]
                for event in events:
                    per_request[event.index].append(event)
                yield [StopIteration if finished[i] else per_request[i] for i in range(len(batch))]
                for event in events:
                    finished[event.index] |= event.result is not None
        except Exception:
            self._failed_batches += 1
            raise
        self._failed_batches = 0


# ------------------------------------------------------------------------------------------ metrics
class ServeMetrics:
    """Custom metrics, exported by Ray's metrics agent next to Serve's own (as ``ray_meda_*``)."""

    LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]

    def __init__(self, model: str):
        from ray.util.metrics import Counter, Histogram

        tags = {"model": model}
        self.requests = Counter("meda_requests", "Requests by route and HTTP status",
                                tag_keys=("model", "route", "status")).set_default_tags(tags)
        self.prompt_tokens = Counter("meda_prompt_tokens", "Prompt tokens of answered requests",
                                     tag_keys=("model", "method")).set_default_tags(tags)
        self.completion_tokens = Counter("meda_completion_tokens", "Generated tokens of answered requests",
                                         tag_keys=("model", "method")).set_default_tags(tags)
        self.kv_bytes_saved = Counter("meda_kv_bytes_saved", "Prompt KV bytes evicted or merged by compression",
                                      tag_keys=("model", "method")).set_default_tags(tags)
        self.latency = Histogram("meda_request_latency_seconds", "Chat completion latency (to the last token)",
                                 boundaries=self.LATENCY_BOUNDARIES,
                                 tag_keys=("model", "stream")).set_default_tags(tags)

    def request(self, route: str, status: int) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})

    def completion(self, result: Result, *, started: float, stream: bool) -> None:
        t = result.telemetry
        method = {"method": t.method}
        self.prompt_tokens.inc(t.n_prompt_tokens, tags=method)
        if t.n_generated_tokens:
            self.completion_tokens.inc(t.n_generated_tokens, tags=method)
        if t.kv_bytes_full > t.kv_bytes_kept:
            self.kv_bytes_saved.inc(t.kv_bytes_full - t.kv_bytes_kept, tags=method)
        self.latency.observe(time.perf_counter() - started, tags={"stream": str(stream).lower()})


# ------------------------------------------------------------------------------------------ ingress
# Everything the routes use is defined above the ingress class: @serve.ingress pickles the FastAPI
# app, route methods included, when it decorates the class, capturing only the globals that exist.
async def read_body(request: HTTPRequest, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes without buffering them."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds this server's limit of {limit} bytes",
                       code="request_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"request body exceeds this server's limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


api = FastAPI(title="meda", description="OpenAI-compatible chat completions with MEDA KV-cache compression")
CHAT_ROUTE = "/v1/chat/completions"


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class MedaIngress:
    """HTTP front: validates, loads media, calls `MedaModel`, shapes OpenAI responses."""

    def __init__(self, model: DeploymentHandle, settings: dict[str, Any]):
        s = ServeSettings(**settings)
        self.model = model
        self.settings = s
        self.model_names = {s.served_name, s.model}
        self.limits = s.limits()
        self.policy = s.media_policy()
        self.default_compression = s.default_compression()
        self.api_keys = s.resolve_api_keys()
        self.media_pool = ThreadPoolExecutor(s.media_threads, thread_name_prefix="meda-media")
        self.metrics = ServeMetrics(s.served_name)

    @api.get("/health")
    @api.get("/v1/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: HTTPRequest) -> Response:
        try:
            self._authorize(request)
        except APIError as e:
            return self._error("/v1/models", e)
        self.metrics.request("/v1/models", 200)
        return JSONResponse(models_body([self.settings.served_name], int(time.time())))

    @api.post(CHAT_ROUTE)
    async def chat_completions(self, request: HTTPRequest) -> Response:
        started = time.perf_counter()
        try:
            self._authorize(request)
            chat = parse_chat_request(await read_body(request, self.settings.max_body_bytes))
            if chat.model not in self.model_names:
                raise APIError(404, f"model {chat.model!r} does not exist; this server serves "
                                    f"{self.settings.served_name!r}", code="model_not_found", param="model")
            plan = plan_chat(chat, self.limits, self.default_compression)
            engine_request = plan.to_request(await self._load_media(plan))
            if plan.stream:
                return await self._start_stream(engine_request, plan, started)
            result = await self.model.generate.remote(engine_request)
            if isinstance(result, Rejection):
                raise result.to_api_error()
        except APIError as e:
            return self._error(CHAT_ROUTE, e)
        except Exception:  # noqa: BLE001 - a bug or an engine failure: answer 500, keep serving
            logger.exception("chat completion failed")
            return self._error(CHAT_ROUTE, APIError(500, "internal error while generating", code="internal_error"))
        self.metrics.request(CHAT_ROUTE, 200)
        self.metrics.completion(result, started=started, stream=False)
        return JSONResponse(completion_body(result, model=self.settings.served_name, created=int(time.time())))

    # ---- helpers
    def _authorize(self, request: HTTPRequest) -> None:
        if not self.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token_bytes = token.strip().encode()
        # compare_digest against every key: the time taken does not reveal how much of a key matched
        valid = [hmac.compare_digest(token_bytes, key.encode()) for key in self.api_keys]
        if scheme.lower() != "bearer" or not any(valid):
            raise APIError(401, "missing or invalid API key; send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def _error(self, route: str, error: APIError) -> JSONResponse:
        self.metrics.request(route, error.status)
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    async def _load_media(self, plan: ChatPlan) -> list:
        """Fetch and decode every media part concurrently, in the media thread pool."""
        try:
            for ref in plan.media:  # refuse the request before fetching anything
                check_url(ref.url, self.policy)
        except MediaLoadError as e:
            raise APIError(e.status, str(e), code=e.code, param="messages") from None
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.media_pool, self._load_one, ref, plan) for ref in plan.media]
        try:
            return list(await asyncio.gather(*jobs))
        except MediaLoadError as e:
            raise APIError(e.status, str(e), code=e.code, param="messages") from None

    def _load_one(self, ref: MediaRef, plan: ChatPlan):
        s = self.settings
        if ref.kind == "image":
            return load_image(ref.url, self.policy, max_pixels=s.max_decode_pixels,
                              decode_timeout_s=s.decode_timeout_s)
        return load_video(ref.url, self.policy, frames=plan.video.frames, fps=plan.video.fps,
                          max_frames=plan.video.max_frames, max_pixels=s.max_decode_pixels,
                          decode_timeout_s=s.decode_timeout_s)

    async def _start_stream(self, request: Request, plan: ChatPlan, started: float) -> Response:
        """Wait until the model accepted the prompt (so a refusal is still a plain 4xx), then stream."""
        events = self.model.options(stream=True).stream.remote(request)
        first = await events.__anext__()
        if isinstance(first, Rejection):
            raise first.to_api_error()
        return StreamingResponse(self._sse(events, request.request_id, plan, started),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _sse(self, events: AsyncIterator[list[StreamEvent]], request_id: str, plan: ChatPlan,
                   started: float) -> AsyncIterator[bytes]:
        """OpenAI chunks: the role, one chunk per text delta, the finish (with telemetry), optionally
        usage, then ``[DONE]``. A failure after the headers were sent becomes an error event."""
        shape = {"model": self.settings.served_name, "created": int(time.time())}
        yield sse(chunk_body(request_id, delta={"role": "assistant", "content": ""}, **shape))
        result = None
        try:
            async for batch in events:
                for event in batch:
                    if event.delta:
                        yield sse(chunk_body(request_id, delta={"content": event.delta}, **shape))
                    if event.result is not None:
                        result = event.result
                        yield sse(chunk_body(request_id, finish_reason=result.finish_reason, result=result, **shape))
            if result is None:
                raise RuntimeError("the stream ended without a result")
            if plan.include_usage:
                yield sse(chunk_body(request_id, result=result, with_usage=True, **shape))
            self.metrics.request(CHAT_ROUTE, 200)
            self.metrics.completion(result, started=started, stream=True)
        except Exception:  # noqa: BLE001 - the status line is gone; report in-band, keep serving
            logger.exception("streaming chat completion failed")
            self.metrics.request(CHAT_ROUTE, 500)
            yield sse(APIError(500, "internal error while generating", code="internal_error").body())
        yield sse("[DONE]")


# ------------------------------------------------------------------------------------------ building
def app_builder(args: dict[str, Any]) -> serve.Application:
    """The Serve application for ``args`` (see `ServeSettings`); serve_config.yaml's import_path."""
    s = ServeSettings.model_validate(dict(args))
    settings = s.model_dump()
    model = MedaModel.options(
        ray_actor_options={"num_gpus": s.num_gpus, "num_cpus": s.num_cpus},
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests or s.max_batch_size},
        # room for one batch running and the next one filling up
        max_ongoing_requests=2 * s.max_batch_size,
    ).bind(settings)
    return MedaIngress.options(
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
        autoscaling_config={"min_replicas": s.ingress_min_replicas, "max_replicas": s.ingress_max_replicas,
                            "target_ongoing_requests": max(1, s.ingress_max_ongoing_requests // 2)},
        max_ongoing_requests=s.ingress_max_ongoing_requests,
    ).bind(model, settings)


# ------------------------------------------------------------------------------------------ CLI
def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``meda serve``: run the endpoint on a local (or given) Ray instance until Ctrl-C."""
    from meda_engine import METHODS

    p = subparsers.add_parser("serve", help="run the OpenAI-compatible endpoint (Ray Serve)",
                              description="Serve /v1/chat/completions with per-request KV compression. "
                                          "For clusters, deploy serve_config.yaml instead (docs/serving.md).")
    p.add_argument("--model", required=True, help="hub id, checkpoint directory or s3:// prefix")
    p.add_argument("--served-model-name", help="the name clients pass as `model` (default: --model)")
    p.add_argument("--method", default="meda", choices=METHODS, help="default compression method")
    p.add_argument("--budget", default="0.2", help="default budget: a fraction <= 1 or a token count")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-gpus", type=float, help="GPUs per model replica (default: 1 if CUDA is available)")
    p.add_argument("--max-replicas", type=int, default=1, help="autoscale the model up to this many replicas")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--allow-bucket", action="append", default=[], help="object-store bucket pattern (repeatable)")
    p.add_argument("--allow-host", action="append", default=[], help="http(s) host pattern (repeatable)")
    p.add_argument("--allow-http", action="store_true", help="also accept plain http:// media URLs")
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// media (MinIO, ...)")
    p.add_argument("--api-key-env", default="MEDA_API_KEY",
                   help="environment variable holding the accepted API keys, comma-separated (unset: no auth)")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    p.set_defaults(func=run_serve)
    return p


def settings_from_cli(args: argparse.Namespace) -> dict[str, Any]:
    num_gpus = args.num_gpus
    if num_gpus is None:
        import torch

        num_gpus = 1.0 if torch.cuda.is_available() else 0.0
    settings: dict[str, Any] = {
        "model": args.model, "served_model_name": args.served_model_name, "method": args.method,
        "budget": parse_budget(args.budget), "device": args.device, "dtype": args.dtype, "num_gpus": num_gpus,
        "max_replicas": args.max_replicas, "max_batch_size": args.max_batch_size,
        "allowed_buckets": args.allow_bucket, "allowed_hosts": args.allow_host, "allow_http": args.allow_http,
        "api_key_env": args.api_key_env,
    }
    if args.s3_endpoint_url:
        settings["storage"] = {"endpoint_url": args.s3_endpoint_url}
    return settings


def run_serve(args: argparse.Namespace) -> int:
    import ray

    app = app_builder(settings_from_cli(args))  # validate before starting anything
    ray.init(address=args.ray_address)
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"meda serve: http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
    serve.run(app, name="meda", route_prefix="/", blocking=True)
    return 0
