"""Moved to :mod:`ntkscale.reductions.keops`; this name is that module (old imports keep working)."""

import sys

from ..reductions import keops as _module

sys.modules[__name__] = _module
