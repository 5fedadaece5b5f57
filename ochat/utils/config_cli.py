"""Command-line options built from a dataclass, so the dataclass is the one place an option is defined.

    @dataclass
    class ServeConfig:
        model: str = arg(help="Model directory")                      # required: no default
        port: int = arg(18888, help="Port", min=1, max=65535)
        api_keys: list[str] = arg(default_factory=list, help="Accepted keys", split=",")
        engine: Literal["auto", "vllm"] = arg("auto", help="Engine")  # choices
        lr: float | str = arg(2e-5, help="...", parser=parse_lr)      # any type: a parser from str
        verbose: bool = arg(False, help="...")                        # --verbose/--no-verbose

    serve = typer_command(ServeConfig, run_server)            # a function typer registers as a command
    parser = argparse_parser(ServeConfig, {"--model_path": "model"})    # seed-era argv
    config = from_namespace(ServeConfig, parser.parse_args(argv))

Each field becomes `--field-name` (typer, argparse) and also `--field_name` (argparse only, the seed-era
spelling). Types: `str`, `int`, `float`, `Path`, `X | None` (default None), `list[X]` (repeat the flag;
with `split=","` also comma-separated; argparse takes `nargs="*"` as vLLM/the seed did), `Literal[...]`
(choices), `bool` (`--flag/--no-flag`; a `flag="--name"` metadata makes it a plain switch), anything else
with `parser=` (a function str -> value that raises `OchatError` or `ValueError` on bad input).
Field metadata keys (all optional, set through `arg(...)` or `field(metadata=...)`): `help`, `min`,
`max`, `parser`, `split`, `names` (extra spellings for typer), `flag` (a typer flag declaration such
as "--progress/--no-progress"), `metavar`, `hidden`, `panel` (rich help panel), `cli=False` (not an
option: Python callers only). Without a `help`, the field's attribute docstring (a string literal on the
line after the field) is used.

typer reads a command's options from `inspect.signature`, so `typer_command` returns a function whose
`__signature__` lists one keyword parameter per field, each defaulting to a `typer.Option(...)`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

from ochat.errors import OchatError

T = TypeVar("T")
META_KEYS = {"help", "min", "max", "parser", "split", "names", "flag", "metavar", "hidden", "panel", "cli"}


def arg(default: Any = dataclasses.MISSING, *, help: str = "", default_factory: Any = dataclasses.MISSING,
        **cli: Any) -> Any:
    """A dataclass field with its command-line metadata (see the module docstring for the keys)."""
    unknown = set(cli) - META_KEYS
    if unknown:
        raise TypeError(f"arg(): unknown option metadata {sorted(unknown)}")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **cli})


@dataclasses.dataclass
class CliField:
    """One dataclass field as an option: its name, resolved type and metadata."""

    name: str
    type: Any
    default: Any                    # dataclasses.MISSING when required
    meta: dict

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def base(self) -> Any:
        """The type without `| None`."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        if _is_union(self.type) and len(args) == 1:
            return args[0]
        return self.type

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.base) is list

    @property
    def is_bool(self) -> bool:
        return self.base is bool

    @property
    def choices(self) -> tuple | None:
        return typing.get_args(self.base) if typing.get_origin(self.base) is Literal else None

    @property
    def help(self) -> str:
        return self.meta.get("help", "")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """{field: docstring} for fields followed by a string literal (the attribute-docstring convention)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


@functools.cache
def cli_fields(cls: type) -> tuple[CliField, ...]:
    """The dataclass's fields that are command-line options, in definition order."""
    hints = typing.get_type_hints(cls)
    docs = _attribute_docstrings(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli", True) is False:
            continue
        default = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        meta = dict(f.metadata)
        meta.setdefault("help", docs.get(f.name, ""))
        out.append(CliField(f.name, hints[f.name], default, meta))
    return tuple(out)


def convert(f: CliField, value: Any) -> Any:
    """A parsed option value as the field's type (split lists, run the field's parser)."""
    if f.is_list and not value:      # not given: the field's default (a fresh copy)
        return list(f.default or [])
    if value is None:
        return None if f.required else f.default
    if f.is_list:
        items = list(value)
        if f.meta.get("split"):
            items = [v.strip() for item in items for v in str(item).split(f.meta["split"]) if v.strip()]
        return [f.meta["parser"](v) for v in items] if "parser" in f.meta else items
    if "parser" in f.meta and isinstance(value, str):
        try:
            return f.meta["parser"](value)
        except ValueError as e:
            raise OchatError(f"{f.flag} {value}: {e}") from None
    if f.base is Path and not isinstance(value, Path):
        value = Path(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in f.meta and value < f.meta["min"] or "max" in f.meta and value > f.meta["max"]:
            bounds = f"{f.meta.get('min', '-inf')}..{f.meta.get('max', 'inf')}"
            raise OchatError(f"{f.flag} {value}: expected a value in {bounds}")
    return value


def from_mapping(cls: type[T], values: dict[str, Any]) -> T:
    """Build `cls` from {field: parsed option value}; fields absent from `values` keep their defaults."""
    kwargs = {f.name: convert(f, values[f.name]) for f in cli_fields(cls) if f.name in values}
    return cls(**kwargs)


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    return from_mapping(cls, {k: v for k, v in vars(ns).items() if k in {f.name for f in cli_fields(cls)}})


# ---------------------------------------------------------------------------------------------- typer

def _typer_annotation(f: CliField) -> Any:
    if "parser" in f.meta and not f.is_list:
        return str if f.required else str | None
    if f.is_list:
        item = typing.get_args(f.base)[0]
        return list[str] if "parser" in f.meta or f.meta.get("split") else list[item]
    return f.type


def _typer_option(f: CliField) -> Any:
    import typer

    if "flag" in f.meta:
        names: tuple[str, ...] = (f.meta["flag"],)
    elif f.is_bool:
        names = (f"{f.flag}/--no-{f.flag[2:]}",)
    else:
        names = (f.flag, *f.meta.get("names", ()))
    if f.required:
        default = ...
    elif f.is_list or "parser" in f.meta:
        default = None if f.is_list else (None if f.default is None else str(f.default))
    else:
        default = f.default
    kw = {k: f.meta[k] for k in ("min", "max", "metavar", "hidden") if k in f.meta}
    if "panel" in f.meta:
        kw["rich_help_panel"] = f.meta["panel"]
    if f.is_list and not f.required and f.default:
        kw["show_default"] = ",".join(map(str, f.default))
    return typer.Option(default, *names, help=f.help or None, **kw)


def typer_command(cls: type[T], run: Callable[[T], Any], doc: str | None = None,
                  exclude: tuple[str, ...] = ()) -> Callable[..., Any]:
    """A function with one typer option per field of `cls`; called by typer, it runs `run(cls(...))`."""
    fields = [f for f in cli_fields(cls) if f.name not in exclude]

    def command(**values: Any) -> Any:
        return run(from_mapping(cls, values))

    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_typer_option(f),
                                annotation=_typer_annotation(f)) for f in fields]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc if doc is not None else (run.__doc__ or cls.__doc__)
    command.__name__ = getattr(run, "__name__", "command")
    return command


# ------------------------------------------------------------------------------------------- argparse

def argparse_parser(cls: type, aliases: dict[str, str] | None = None, prog: str | None = None,
                    description: str | None = None, exclude: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """An argparse parser taking every field of `cls` as `--field-name` and `--field_name`, plus the old
    spellings in `aliases` ({"--old_flag": "field_name"}). Parsed values go through `from_namespace`."""
    aliases = aliases or {}
    names = {f.name for f in cli_fields(cls)}
    unknown = {old: new for old, new in aliases.items() if new not in names}
    if unknown:
        raise ValueError(f"alias table names no field of {cls.__name__}: {unknown}")
    p = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    for f in cli_fields(cls):
        if f.name in exclude:
            continue
        flags = list(dict.fromkeys([f.flag, "--" + f.name, *[o for o, n in aliases.items() if n == f.name]]))
        p.add_argument(*flags, dest=f.name, help=f.help or None, **_argparse_kwargs(f))
    return p


def _argparse_kwargs(f: CliField) -> dict[str, Any]:
    if f.is_bool:
        return {"action": argparse.BooleanOptionalAction, "default": f.default}
    kw: dict[str, Any] = {"required": f.required} if f.required else {"default": None if f.is_list else f.default}
    if f.is_list:
        kw.update(nargs="*", action="extend")
        item = typing.get_args(f.base)[0]
        if "parser" not in f.meta and not f.meta.get("split") and item in (int, float, Path):
            kw["type"] = item
    elif f.choices is not None:
        kw["choices"] = f.choices
    elif "parser" not in f.meta and f.base in (int, float, Path):
        kw["type"] = f.base
    return kw


def accepted_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{option string: dest} of a parser (for tests that hold a shim to its dataclass)."""
    return {s: a.dest for a in parser._actions for s in a.option_strings if a.dest != "help"}
