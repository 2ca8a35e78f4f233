"""``GET /metrics``: the engine's figures in Prometheus' text format (prometheus-client).

Each engine has its own registry, so several engines in one process (tests, notebooks) do not
share figures. Names follow Prometheus' conventions (``_total`` counters, ``_seconds``
histograms); tokens per second is also a ready-made gauge over the last ``RATE_WINDOW`` seconds.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

RATE_WINDOW = 10.0  # seconds behind peftlab_generation_tokens_per_second
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics"]


class ServeMetrics:
    """The figures ``peftlab serve`` exports; ``queue_depth`` and ``running_rows`` are read when
    scraped."""

    def __init__(self, queue_depth: Callable[[], float], running_rows: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue = Gauge("peftlab_queue_depth", "Prompts waiting for a batch slot", registry=r)
        self.queue.set_function(queue_depth)
        self.running = Gauge("peftlab_running_rows", "Rows being decoded now", registry=r)
        self.running.set_function(running_rows)
        self.batch_size = Histogram(
            "peftlab_batch_size",
            "Rows per model batch (continuous: per decoding step; static: per generate call)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "peftlab_generation_tokens", "Tokens generated (end-of-sequence tokens included)", registry=r
        )
        self.prompt_tokens = Counter("peftlab_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.tokens_per_second = Gauge(
            "peftlab_generation_tokens_per_second",
            f"Tokens generated per second over the last {RATE_WINDOW:g} s",
            registry=r,
        )
        self.tokens_per_second.set_function(self.recent_rate)
        self.ttft = Histogram(
            "peftlab_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "peftlab_request_latency_seconds",
            "From a request's arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "peftlab_requests",
            "Requests ended, by model (adapter name or the base model's name) and outcome",
            ["model", "outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "peftlab_rejected_requests", "Requests refused with 503, by reason", ["reason"], registry=r
        )
        self._recent: deque[tuple[float, int]] = deque()

    def add_tokens(self, count: int) -> None:
        if count <= 0:
            return
        self.tokens.inc(count)
        now = time.monotonic()
        self._recent.append((now, count))
        self._forget(now)

    def recent_rate(self) -> float:
        now = time.monotonic()
        self._forget(now)
        return sum(n for _, n in self._recent) / RATE_WINDOW

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW:
            self._recent.popleft()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
