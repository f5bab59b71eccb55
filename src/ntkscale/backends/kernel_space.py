"""Moved to :mod:`ntkscale.reductions.core`; this name is that module (old imports keep working)."""

import sys

from ..reductions import core as _module

sys.modules[__name__] = _module
