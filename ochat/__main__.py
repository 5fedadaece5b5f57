import sys

from ochat.cli import main

sys.exit(main())
