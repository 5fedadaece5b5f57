"""The `ochat` command. Each subcommand group lives next to the code it drives.

Only the module of the invoked subcommand is imported (importing torch, uvicorn and umap for every
call would add seconds to `ochat template list`); `ochat --help` imports them all to list them.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading

import click
import typer

from ochat.errors import OchatError

app = typer.Typer(help="ochat: raw chat conversations -> a served, evaluated chat model.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@app.callback()
def _root() -> None:
    # Keeps `ochat` a command group: with only one subcommand registered (see main), typer would
    # otherwise run that command directly and reject its own name ("ochat chat") as an extra argument.
    pass

# name -> (module, attribute): a typer app (group), a command function, or `lazy_app(args)` building a group
# that imports only the invoked subcommand's module (`ochat bench X`).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "template": ("ochat.templates.cli", "app"),
    "model": ("ochat.models.cli", "app"),
    "data": ("ochat.data.cli", "app"),
    "train": ("ochat.training.cli", "train"),
    "serve": ("ochat.serving.cli", "serve"),
    "chat": ("ochat.ui.cli_chat", "chat"),
    "eval": ("ochat.evaluation.cli", "app"),
    "viz": ("ochat.visualization.cli", "app"),
    "bench": ("ochat.bench", "lazy_app"),
    "quickstart": ("ochat.quickstart.cli", "quickstart"),
}


def _register(names: list[str], args: list[str]) -> None:
    for name in names:
        module, attr = SUBCOMMANDS[name]
        obj = getattr(importlib.import_module(module), attr)
        if attr == "lazy_app":
            obj = obj(args[args.index(name) + 1:] if name in args else [])
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=name)
        else:
            app.command(name)(obj)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # Ctrl-C must stop a command (or clear the chat's line) even when the parent started us with SIGINT
    # ignored, as a non-interactive shell does for background jobs: Python keeps an inherited SIG_IGN.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    first = next((a for a in args if not a.startswith("-")), None)
    _register([first] if first in SUBCOMMANDS else list(SUBCOMMANDS), args)
    try:
        result = app(args=args, prog_name="ochat", standalone_mode=False)  # typer.Exit(n) comes back as n
    except OchatError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
