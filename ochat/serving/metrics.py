"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self, model_name: str, engine_stats: Callable[[], dict[str, int]],
                 engine_restarts: Callable[[], int] = lambda: 0):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        running = Gauge("ochat_num_requests_running", "Requests in the running batch (decoding or prefilling).",
                        labels, registry=r)
        waiting = Gauge("ochat_num_requests_waiting", "Requests waiting for a batch slot.", labels, registry=r)
        running.labels(model_name).set_function(lambda: engine_stats()["running"])
        waiting.labels(model_name).set_function(lambda: engine_stats()["waiting"])
        restarts = Gauge("ochat_engine_restarts", "Times a dead engine was replaced by a new one.", labels, registry=r)
        restarts.labels(model_name).set_function(engine_restarts)
        self.prompt_tokens = Counter("ochat_prompt_tokens", "Prompt tokens processed.", labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("ochat_generation_tokens", "Tokens generated.", labels,
                                         registry=r).labels(model_name)
        self._finished = Counter("ochat_request_success", "Finished requests by finish reason.",
                                 labels + ["finished_reason"], registry=r)
        self._errors = Counter("ochat_request_errors", "Rejected requests by HTTP status.", labels + ["status"], registry=r)
        self.ttft = Histogram("ochat_time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("ochat_e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.model_name = model_name

    def finished(self, reason: str) -> None:
        self._finished.labels(self.model_name, reason).inc()

    def error(self, status: int) -> None:
        self._errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
