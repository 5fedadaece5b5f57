"""The seed's module path (`deepspeed --module ochat.training_deepspeed.train ...`); see ochat/compat/training.py."""

import sys

from ochat.compat.training import build_parser, main, parse_args

__all__ = ["build_parser", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
