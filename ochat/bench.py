"""`ochat bench ...`: benchmarks, each living next to the code it measures (figures go to BENCHMARKS.md).

`ochat bench X` imports only X's module: the serving benchmark's uvicorn or the training one's torch
are not loaded to time the data pipeline. Each benchmark returns a result object and renders it apart.
"""

from __future__ import annotations

import importlib

import typer

# subcommand -> (module, command function)
BENCHMARKS = {
    "data": ("ochat.data.bench", "bench_data"),
    "train": ("ochat.training.bench", "bench_train"),
    "serve": ("ochat.serving.bench", "bench_serve"),
    "crlft": ("ochat.quickstart.bench", "bench_crlft"),
}


def lazy_app(args: list[str]) -> typer.Typer:
    """The `ochat bench` group with only the benchmark named in `args` (all of them for `--help`)."""
    app = typer.Typer(help="Benchmarks: ochat side by side with its peer, reported as ratios.", no_args_is_help=True)
    first = next((a for a in args if not a.startswith("-")), None)
    for name in [first] if first in BENCHMARKS else list(BENCHMARKS):
        module, func = BENCHMARKS[name]
        app.command(name)(getattr(importlib.import_module(module), func))
    return app
