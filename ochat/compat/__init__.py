"""Seed-era entry points (the commands the OpenChat README and model cards print), as argv alias tables.

Each module maps the old flags onto the dataclass that defines today's command (`TrainArgs`,
`ServeConfig`), through `ochat.utils.config_cli`, so an old spelling cannot drift from the new option.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


def seed_main(prog: str, parse_args: Callable[[list[str] | None], tuple[Any, list[str]]],
              run: Callable[[Any], Any], argv: list[str] | None = None) -> int:
    """Run a seed-era command: parse its argv (unknown seed flags are ignored with a note), then `run`."""
    from ochat.errors import report_errors

    def command() -> None:
        config, unknown = parse_args(argv)
        if unknown:
            print(f"{prog}: ignoring unknown seed flags {unknown}", file=sys.stderr)
        run(config)

    return report_errors(command)
