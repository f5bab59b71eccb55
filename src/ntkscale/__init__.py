"""ntkscale: the empirical neural tangent kernel as a lazy, matrix-free linear operator.

>>> import ntkscale as nks
>>> sorted(n for n in ("NTKOperator", "solve", "condition_number") if hasattr(nks, n))
['NTKOperator', 'condition_number', 'solve']
"""

from __future__ import annotations

from . import distributed, kernels, metrics, models, settings
from .gp import NegativeVarianceWarning, NTKClassifierGP, NTKGP, ggn_kernel
from .jacobian import JacobianDifference, JacobianDifferenceOperator, jacobian_difference_norm
from .ngd import FunctionSpaceNGD, ngd_step
from .operator import NonDeterministicModelError, NTKOperator, ProductCount, SmallChunkWarning, count_products
from .solvers import (
    ConvergenceWarning,
    SingularKernelError,
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
    "JacobianDifference",
    "JacobianDifferenceOperator",
    "NTKClassifierGP",
    "NTKGP",
    "NegativeVarianceWarning",
    "ggn_kernel",
    "ngd_step",
    "settings",
    "NTKOperator",
    "NonDeterministicModelError",
    "ProductCount",
    "count_products",
    "SingularKernelError",
    "SmallChunkWarning",
    "SolveInfo",
    "distributed",
    "__version__",
    "build_preconditioner",
    "condition_number",
    "eigvalsh_extremes",
    "jacobian_difference_norm",
    "kernels",
    "lanczos",
    "logdet",
    "models",
    "metrics",
    "solve",
    "spectral_density",
]
