"""The `ochat` command. Each subcommand group lives next to the code it drives."""

from __future__ import annotations

import importlib
import sys

import click
import typer

from ochat.errors import OchatError

app = typer.Typer(help="ochat: raw chat conversations -> a served, evaluated chat model.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

# (name, module with a typer `app`); a group is added when its module exists.
GROUPS = [
    ("template", "ochat.templates.cli"),
    ("model", "ochat.models.cli"),
    ("data", "ochat.data.cli"),
    ("eval", "ochat.evaluation.cli"),
    ("viz", "ochat.visualization.cli"),
    ("bench", "ochat.bench"),
]
# (name, module, function): single commands
COMMANDS = [
    ("train", "ochat.training.cli", "train"),
    ("serve", "ochat.serving.cli", "serve"),
    ("chat", "ochat.ui.cli_chat", "chat"),
    ("quickstart", "ochat.quickstart.cli", "quickstart"),
]


def _register() -> None:
    for name, module in GROUPS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        app.add_typer(mod.app, name=name)
    for name, module, func in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        app.command(name, context_settings={"allow_extra_args": False})(getattr(mod, func))


_register()


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
