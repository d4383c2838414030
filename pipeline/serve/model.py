"""The model deployment: one `Engine` per replica, driven by one continuous-batching `EngineLoop`.

Requests join the replica's running batch as they arrive (meda_engine.scheduler): each is prepared
(tokens, pixels) off the event loop, admitted under the KV-memory cap, and streams its tokens as
they are produced. What the endpoint relies on:

* **Isolation.** A request that fails inside the engine ends alone (the scheduler rolls a failed
  batched step back and retries it row by row); its batch-mates finish. The failure makes the
  replica *suspect*: its next health check runs a one-token probe, so a poison request does not get
  the replica killed, while a wedged engine does.
* **Cancellation.** When the caller goes away (the client disconnected, so Serve cancels the call),
  the request is cancelled in the scheduler: its row and KV bytes are freed at the end of the step
  in flight, and the rest of the batch goes on without it.
* **Ready means able to generate.** The constructor loads the model and runs a one-token probe, so
  a replica that cannot generate never becomes RUNNING (and ``meda serve`` reports why).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray import serve

from .settings import ServeSettings

if TYPE_CHECKING:  # pragma: no cover
    from meda_engine import PreparedRequest, Request, Result, StreamEvent

logger = logging.getLogger("ray.serve")


@dataclass
class Rejection:
    """A request the model replica refuses (prompt too long, bad pixels): a value, not an exception,
    so it crosses the DeploymentHandle unchanged."""

    status: int
    message: str
    code: str

    def to_api_error(self):
        from pipeline.openai_api import APIError

        return APIError(self.status, self.message, code=self.code)


class EngineFailure(RuntimeError):
    """The engine raised while running this request (the request failed alone)."""


class ModelServer:
    """The replica's logic, independent of Serve (the deployment below wraps it; tests drive it
    in-process): an engine, its `EngineLoop`, and the probe."""

    def __init__(self, settings: ServeSettings, engine: Any | None = None):
        from meda_engine import CompressionConfig, GenerationConfig, Request
        from meda_engine.scheduler import EngineLoop

        self.settings = s = settings
        if engine is None:
            import torch

            from meda_engine import Engine

            if s.torch_threads:
                torch.set_num_threads(s.torch_threads)
            engine = Engine.from_pretrained(s.model, device=s.device, dtype=s.dtype,
                                            max_pixels_per_frame=s.max_pixels_per_frame)
        self.engine = engine
        self.loop = EngineLoop(engine, max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens, kv_cache_memory_bytes=s.kv_cache_memory_bytes,
                               kv_cache_memory_fraction=s.kv_cache_memory_fraction)
        self.suspect = False  # a request failed in the engine since the last probe
        self.failed_requests = 0
        self.cancelled_requests = 0
        self._probe = Request(prompt="ping", generation=GenerationConfig(max_new_tokens=1),
                              compression=CompressionConfig(method="full"))
        self.loop.submit(self.engine.prepare(self._probe)).result(timeout=600)

    async def events(self, request: Request) -> AsyncIterator[list[StreamEvent] | Rejection]:
        """First a `Rejection` (and nothing else) or ``[]`` once the request is admitted to the queue,
        then lists of `StreamEvent`s; the last one carries the `Result`. An engine failure of this
        request raises `EngineFailure`. Closing the iterator early cancels the request."""
        from meda_engine import ConfigError, ContextLengthError, MediaError

        try:
            handle = await asyncio.to_thread(self._submit, request)
        except ContextLengthError as e:
            yield Rejection(400, str(e), "context_length_exceeded")
            return
        except MediaError as e:
            yield Rejection(400, str(e), "invalid_media")
            return
        except ConfigError as e:  # RequestTooLarge (it could never fit the KV cap) is one
            yield Rejection(400, str(e), "invalid_request")
            return
        except _PromptTooLong as e:
            yield Rejection(400, str(e), "context_length_exceeded")
            return
        yield []
        try:
            async for event in handle:
                if event.error is not None:
                    self.failed_requests += 1
                    self.suspect = True
                    logger.error("request %s failed in the engine: %s: %s", event.request_id,
                                 type(event.error).__name__, event.error)
                    raise EngineFailure(f"{type(event.error).__name__}: {event.error}") from event.error
                yield [event]
        finally:
            if not handle.done:
                self.cancelled_requests += 1
                self.loop.cancel(handle)

    def _submit(self, request: Request):
        prepared = self.engine.prepare(request)
        limit = self.settings.max_prompt_tokens
        if prepared.prompt.length > limit:
            raise _PromptTooLong(f"the prompt has {prepared.prompt.length} tokens; this server accepts at most "
                                 f"{limit} (use fewer frames or images, or shorter text)")
        return self.loop.submit(prepared)

    async def generate(self, request: Request) -> Result | Rejection:
        result = None
        async for events in self.events(request):
            if isinstance(events, Rejection):
                return events
            result = next((e.result for e in events if e.result is not None), result)
        if result is None:
            raise RuntimeError(f"the engine finished request {request.request_id} without a result")
        return result

    def stats(self) -> dict[str, Any]:
        return {**self.loop.stats().to_dict(), "suspect": self.suspect, "failed_requests": self.failed_requests,
                "cancelled_requests": self.cancelled_requests, "loop_alive": self.loop._thread.is_alive()}

    async def check_health(self) -> None:
        if not self.loop._thread.is_alive():
            raise RuntimeError("the engine loop thread died")
        if not self.suspect:
            return
        # After a failed request, probe: a poison request leaves a healthy engine; a wedged one
        # (device lost, say) fails the probe, and Serve replaces the replica.
        handle = await asyncio.to_thread(lambda: self.loop.submit(self.engine.prepare(self._probe)))
        async for event in handle:
            if event.error is not None:
                raise RuntimeError(f"the engine fails a one-token probe: {event.error}") from event.error
        self.suspect = False


class _PromptTooLong(Exception):
    pass


# ------------------------------------------------------------------------------------------ deployment
@serve.deployment(health_check_period_s=10, health_check_timeout_s=30, graceful_shutdown_timeout_s=60)
class MedaModel:
    """One `ModelServer` per replica."""

    def __init__(self, settings: dict[str, Any]):
        import threading

        from .metrics import EngineMetrics

        s = ServeSettings(**settings)
        self.server = ModelServer(s)
        self._metrics = EngineMetrics(s.served_name)
        self._stop = threading.Event()
        threading.Thread(target=self._export_engine_metrics, name="meda-engine-metrics", daemon=True).start()

    def _export_engine_metrics(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self._metrics.update(self.server.stats())
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                logger.exception("meda: exporting the engine gauges failed")

    async def generate(self, request: Request) -> Result | Rejection:
        """The finished `Result`, or why the request was refused."""
        return await self.server.generate(request)

    async def stream(self, request: Request) -> AsyncIterator[list[StreamEvent] | Rejection]:
        """First a `Rejection` (and nothing else) or ``[]`` once accepted, then lists of events."""
        async for item in self.server.events(request):
            yield item

    async def ready(self) -> dict[str, Any]:
        """For the ingress's /health: answers once the model is loaded and the loop runs."""
        return {"status": "ok", **self.server.stats()}

    async def check_health(self) -> None:
        await self.server.check_health()
