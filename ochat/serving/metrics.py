"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

Every series carries a `model_name` label: with several models behind one server (`--model A:name=x
--model B:name=y`) each model has its own counters, gauges and histograms. `ServerMetrics` itself counts
for the first model (errors that happen before a request names its model land there); `metrics.model(name)`
gives any model's series."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
EngineStats = Callable[[], dict[str, int]]


class ModelMetrics:
    """The series of one model (children of the server's metric families)."""

    def __init__(self, families: dict, model_name: str, engine_stats: EngineStats,
                 engine_restarts: Callable[[], int] = lambda: 0):
        self.model_name = model_name
        families["running"].labels(model_name).set_function(lambda: engine_stats()["running"])
        families["waiting"].labels(model_name).set_function(lambda: engine_stats()["waiting"])
        families["restarts"].labels(model_name).set_function(engine_restarts)
        self.prompt_tokens = families["prompt_tokens"].labels(model_name)
        self.generation_tokens = families["generation_tokens"].labels(model_name)
        self.ttft = families["ttft"].labels(model_name)
        self.e2e = families["e2e"].labels(model_name)
        self._finished, self._errors = families["finished"], families["errors"]

    def finished(self, reason: str) -> None:
        self._finished.labels(self.model_name, reason).inc()

    def error(self, status: int) -> None:
        self._errors.labels(self.model_name, str(status)).inc()


class ServerMetrics(ModelMetrics):
    def __init__(self, model_name: str, engine_stats: EngineStats, engine_restarts: Callable[[], int] = lambda: 0):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self._families = {
            "running": Gauge("ochat_num_requests_running", "Requests in the running batch (decoding or prefilling).",
                             labels, registry=r),
            "waiting": Gauge("ochat_num_requests_waiting", "Requests waiting for a batch slot.", labels, registry=r),
            "restarts": Gauge("ochat_engine_restarts", "Times a dead engine was replaced by a new one.",
                              labels, registry=r),
            "prompt_tokens": Counter("ochat_prompt_tokens", "Prompt tokens processed.", labels, registry=r),
            "generation_tokens": Counter("ochat_generation_tokens", "Tokens generated.", labels, registry=r),
            "finished": Counter("ochat_request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r),
            "errors": Counter("ochat_request_errors", "Rejected requests by HTTP status.", labels + ["status"],
                              registry=r),
            "ttft": Histogram("ochat_time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=LATENCY_BUCKETS, registry=r),
            "e2e": Histogram("ochat_e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=LATENCY_BUCKETS, registry=r),
        }
        super().__init__(self._families, model_name, engine_stats, engine_restarts)
        self._models: dict[str, ModelMetrics] = {model_name: self}

    def add_model(self, model_name: str, engine_stats: EngineStats,
                  engine_restarts: Callable[[], int] = lambda: 0) -> ModelMetrics:
        """Series for one more model served by this server."""
        if model_name not in self._models:
            self._models[model_name] = ModelMetrics(self._families, model_name, engine_stats, engine_restarts)
        return self._models[model_name]

    def model(self, model_name: str) -> ModelMetrics:
        return self._models.get(model_name, self)

    def render(self) -> bytes:
        return generate_latest(self.registry)
