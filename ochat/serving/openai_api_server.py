"""The seed-era module path `python -m ochat.serving.openai_api_server`: a thin re-export of
ochat/compat/serving.py (the alias table onto `ServeConfig`)."""

import sys

from ochat.compat.serving import build_parser, main, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
