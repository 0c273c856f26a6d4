"""What `domainlm serve` counts: Prometheus metrics (GET /metrics, the text format, through prometheus_client) and
the same counts as JSON with latency percentiles (GET /metrics.json, what the console shows).

Every HTTP answer is counted by route (the route's template, e.g. /v2/models/{name}/infer) and status, with its
latency, by one ASGI middleware; the model's worker adds texts, batch sizes and tokens, requests per gathering and
its time per gathering. The registry is the app's own, so that several apps in one process never share counts.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, Histogram, Info
from prometheus_client import Counter as PromCounter

# the routes that classify texts: their answers make the JSON view's request counts and latency percentiles
INFERENCE_ROUTES = frozenset({"/predict", "/", "/v2/models/{name}/infer"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class ServerMetrics:
    """The app's counters, thread-safe (the event loop and the model's worker both write)."""

    def __init__(self, queue_depth, info: dict[str, str]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = PromCounter(
            "domainlm_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "domainlm_request_duration_seconds",
            "time from request to answer, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.texts = PromCounter("domainlm_texts", "texts classified", registry=r)
        self.batch_size = Histogram("domainlm_batch_size", "texts per model batch", buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "domainlm_batch_tokens", "padded tokens per model batch (rows x longest)", buckets=TOKEN_BUCKETS, registry=r
        )
        self.gathered = Histogram(
            "domainlm_gathered_requests",
            "requests answered by one gathering of the worker",
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "domainlm_inference_duration_seconds", "model time per gathering", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue = Gauge("domainlm_queue_depth", "requests waiting for the model", registry=r)
        self.queue.set_function(queue_depth)
        Info("domainlm_model", "the served model", registry=r).info(info)
        self.queue_depth = queue_depth
        # the JSON view
        self.lock = threading.Lock()
        self.started = time.time()
        self.by_status: Counter = Counter()
        self.text_count = self.batch_count = 0
        self.batch_sizes: Counter = Counter()
        self.gatherings: Counter = Counter()
        self.latencies_ms: deque = deque(maxlen=20_000)

    def answered(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if route in INFERENCE_ROUTES:
            with self.lock:
                self.by_status[status] += 1
                if status == 200:
                    self.latencies_ms.append(1000 * seconds)

    def ran(self, texts: int, sizes: list[int], tokens: list[int], requests: int, seconds: float) -> None:
        """One gathering through the model: its texts, its batches' sizes and padded tokens, its requests."""
        self.texts.inc(texts)
        for size in sizes:
            self.batch_size.observe(size)
        for n in tokens:
            self.batch_tokens.observe(n)
        self.gathered.observe(requests)
        self.inference.observe(seconds)
        with self.lock:
            self.text_count += texts
            self.batch_count += len(sizes)
            self.batch_sizes.update(sizes)
            self.gatherings[requests] += 1

    def snapshot(self) -> dict:
        with self.lock:
            lat = np.asarray(self.latencies_ms, dtype=float)
            pct = {f"p{q}": round(float(np.percentile(lat, q)), 3) for q in (50, 90, 99)} if len(lat) else {}
            sizes = sum(k * v for k, v in self.batch_sizes.items())
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "requests": {
                    "total": sum(self.by_status.values()),
                    **{str(k): v for k, v in sorted(self.by_status.items())},
                },
                "texts": self.text_count,
                "batches": self.batch_count,
                "mean_batch_size": round(sizes / self.batch_count, 3) if self.batch_count else 0.0,
                "max_batch_size": max(self.batch_sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "requests_per_gathering": {str(k): v for k, v in sorted(self.gatherings.items())},
                "latency_ms": {"window": len(lat), **pct},
                "queued": self.queue_depth(),
            }


class CountRequests:
    """ASGI middleware: every HTTP answer counted by its route's template and status, with its latency."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # the API's routes by template; the framework's own pages (/docs, /openapi.json) as "other"
            route = getattr(scope.get("route"), "path", None) or ("unmatched" if status[0] == 404 else "other")
            self.metrics.answered(route, status[0], time.perf_counter() - started)
