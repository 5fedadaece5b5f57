"""`ochat bench ...`: benchmarks, each living next to the code it measures (figures go to BENCHMARKS.md)."""

from __future__ import annotations

import typer

from ochat.cli import import_if_present

app = typer.Typer(help="Benchmarks: ochat side by side with its peer, reported as ratios.", no_args_is_help=True)

# (subcommand, module, function); a benchmark is listed once its module exists.
BENCHMARKS = [
    ("data", "ochat.data.bench", "bench_data"),
    ("train", "ochat.training.bench", "bench_train"),
    ("serve", "ochat.serving.bench", "bench_serve"),
    ("crlft", "ochat.quickstart.bench", "bench_crlft"),
]

for _name, _module, _func in BENCHMARKS:
    _mod = import_if_present(_module)
    if _mod is not None:
        app.command(_name)(getattr(_mod, _func))
