"""Matrix-free iterative solvers for symmetric PSD ``linear_operator.LinearOperator`` s.

Everything here uses only ``K @ V`` (batched over columns), ``K.diagonal()``, a few rows
``K[idx, :]`` and ``K.shape`` / ``K.dtype`` / ``K.device``; nothing forms ``K`` densely.

* :func:`solve` — batched preconditioned CG on ``K + noise I`` with :class:`SolveInfo`.
* :class:`TiledCholesky` — a direct factor of ``K + noise I`` from explicit blocks, out of core
  past a memory budget, for systems with thousands of right-hand sides.
* :func:`build_preconditioner` — ``"jacobi"``, ``"pivchol"``, ``"nystrom"``, reusable across solves.
* :func:`lanczos`, :func:`eigvalsh_extremes`, :func:`condition_number` — Lanczos spectra.
* :func:`logdet`, :func:`spectral_density` — stochastic Lanczos quadrature.
* :func:`reductions` — inner products and norms over rows, summed over ranks for a sharded ``K``.
* :class:`LanczosBasis`, :class:`StochasticLogdet` — one Lanczos run reused for every shift
  ``K + λ I`` (and every rank up to the computed one): LOVE factors and SLQ log-determinants.
* :mod:`settings` — ``max_cg_iterations`` / ``cg_tolerance`` context managers for defaults.
"""

from . import settings
from ._reduce import Reductions, reductions
from .cg import ConvergenceWarning, SingularKernelError, SolveInfo, solve
from .cholesky import CholeskyInfo, NotPositiveDefiniteError, TiledCholesky, cholesky_bytes
from .krylov import LanczosBasis, LogdetEstimate, StochasticLogdet
from .lanczos import EigvalshResult, condition_number, eigvalsh_extremes, lanczos, logdet, spectral_density
from .preconditioners import (
    PRECONDITIONERS,
    JacobiPreconditioner,
    NystromPreconditioner,
    PivotedCholeskyPreconditioner,
    Preconditioner,
    build_preconditioner,
)

__all__ = [
    "PRECONDITIONERS",
    "CholeskyInfo",
    "ConvergenceWarning",
    "EigvalshResult",
    "JacobiPreconditioner",
    "LanczosBasis",
    "LogdetEstimate",
    "NotPositiveDefiniteError",
    "NystromPreconditioner",
    "PivotedCholeskyPreconditioner",
    "Preconditioner",
    "Reductions",
    "SingularKernelError",
    "SolveInfo",
    "StochasticLogdet",
    "TiledCholesky",
    "build_preconditioner",
    "cholesky_bytes",
    "condition_number",
    "eigvalsh_extremes",
    "lanczos",
    "logdet",
    "reductions",
    "settings",
    "solve",
    "spectral_density",
]
