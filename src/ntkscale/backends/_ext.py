"""Moved to :mod:`ntkscale.reductions.compiled`; this name is that module (old imports keep working)."""

import sys

from ..reductions import compiled as _module

sys.modules[__name__] = _module
