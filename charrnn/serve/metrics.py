"""The server's Prometheus metrics (GET /metrics), and the engine's meter that feeds them."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from charrnn.serve.engine import Engine
from charrnn.serve.sequence import Meter


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("charrnn_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.chars = Counter("charrnn_generated_characters", "Characters generated", ["model"], registry=r)
        self.active = Gauge("charrnn_active_streams", "Streams being decoded", ["model"], registry=r)
        self.queued = Gauge("charrnn_queued_streams", "Streams waiting for a row", ["model"], registry=r)
        self.first = Histogram("charrnn_time_to_first_character_seconds", "From a request's arrival to its first character",
                               ["model"], registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.primes = Counter("charrnn_prompts", "Prompts a request brought: read now, or their state kept from "
                              "an earlier read", ["model", "source"], registry=r)
        self.step = Histogram("charrnn_decode_step_seconds", "One decoding step of every active stream",
                              ["model"], registry=r, buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25))

    def meter(self, name: str, engine_of: Callable[[], Engine]) -> Meter:
        metrics = self
        self.active.labels(name).set_function(lambda: engine_of().active_streams)
        self.queued.labels(name).set_function(lambda: engine_of().queued_streams)

        class _Meter(Meter):
            def step(self, seconds: float, rows: int) -> None:
                metrics.step.labels(name).observe(seconds)

            def first_char(self, seconds: float) -> None:
                metrics.first.labels(name).observe(seconds)

            def chars(self, count: int) -> None:
                if count:
                    metrics.chars.labels(name).inc(count)

            def primes(self, read: int, cached: int) -> None:
                metrics.primes.labels(name, "read").inc(read)
                metrics.primes.labels(name, "cached").inc(cached)

        return _Meter()
