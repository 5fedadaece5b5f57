"""`ochat serve`: its options are the fields of `ServeConfig` (ochat/serving/served_model.py), built by
`ochat.utils.config_cli`."""

from __future__ import annotations

import sys

from ochat.serving.served_model import ServeConfig
from ochat.utils.config_cli import typer_command


def run_server(config: ServeConfig) -> None:
    """Load the model(s), serve until SIGINT/SIGTERM (running requests get `shutdown_timeout_s` to finish);
    with `config.ray`, on Ray Serve replicas instead (ochat/serving/ray_app.py)."""
    from ochat.serving.api_server import create_app
    from ochat.serving.http_server import serve_forever, warn_if_exposed
    from ochat.serving.logs import log_to_stderr
    from ochat.serving.multi_model import check_config

    warn_if_exposed(config)
    check_config(config)
    if config.ray:
        from ochat.serving.ray_app import run_ray_server

        return run_ray_server(config)
    log_to_stderr()
    app = create_app(config)
    for served in app.state.models.served:
        print(f"ochat: serving {served.model_dir} ({served.model_type.name}, {served.engine_name} engine, "
              f"{getattr(served.engine, 'dtype', config.dtype)}) as "
              f"'{served.name}' at http://{config.host}:{config.port}/v1"
              + (" (API keys required)" if config.api_keys else ""), file=sys.stderr, flush=True)
    serve_forever(app, config)


serve = typer_command(ServeConfig, run_server, doc=ServeConfig.__doc__.split("\n")[0])
