"""`ochat serve ... --ray`: the same OpenAI-compatible app, served by Ray Serve replicas.

Each replica is one Ray actor holding the whole ochat app (its engine(s), tokenizer, metrics), built by the
same code as a plain `ochat serve`. Ray Serve's HTTP proxy (one per node) spreads requests over the replicas
by load (power of two choices on each replica's ongoing requests), autoscales the replica count between the
bounds on ongoing requests per replica (queued plus running), and replaces a replica whose actor dies or
whose health check fails (here: its engine died) while the others keep answering.

Locally (no `--ray-address`) this starts a Ray instance of its own (no dashboard) and stops it on exit;
with `--ray-address HOST:PORT` it joins a running cluster (`ray start --head` on one machine, `ray start
--address HOST:PORT` on the others), so replicas land on every machine with room for them. ray is an
optional extra (`pip install 'ochat[ray]'`) and imported only here.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from ochat.errors import OchatError
from ochat.serving.served_model import ServeConfig

APP_NAME = "ochat"
REPLICA_HEADER = "x-ochat-replica"      # names the replica that answered (spread and fail-over are visible)


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise OchatError(f"--ray: Ray Serve is not installed ({e}); pip install 'ochat[ray]'") from None
    return ray, serve


def replica_options(config: ServeConfig) -> dict[str, Any]:
    """`serve.deployment` options from the CLI's replica flags (fixed count or autoscaling bounds)."""
    if config.min_replicas is not None or config.max_replicas is not None:
        if config.replicas is not None:
            raise OchatError("--replicas: give either --replicas N or --min-replicas/--max-replicas, not both")
        lo = 1 if config.min_replicas is None else config.min_replicas
        hi = max(lo, 1) if config.max_replicas is None else config.max_replicas
        if hi < max(lo, 1):
            raise OchatError(f"--max-replicas {hi}: must be at least --min-replicas {lo} (and at least 1)")
        target = config.target_ongoing_requests or config.max_num_seqs
        scaling: dict[str, Any] = {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1), "target_ongoing_requests": target,
            "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}}
    else:
        scaling = {"num_replicas": config.replicas or 1}
    actor: dict[str, Any] = {"num_cpus": config.ray_cpus_per_replica}
    placement: dict[str, Any] = {}
    if config.engine == "vllm" and config.tensor_parallel_size > 1:
        # One replica = T GPUs on one node: the replica in the first bundle, vLLM's Ray workers (it uses the
        # replica's placement group) in the others.
        tp = config.tensor_parallel_size
        bundles = [{"CPU": config.ray_cpus_per_replica, "GPU": 1}] + [{"GPU": 1}] * (tp - 1)
        placement = {"placement_group_bundles": bundles, "placement_group_strategy": "STRICT_PACK"}
    elif config.engine == "vllm":
        actor["num_gpus"] = 1
    return {**scaling, **placement, "ray_actor_options": actor,
            # One full batch per replica in flight; beyond it requests wait at the proxy's router, where
            # they count as queue length for the autoscaler and go to whichever replica frees up first.
            "max_ongoing_requests": config.max_num_seqs,
            "health_check_period_s": 2.0, "health_check_timeout_s": 30.0,
            "graceful_shutdown_timeout_s": config.shutdown_timeout_s}


class _TagReplica:
    """ASGI middleware: every response names the replica that produced it."""

    def __init__(self, app, tag: str):
        self.app, self.tag = app, tag.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.tag)]}
            await send(message)

        await self.app(scope, receive, tagged)


def _deployment(serve):
    @serve.deployment(name="OchatServer")
    @serve.ingress()
    class OchatServer:
        """One replica: the ochat app for `config` (model loading happens in `__serve_build_asgi_app__`)."""

        def __init__(self, config: ServeConfig):
            self.config = config
            self.ochat_app = None

        def __serve_build_asgi_app__(self):
            from ochat.serving.api_server import create_app

            self.ochat_app = create_app(self.config)
            tag = serve.get_replica_context().replica_id.unique_id
            return _TagReplica(self.ochat_app, tag)

        def check_health(self) -> None:
            # Raising marks the replica unhealthy: Serve stops routing to it and starts a new one.
            dead = [s.name for s in self.ochat_app.state.models.served if not s.engine.can_accept(0)]
            if dead:
                raise RuntimeError(f"engine of {', '.join(dead)} is not running")

    return OchatServer


def ray_init(ray, address: str | None) -> bool:
    """Join the cluster at `address`, or start a local Ray instance (returns True when we started it)."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", "")] + sys.path if p)}
    runtime_env = {"env_vars": env}
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise OchatError(f"--ray-address {address}: cannot join the Ray cluster: {str(e).splitlines()[0]}") from None
        return False
    # address="local": always a new instance of our own, never one a `ray start` left running here.
    ray.init(address="local", include_dashboard=False, runtime_env=runtime_env, logging_level="WARNING")
    return True


def run_ray_server(config: ServeConfig) -> None:
    """Deploy the app on Ray Serve at config.host:config.port and serve until SIGINT/SIGTERM."""
    ray, serve = _import_ray()
    options = replica_options(config)
    started_ray = ray_init(ray, config.ray_address)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        app = _deployment(serve).options(**options).bind(config)
        serve.run(app, name=APP_NAME, route_prefix="/")
        n = options.get("num_replicas")
        scale = (f"{n} replica(s)" if n != "auto" else
                 "{min_replicas}..{max_replicas} replicas (autoscaling)".format(**options["autoscaling_config"]))
        where = config.ray_address or ray.get_runtime_context().gcs_address
        print(f"ochat: serving {', '.join(config.model)} on Ray Serve ({scale}, Ray at {where}) at "
              f"http://{config.host}:{config.port}/v1", file=sys.stderr, flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        try:
            serve.delete(APP_NAME) if not started_ray else serve.shutdown()
        finally:
            ray.shutdown()
