"""ochat.utils.config_cli: typer and argparse options built from one dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import typer
from typer.testing import CliRunner

from ochat.errors import OchatError
from ochat.utils.config_cli import accepted_flags, arg, argparse_parser, cli_fields, from_namespace, typer_command


def parse_ratio(value: str) -> float | str:
    if value == "auto":
        return "auto"
    return float(value)


@dataclass
class Toy:
    """A toy command."""

    model: Path = arg(help="Model directory")
    keys: list[str] = arg(default_factory=list, help="Keys", split=",")
    ports: list[int] = arg(default_factory=lambda: [1, 2], help="Ports")
    limit: int | None = arg(None, min=1, help="Limit")
    engine: Literal["auto", "vllm", "transformers"] = arg("auto", help="Engine")
    ratio: float | str = arg(0.5, parser=parse_ratio, help="A ratio or auto")
    verbose: bool = arg(False, help="Talk")
    colour: bool = arg(True, help="Colour")
    documented: str = "x"
    """Help from the attribute docstring."""
    internal: int = dataclasses.field(default=0, metadata={"cli": False})


def run_typer(argv: list[str]):
    got = []
    app = typer.Typer()
    app.command("toy")(typer_command(Toy, got.append))
    app.command("other")(lambda: None)  # two commands: typer keeps the command name
    result = CliRunner().invoke(app, ["toy", *argv])
    return result, (got[0] if got else None)


def test_typer_options_are_the_fields():
    result, toy = run_typer(["--model", "m", "--keys", "a,b", "--keys", "c", "--ports", "7", "--limit", "3",
                             "--engine", "vllm", "--ratio", "auto", "--verbose", "--no-colour"])
    assert result.exit_code == 0, result.output
    assert toy == Toy(model=Path("m"), keys=["a", "b", "c"], ports=[7], limit=3, engine="vllm", ratio="auto",
                      verbose=True, colour=False)
    result, toy = run_typer(["--model", "m"])
    assert toy == Toy(model=Path("m")) and toy.ports == [1, 2] and toy.ratio == 0.5
    help_text = run_typer(["--help"])[0].output
    for name in ("--model", "--keys", "--limit", "--engine", "--ratio", "--no-colour", "--documented"):
        assert name in help_text
    assert "attribute docstring" in help_text and "--internal" not in help_text
    assert run_typer(["--model", "m", "--engine", "nope"])[0].exit_code == 2
    assert run_typer(["--model", "m", "--limit", "0"])[0].exit_code == 2
    assert run_typer([])[0].exit_code == 2  # --model is required


def test_argparse_takes_both_spellings_and_the_aliases():
    p = argparse_parser(Toy, {"--model_path": "model"})
    flags = accepted_flags(p)
    for f in cli_fields(Toy):
        assert flags["--" + f.name] == flags[f.flag] == f.name
    assert flags["--model_path"] == "model" and "--internal" not in flags
    toy = from_namespace(Toy, p.parse_args(["--model_path", "m", "--keys", "a,b", "c", "--ratio", "0.25",
                                            "--no-colour", "--limit", "4", "--ports", "9"]))
    assert toy == Toy(model=Path("m"), keys=["a", "b", "c"], ratio=0.25, colour=False, limit=4, ports=[9])
    assert from_namespace(Toy, p.parse_args(["--model", "m"])) == Toy(model=Path("m"))
    with pytest.raises(OchatError, match="--limit 0"):
        from_namespace(Toy, p.parse_args(["--model", "m", "--limit", "0"]))
    with pytest.raises(ValueError, match="no field"):
        argparse_parser(Toy, {"--old": "gone"})
