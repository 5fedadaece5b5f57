"""Run the real server (uvicorn) in a background thread of this process (the transformers engine runs in
a child process that `stop()` shuts down; see ochat/serving/engine/process_engine.py).

Used by `ochat chat --model DIR`, `ochat eval answers|fewshot --model DIR`, the quickstart and the tests:

    with start_server("path/to/model") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY")

`endpoint` is the one place that makes the "`--model DIR` (served here) or `--api-base URL`" choice.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ochat.errors import OchatError


class ServerHandle:
    def __init__(self, server, thread: threading.Thread, host: str, port: int, model_name: str, app):
        self.server, self.thread, self.app = server, thread, app
        self.host, self.port, self.model_name = host, port, model_name
        self.root_url = f"http://{host}:{port}"
        self.base_url = f"{self.root_url}/v1"

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let running requests finish (up to the graceful timeout), stop the engine."""
        self.server.should_exit = True
        self.thread.join(timeout=timeout)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(model: str | list[str], host: str = "127.0.0.1", port: int = 0, **serve_options: Any) -> ServerHandle:
    """Load `model` (a model directory, or several `DIR:name=NAME`) and serve it; port 0 picks a free port.
    Options are the fields of `ServeConfig` (model_type, api_keys, max_num_seqs, ...). Returns once the
    server accepts requests."""
    import uvicorn  # with torch and the engine: only when a model is served here

    from ochat.serving.api_server import create_app
    from ochat.serving.http_server import bind_socket, uvicorn_config
    from ochat.serving.served_model import ServeConfig

    serve_options.setdefault("disable_log_stats", True)
    models = [str(m) for m in model] if isinstance(model, (list, tuple)) else [str(model)]
    config = ServeConfig(model=models, host=host, port=port, **serve_options)
    app = create_app(config)
    try:
        sock = bind_socket(host, port)
    except OSError as e:
        for served in app.state.models.served:
            served.engine.shutdown()
        raise OchatError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"ochat-server-{bound_port}",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise OchatError(f"the server on {host}:{bound_port} did not start")
        time.sleep(0.02)
    return ServerHandle(server, thread, host, bound_port, app.state.served.name, app)


@contextlib.contextmanager
def endpoint(model_dir: str | None, api_base: str | None, model_name: str | None, name_required: bool = True,
             **serve_options: Any) -> Iterator[tuple[str, str | None]]:
    """(base_url, model name): an in-process `ochat serve` for a local model, or the given endpoint
    (whose model name may be left to the caller when not `name_required`)."""
    if model_dir and api_base:
        raise OchatError("give either --model DIR (served in-process) or --api-base URL, not both")
    if api_base:
        if not model_name and name_required:
            raise OchatError("--api-base needs --model-name (the model name the endpoint serves)")
        yield api_base.rstrip("/"), model_name
        return
    if not model_dir:
        raise OchatError("give --model DIR (a local model) or --api-base URL --model-name NAME")
    if not Path(model_dir).expanduser().is_dir():
        raise OchatError(f"--model {model_dir}: not a directory (for a served model use --api-base URL)")
    with start_server(str(Path(model_dir).expanduser()), port=0, **serve_options) as server:
        yield server.base_url, server.model_name
