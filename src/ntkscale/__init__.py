"""ntkscale: the empirical neural tangent kernel as a lazy, matrix-free linear operator.

>>> import ntkscale as nks
>>> sorted(n for n in ("NTKOperator", "solve", "condition_number") if hasattr(nks, n))
['NTKOperator', 'condition_number', 'solve']
"""

from __future__ import annotations

from . import settings
from .gp import NegativeVarianceWarning, NTKGP, ggn_kernel
from .ngd import FunctionSpaceNGD, ngd_step
from .operator import NonDeterministicModelError, NTKOperator, SmallChunkWarning
from .solvers import (
    ConvergenceWarning,
    SolveInfo,
    build_preconditioner,
    condition_number,
    eigvalsh_extremes,
    lanczos,
    logdet,
    solve,
    spectral_density,
)

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "FunctionSpaceNGD",
    "NTKGP",
    "NegativeVarianceWarning",
    "ggn_kernel",
    "ngd_step",
    "settings",
    "NTKOperator",
    "NonDeterministicModelError",
    "SmallChunkWarning",
    "SolveInfo",
    "__version__",
    "build_preconditioner",
    "condition_number",
    "eigvalsh_extremes",
    "lanczos",
    "logdet",
    "solve",
    "spectral_density",
]
