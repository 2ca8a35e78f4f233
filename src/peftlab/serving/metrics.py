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
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics"]


class ServeMetrics:
    """The figures ``peftlab serve`` exports; ``queue_depth`` and ``running_rows`` are read when
    scraped."""

    def __init__(
        self,
        queue_depth: Callable[[], float],
        running_rows: Callable[[], float],
        loaded_adapters: Callable[[], float] | None = None,
    ) -> None:
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
        self.adapter_loads = Counter(
            "peftlab_adapter_loads",
            "Adapter folders loaded, by trigger (on_demand: a request named it; request: POST "
            "/v1/adapters) and outcome (ok, error)",
            ["trigger", "outcome"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "peftlab_adapter_load_seconds",
            "Time to load an adapter folder (the model worker waits meanwhile)",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.adapter_evictions = Counter(
            "peftlab_adapter_evictions",
            "Adapters unloaded to make room under --max-loaded-adapters (least recently used idle first)",
            registry=r,
        )
        self.loaded_adapters = Gauge("peftlab_loaded_adapters", "Adapters loaded now", registry=r)
        if loaded_adapters is not None:
            self.loaded_adapters.set_function(loaded_adapters)
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
