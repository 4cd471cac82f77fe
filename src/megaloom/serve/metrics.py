"""Prometheus metrics of one server: what `/metrics` exposes.

Owns `ServeMetrics` (a private `prometheus_client` registry, so several apps can live in one
process, e.g. in tests) and `MetricsMiddleware`, the ASGI wrapper that counts every HTTP
response by route and status. The driver fills in the engine-side numbers.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    """Counters, gauges and histograms of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("megaloom_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("megaloom_prompt_tokens",
                                     "prompt tokens of accepted generation requests", registry=r)
        self.generation_tokens = Counter("megaloom_generation_tokens", "tokens generated",
                                         registry=r)
        self.finished = Counter("megaloom_sequences_finished",
                                "finished sequences by finish reason", ["reason"], registry=r)
        self.queue_depth = Gauge("megaloom_queue_depth",
                                 "sequences waiting for a slot in the running batch", registry=r)
        self.running = Gauge("megaloom_running_batch_size",
                             "sequences in the running batch", registry=r)
        self.ttft = Histogram("megaloom_time_to_first_token_seconds",
                              "time from submission to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("megaloom_request_latency_seconds",
                                 "time from submission to the last generated token",
                                 buckets=_LATENCY_BUCKETS, registry=r)

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts each HTTP response under its route path (static files as "/web", unknown
    paths as "other", so clients cannot grow the label set)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else "other"
        if route == "other" and path.startswith("/web/"):
            route = "/web"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
