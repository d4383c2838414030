"""The HTTP front: FastAPI routes, auth, body limit, request validation, media loading, OpenAI
responses and server-sent events. Everything a request can get wrong is refused here with a 4xx,
before the request reaches the model's engine loop."""

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from meda_engine import Request, StreamEvent

from ..fetch import MediaItem, MediaLoader, MediaLoadError, VideoPlan
from ..openai_api import APIError, ChatPlan, chunk_body, completion_body, models_body, parse_chat_request, plan_chat, sse
from .metrics import ServeMetrics
from .model import Rejection
from .settings import APIKeys, ServeSettings

logger = logging.getLogger("ray.serve")
CHAT_ROUTE = "/v1/chat/completions"
MODEL_DEPLOYMENT = "MedaModel"


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


def check_api_key(request: HTTPRequest, keys: APIKeys) -> None:
    """401 unless auth is off or the request carries ``Authorization: Bearer KEY`` for a known key."""
    if not keys.keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token_bytes = token.strip().encode()
    # compare_digest against every key: the time taken does not reveal how much of a key matched
    valid = [hmac.compare_digest(token_bytes, key.encode()) for key in keys.keys]
    if scheme.lower() != "bearer" or not any(valid):
        raise APIError(401, "missing or invalid API key; send the header 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


class ModelStatus:
    """The model deployment's state as Serve's controller reports it, cached for ``ttl_s`` (so a
    request to a model that cannot run fails at once with 503 instead of waiting for a replica)."""

    def __init__(self, app_name: str | None, ttl_s: float = 2.0):
        self.app_name = app_name
        self.ttl_s = ttl_s
        self._at = -1e9
        self._value: tuple[bool, str] = (True, "")

    async def get(self) -> tuple[bool, str]:
        """(can serve, why not)."""
        if time.monotonic() - self._at < self.ttl_s:
            return self._value
        self._value = await asyncio.to_thread(self._query)
        self._at = time.monotonic()
        return self._value

    def _query(self) -> tuple[bool, str]:
        try:
            app = serve.status().applications.get(self.app_name or "")
            deployment = app.deployments.get(MODEL_DEPLOYMENT) if app else None
        except Exception as e:  # noqa: BLE001 - the controller unreachable: do not guess "down"
            logger.warning("cannot read the Serve status: %s", e)
            return True, ""
        if deployment is None:
            return True, ""
        running = deployment.replica_states.get("RUNNING", 0)
        if running > 0:
            return True, ""
        status = str(getattr(deployment.status, "value", deployment.status))
        why = deployment.message or ("the model replicas are still starting" if status == "UPDATING" else "")
        return False, f"model deployment is {status} with no running replica" + (f": {why}" if why else "")


api = FastAPI(title="meda", description="OpenAI-compatible chat completions with MEDA KV-cache compression",
              docs_url=None, redoc_url=None, openapi_url=None)  # served below, behind the API key


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class MedaIngress:
    """HTTP front: validates, loads media, calls `MedaModel`, shapes OpenAI responses."""

    def __init__(self, model: DeploymentHandle, settings: dict[str, Any], api_keys: APIKeys):
        if not isinstance(api_keys, APIKeys):
            raise TypeError(f"api_keys must be an APIKeys, got {type(api_keys).__name__}")
        if api_keys.required and not api_keys.keys:  # fail closed: never serve open by accident
            raise RuntimeError("API-key auth was configured when the app was built, but this replica received no "
                               "key; refusing to start")
        s = ServeSettings(**settings)
        self.model = model
        self.settings = s
        self.api_keys = api_keys
        self.model_names = {s.served_name, s.model}
        self.limits = s.limits()
        self.default_compression = s.default_compression()
        self.loader = MediaLoader(s.media_policy(), max_pixels=s.max_decode_pixels,
                                  max_request_pixels=s.max_request_pixels, max_pixels_in_flight=s.max_pixels_in_flight,
                                  decode_concurrency=s.decode_concurrency, fetch_threads=s.media_threads,
                                  decode_timeout_s=s.decode_timeout_s)
        self.metrics = ServeMetrics(s.served_name)
        try:
            app_name = serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001 - outside a replica (unit tests)
            app_name = None
        self.model_status = ModelStatus(app_name)
        if not api_keys.keys:
            logger.warning("meda ingress: no API key configured; the endpoint is open to anyone who can reach it")

    @api.get("/health")
    @api.get("/v1/health")
    async def health(self) -> Response:
        """200 only when a model replica answers; 503 with the reason otherwise (no key needed)."""
        ok, why = await self.model_status.get()
        if ok:
            response = self.model.ready.remote()
            try:
                await asyncio.wait_for(asyncio.shield(response), timeout=10)
            except Exception as e:  # noqa: BLE001 - timeout or a replica error: not healthy
                response.cancel()
                ok, why = False, f"the model deployment did not answer: {type(e).__name__}: {e}"
        if ok:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": why}, status_code=503)

    @api.get("/openapi.json")
    async def openapi(self, request: HTTPRequest) -> Response:
        try:
            check_api_key(request, self.api_keys)
        except APIError as e:
            return self._error("/openapi.json", e)
        return JSONResponse(api.openapi())

    @api.get("/docs")
    async def docs(self, request: HTTPRequest) -> Response:
        try:
            check_api_key(request, self.api_keys)
        except APIError as e:
            return self._error("/docs", e)
        html: HTMLResponse = get_swagger_ui_html(openapi_url="openapi.json", title="meda")
        return html

    @api.get("/v1/models")
    async def models(self, request: HTTPRequest) -> Response:
        try:
            check_api_key(request, self.api_keys)
        except APIError as e:
            return self._error("/v1/models", e)
        self.metrics.request("/v1/models", 200)
        return JSONResponse(models_body([self.settings.served_name], int(time.time())))

    @api.post(CHAT_ROUTE)
    async def chat_completions(self, request: HTTPRequest) -> Response:
        started = time.perf_counter()
        try:
            check_api_key(request, self.api_keys)
            chat = parse_chat_request(await read_body(request, self.settings.max_body_bytes))
            if chat.model not in self.model_names:
                raise APIError(404, f"model {chat.model!r} does not exist; this server serves "
                                    f"{self.settings.served_name!r}", code="model_not_found", param="model")
            plan = plan_chat(chat, self.limits, self.default_compression)
            ok, why = await self.model_status.get()
            if not ok:
                raise APIError(503, why, code="model_unavailable")
            events, request_id = await self._submit(plan)
            if plan.stream:
                return StreamingResponse(self._sse(events, request_id, plan, started), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            result = None
            try:
                async for batch in events:
                    result = next((e.result for e in batch if e.result is not None), result)
            finally:
                events.cancel()  # a no-op once finished; a client that left cancels its generation
            if result is None:
                raise RuntimeError("the model finished without a result")
        except APIError as e:
            return self._error(CHAT_ROUTE, e)
        except Exception:  # noqa: BLE001 - a bug or an engine failure: answer 500, keep serving
            logger.exception("chat completion failed")
            return self._error(CHAT_ROUTE, APIError(500, "internal error while generating", code="internal_error"))
        self.metrics.request(CHAT_ROUTE, 200)
        self.metrics.completion(result, started=started, stream=False)
        return JSONResponse(completion_body(result, model=self.settings.served_name, created=int(time.time())))

    # ---- helpers
    def _error(self, route: str, error: APIError) -> JSONResponse:
        self.metrics.request(route, error.status)
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    async def _submit(self, plan: ChatPlan) -> tuple[Any, str]:
        """Load the media (under the pixel budget), send the request, and wait until the model accepted
        it (so a refusal is still a plain 4xx). Returns the model's event stream, past its first item,
        and the request id.
        The decoded media are released once the model holds the request."""
        items = [MediaItem(ref.kind, ref.url) for ref in plan.media]
        video = VideoPlan(plan.video.frames, plan.video.fps, plan.video.max_frames)
        try:
            async with self.loader.load(items, video) as loaded:
                engine_request: Request = plan.to_request(loaded)
                request_id = engine_request.request_id
                events = self.model.options(stream=True).stream.remote(engine_request)
                del engine_request, loaded
                first = await events.__anext__()
        except MediaLoadError as e:
            raise APIError(e.status, str(e), code=e.code, param="messages") from None
        if isinstance(first, Rejection):
            raise first.to_api_error()
        return events, request_id

    async def _sse(self, events, request_id: str, plan: ChatPlan, started: float) -> AsyncIterator[bytes]:
        """OpenAI chunks: the role, one chunk per text delta, the finish (with telemetry), optionally
        usage, then ``[DONE]``. A failure after the headers were sent becomes an error event. A client
        that disconnects cancels the model's generation (its row is freed)."""
        shape = {"model": self.settings.served_name, "created": int(time.time())}
        result = None
        finished = False
        try:
            yield sse(chunk_body(request_id, delta={"role": "assistant", "content": ""}, **shape))
            async for batch in events:
                for event in batch:
                    event: StreamEvent
                    if event.delta:
                        yield sse(chunk_body(request_id, delta={"content": event.delta}, **shape))
                    if event.result is not None:
                        result = event.result
                        yield sse(chunk_body(request_id, finish_reason=result.finish_reason, result=result, **shape))
            if result is None:
                raise RuntimeError("the stream ended without a result")
            if plan.include_usage:
                yield sse(chunk_body(request_id, result=result, with_usage=True, **shape))
            finished = True
            self.metrics.request(CHAT_ROUTE, 200)
            self.metrics.completion(result, started=started, stream=True)
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.cancelled.inc()
            raise
        except Exception:  # noqa: BLE001 - the status line is gone; report in-band, keep serving
            logger.exception("streaming chat completion failed")
            self.metrics.request(CHAT_ROUTE, 500)
            yield sse(APIError(500, "internal error while generating", code="internal_error").body())
        finally:
            if not finished:
                events.cancel()  # the client left (or it failed): stop the generation, free its row
        yield sse("[DONE]")
