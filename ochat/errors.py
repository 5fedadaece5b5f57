"""One kind of user-facing error: the CLI prints it on one line and exits with code 2."""

import sys
from typing import Callable


class OchatError(Exception):
    """A problem with the user's input (file, field, flag). Never a bug in ochat."""

    exit_code = 2


def report_errors(fn: Callable[[], object]) -> int:
    """Run `fn` as a command: 0, or an OchatError printed on one line of stderr and its exit code."""
    try:
        fn()
    except OchatError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
