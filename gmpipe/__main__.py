"""``python -m gmpipe``: the ``gmpipe`` command."""

import sys

from gmpipe.cli import main

sys.exit(main())
