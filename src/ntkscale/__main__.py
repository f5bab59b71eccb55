"""``python -m ntkscale``: the same as the ``ntkscale`` command."""

import sys

from .cli import main

sys.exit(main())
