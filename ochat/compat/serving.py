"""The seed's serving command, kept working on top of `ochat serve`:

    python -m ochat.serving.openai_api_server --model_type openchat_3.5 --model_path DIR [--port 18888]

Every `ServeConfig` field is accepted as `--field_name` and `--field-name`; SEED_ALIASES adds the seed's
other spellings (flags the seed had and ochat dropped are accepted and ignored with a note)."""

from __future__ import annotations

import argparse
import sys

from ochat.compat import seed_main
from ochat.serving.served_model import ServeConfig
from ochat.utils.config_cli import argparse_parser, from_namespace

PROG = "python -m ochat.serving.openai_api_server"
SEED_ALIASES = {"--model_path": "model", "--model-path": "model", "--allowed_origins": "cors_origins",
                "--allowed-origins": "cors_origins"}


def build_parser() -> argparse.ArgumentParser:
    return argparse_parser(ServeConfig, SEED_ALIASES, prog=PROG,
                           description="Seed-era flags for `ochat serve` (see `ochat serve --help`).")


def parse_args(argv: list[str] | None = None) -> tuple[ServeConfig, list[str]]:
    ns, unknown = build_parser().parse_known_args(argv)
    return from_namespace(ServeConfig, ns), unknown


def main(argv: list[str] | None = None) -> int:
    from ochat.serving.cli import run_server

    return seed_main(PROG, parse_args, run_server, argv)


if __name__ == "__main__":
    sys.exit(main())
