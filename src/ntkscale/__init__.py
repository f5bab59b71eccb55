"""ntkscale: the empirical neural tangent kernel as a lazy, matrix-free linear operator."""

from __future__ import annotations

from .operator import NonDeterministicModelError, NTKOperator

__version__ = "0.1.0"

__all__ = ["NTKOperator", "NonDeterministicModelError", "__version__"]
