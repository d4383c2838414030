"""Custom endpoint metrics, exported by Ray's metrics agent next to Serve's own (as ``ray_meda_*``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from meda_engine import Result


class ServeMetrics:
    """Counters and a latency histogram, all tagged with the served model's name."""

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
        self.cancelled = Counter("meda_requests_cancelled", "Streams the client abandoned before the end",
                                 tag_keys=("model",)).set_default_tags(tags)
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


class EngineMetrics:
    """The replica's engine gauges (vLLM's ``num_requests_running`` / ``kv_cache_usage_perc`` family):
    rows running and waiting, KV bytes in use against the cap, preemptions. Sampled from
    `SchedulerStats` by `MedaModel` once a second."""

    GAUGES = {
        "running": ("meda_engine_rows_running", "Rows decoding in the replica's running batch"),
        "waiting": ("meda_engine_rows_waiting", "Requests queued for admission"),
        "kv_bytes_in_use": ("meda_engine_kv_bytes_in_use", "KV-cache bytes held by running rows (measured storage)"),
        "kv_cache_memory_bytes": ("meda_engine_kv_cache_capacity_bytes", "The KV-cache cap admission keeps under"),
        "kv_cache_usage": ("meda_engine_kv_cache_usage", "KV bytes in use / the cap"),
        "preemptions": ("meda_engine_preemptions", "Rows preempted so far (0: the scheduler queues instead)"),
        "cancelled": ("meda_engine_requests_cancelled", "Requests cancelled in the engine so far"),
        "failed": ("meda_engine_requests_failed", "Requests that failed inside the engine so far"),
    }

    def __init__(self, model: str):
        from ray.util.metrics import Gauge

        self.gauges = {key: Gauge(name, doc, tag_keys=("model",)).set_default_tags({"model": model})
                       for key, (name, doc) in self.GAUGES.items()}

    def update(self, stats: dict) -> None:
        for key, gauge in self.gauges.items():
            if key in stats:
                gauge.set(float(stats[key]))
