"""Prometheus metrics and one structured log line per request.

Metrics live in a registry per app (several apps in one process, as in the tests, do not
collide). Every request label comes from a closed set, so no client can grow the series
count (each series costs memory and scrape time for the life of the process): the route
template (never the raw path) or `unmatched`, the method when it is a standard one else
`OTHER`, the status code when it is a standard one else its class (`5xx`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from app.services import Services

LOG = logging.getLogger("app.requests")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_KNOWN_STATUSES = frozenset(int(s) for s in HTTPStatus)


def method_label(method: str) -> str:
    """The method, or `OTHER` for any token outside the standard ones."""
    return method if method in KNOWN_METHODS else "OTHER"


def status_label(status: int) -> str:
    """The status code when it is a registered one, else its class (`5xx`)."""
    return str(status) if status in _KNOWN_STATUSES else f"{max(1, min(status // 100, 5))}xx"


def route_label(scope: Scope) -> str:
    """The matched route's template, or `unmatched`."""
    template = getattr(scope.get("route"), "path", None)
    return template if isinstance(template, str) and template else "unmatched"


class ServiceMetrics:
    """The service's Prometheus metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "vsearch_http_requests_total",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "vsearch_http_request_duration_seconds",
            "HTTP request latency by route and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "vsearch_inference_batch_size",
            "Images per forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.forward_seconds = Histogram(
            "vsearch_inference_forward_seconds",
            "Duration of one forward pass.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images_embedded = Counter(
            "vsearch_images_embedded_total", "Images embedded.", registry=self.registry
        )
        self._live = _ServicesCollector()
        self.registry.register(self._live)

    def bind(self, services: Services | None) -> None:
        """Read live gauges from `services` at scrape time (None: report none)."""
        self._live.services = services

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.forward_seconds.observe(seconds)
        self.images_embedded.inc(size)


class _ServicesCollector(Collector):
    """Gauges read from the live services at scrape time."""

    def __init__(self) -> None:
        self.services: Services | None = None
        self._pairs: tuple[float, int] = (0.0, 0)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        services = self.services
        if services is None:
            return
        queue = GaugeMetricFamily("vsearch_inference_queue_depth", "Images waiting for the model.")
        queue.add_metric([], services.worker.queue_depth)
        yield queue
        admission = services.admission
        in_flight = GaugeMetricFamily(
            "vsearch_admission_in_flight_images",
            "Images admitted and not yet embedded (fetching, decoding, queued or in the model).",
        )
        in_flight.add_metric([], admission.in_flight)
        yield in_flight
        rejected = CounterMetricFamily(
            "vsearch_admission_rejected_requests",
            "Requests refused with 503 overloaded because too many images were in flight.",
        )
        rejected.add_metric([], admission.rejected_requests)
        yield rejected
        rejected_images = CounterMetricFamily(
            "vsearch_admission_rejected_images", "Images in requests refused as overloaded."
        )
        rejected_images.add_metric([], admission.rejected_images)
        yield rejected_images
        index = services.index.describe()
        if index["kind"] is not None:
            size = GaugeMetricFamily(
                "vsearch_index_vectors", "Vectors per index shard.", labels=["shard", "kind"]
            )
            for n, count in enumerate(index["shards"]):
                size.add_metric([str(n), index["kind"]], count)
            yield size
            generation = GaugeMetricFamily("vsearch_index_generation", "Live index generation.")
            generation.add_metric([], index["generation"])
            yield generation
            lag = GaugeMetricFamily(
                "vsearch_index_catchup_lag",
                "Change-log rows not yet applied (last seq in the log minus applied seq).",
            )
            lag.add_metric([], index["catchup_lag"])
            yield lag
            yield from _search_metrics(index)
        pairs = GaugeMetricFamily("vsearch_duplicate_pairs", "Duplicate pairs stored.")
        pairs.add_metric([], self._pair_count(services))
        yield pairs

    def _pair_count(self, services: Services) -> int:
        # COUNT(*) on a large table is not free: refresh at most every 30 s.
        checked, value = self._pairs
        if time.monotonic() - checked > 30:
            value = services.duplicates.count_pairs()
            self._pairs = (time.monotonic(), value)
        return value


class RequestObservability:
    """ASGI middleware: request id, one log line per request, request metrics."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
        request_id = request_id or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            template = route_label(scope)
            method = method_label(scope.get("method", ""))
            self.metrics.requests.labels(template, method, status_label(status)).inc()
            self.metrics.latency.labels(template, method).observe(duration)
            LOG.info(
                "%s %s %d %.1fms",
                scope.get("method", "")[:32],
                scope.get("path", ""),
                status,
                duration * 1000,
                extra={
                    "request_id": request_id,
                    "route": template,
                    "method": method,
                    "status": status,
                    "duration_ms": round(duration * 1000, 2),
                },
            )


def _search_metrics(index: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    """The IVF-PQ search parameters in use and the recall they were measured to reach."""
    search = index.get("search")
    if search:
        for name in ("nprobe", "refine"):
            gauge = GaugeMetricFamily(
                f"vsearch_index_search_{name}", f"IVF-PQ search {name} in use."
            )
            gauge.add_metric([], search[name])
            yield gauge
    tuning = index.get("tuning")
    if tuning:
        recall = GaugeMetricFamily(
            "vsearch_index_recall",
            "recall@k of the search parameters in use, measured against exact search on a "
            "sample of the catalogue at the last tuning.",
            labels=["k"],
        )
        recall.add_metric([str(tuning["k"])], tuning["recall"])
        yield recall
        target = GaugeMetricFamily("vsearch_index_recall_target", "The recall tuning aims at.")
        target.add_metric([], tuning["target"])
        yield target
