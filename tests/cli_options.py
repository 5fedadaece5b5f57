"""A command's options against the dataclass they are generated from (ochat.utils.config_cli)."""

from __future__ import annotations

import typer

from ochat.utils.config_cli import accepted_flags, cli_fields


def assert_options_are_the_fields(command_fn, config_cls) -> None:
    """The typer command built from `config_cls` has one option per field: its flag, required-ness, help."""
    app = typer.Typer()
    app.command("cmd")(command_fn)
    app.command("other")(lambda: None)
    command = typer.main.get_command(app).commands["cmd"]
    options = {p.name: p for p in command.params if p.param_type_name == "option" and p.name != "help"}
    fields = {f.name: f for f in cli_fields(config_cls)}
    assert options.keys() == fields.keys()
    for name, f in fields.items():
        assert f.flag in options[name].opts and options[name].required == f.required
        assert f.help and options[name].help == f.help


def assert_shim_accepts_the_fields(parser, config_cls, aliases: dict[str, str], shim_only: frozenset = frozenset()) -> None:
    """A seed-era argparse shim takes both spellings of every field, its old aliases, and nothing else
    (but for `shim_only`, flags the seed had that are no field)."""
    flags = accepted_flags(parser)
    names = {f.name for f in cli_fields(config_cls)}
    for name in names:
        assert flags["--" + name] == name and flags["--" + name.replace("_", "-")] == name
    for old, name in aliases.items():
        assert flags[old] == name
    assert set(flags.values()) == names | set(shim_only)
