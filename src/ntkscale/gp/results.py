"""What the GP layer returns and records: dataclasses with named fields.

Each also answers ``result["field"]`` (read-only), so code written against the earlier dict
results keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from torch import Tensor

__all__ = ["EvidenceInfo", "FitInfo", "Hyperparameters", "PredictInfo", "VarianceError"]


class _Fields:
    def __getitem__(self, name: str):
        if name not in {f.name for f in fields(self)}:
            raise KeyError(name)
        return getattr(self, name)

    def keys(self):
        return [f.name for f in fields(self)]


@dataclass
class PredictInfo(_Fields):
    """What a prediction did.

    Attributes:
        mode: ``"exact"``, ``"fast"`` or ``"sample"``; ``None`` when only the mean was computed.
        seconds: wall time per stage (``"mean"``, ``"diag"``, ``"lanczos"``, ``"variance"``,
            ``"factor"``, ``"prior_samples"``, ``"solve"``, ``"update"``).
        solve_iterations: PCG iterations of each block of right-hand sides (exact and sample).
        converged: whether every PCG solve reached ``tol`` (``True`` when none ran).
        max_residual: the largest final relative residual over the blocks.
        clamped: how many variances were negative and clamped at 0.
        most_negative: the most negative variance before clamping (0.0 if none).
        fast_rank: the rank of the fast variances' Lanczos factor actually used (fast mode).
        fast_rank_requested: the rank asked for (fast mode).
        solver: how the exact variances were computed: ``"cg"`` or ``"cholesky"``.
        factor: the :class:`ntkscale.solvers.CholeskyInfo` of the factor used (``"cholesky"``).
        num_samples: posterior samples drawn (sample mode).
        variance_relative_error: the relative standard error ``√(2/S)`` of variances estimated
            from ``S`` samples (sample mode).
        preconditioner_rank: the rank of the training solves' low-rank preconditioner (for an
            adaptive Nyström one, the rank it chose); ``None`` for none or Jacobi.
    """

    mode: str | None
    seconds: dict = field(default_factory=dict)
    solve_iterations: list = field(default_factory=list)
    converged: bool = True
    max_residual: float = 0.0
    clamped: int = 0
    most_negative: float = 0.0
    fast_rank: int | None = None
    fast_rank_requested: int | None = None
    solver: str | None = None
    factor: object | None = None
    num_samples: int | None = None
    variance_relative_error: float | None = None
    preconditioner_rank: int | None = None


@dataclass
class VarianceError(_Fields):
    """Fast against exact variances on the same test points.

    Attributes:
        median_relative_error: median of ``|fast − exact| / exact`` over entries with ``exact > 0``.
        max_relative_error: its maximum.
        fast_rank: the rank of the Lanczos factor used.
        fast: the fast variances.  # shape: (M, C)
        exact: the exact variances.  # shape: (M, C)
    """

    median_relative_error: float
    max_relative_error: float
    fast_rank: int
    fast: Tensor
    exact: Tensor


@dataclass
class EvidenceInfo(_Fields):
    """The terms of a log marginal likelihood (evidence).

    ``kind="gp"``: ``value = −½ quadratic − ½ logdet − (n/2) log 2π`` with ``quadratic =
    rᵀ(s²K + σ²I)⁻¹r`` and ``logdet = log det(s²K + σ²I)``.

    ``kind="laplace"``: ``value = log_likelihood − ½ (log_det_ratio + scatter)`` with
    ``log_likelihood = log N(r; 0, σ² I)``, ``log_det_ratio = log det(I + (s²/σ²) K)`` and
    ``scatter = ‖θ*‖² / s²``.

    Attributes:
        kind: ``"gp"`` or ``"laplace"``.
        value: the log marginal likelihood.
        noise, prior_scale: the hyperparameters it was evaluated at.
        logdet: ``log det(s²K + σ²I)`` (gp) or ``log det(I + (s²/σ²)K)`` (laplace).
        logdet_stderr: the SLQ probe standard error of ``logdet`` (0 with exact probes).
        quadratic: ``rᵀ(s²K + σ²I)⁻¹r`` (gp; ``None`` for laplace).
        log_likelihood: ``log N(r; 0, σ²I)`` (laplace; ``None`` for gp).
        log_det_ratio: equal to ``logdet`` (laplace; ``None`` for gp).
        scatter: ``‖θ*‖² / s²`` (laplace; ``None`` for gp).
    """

    kind: str
    value: float
    noise: float
    prior_scale: float
    logdet: float
    logdet_stderr: float
    quadratic: float | None = None
    log_likelihood: float | None = None
    log_det_ratio: float | None = None
    scatter: float | None = None


@dataclass
class Hyperparameters(_Fields):
    """A point of a hyperparameter search: ``noise`` σ², ``prior_scale`` s² and ``lml`` there."""

    noise: float
    prior_scale: float
    lml: float


@dataclass
class FitInfo(_Fields):
    """What a hyperparameter fit did.

    Attributes:
        kind: the evidence maximized, ``"laplace"`` or ``"gp"``.
        initial: the starting point.
        result: the result (never below the start: if nothing better is found, the start).
        evaluations: every ``(noise, prior_scale, lml)`` evaluated.
        optimized: which of ``"noise"``, ``"prior_scale"`` were fitted.
        seconds: wall time.
        on_boundary: the hyperparameters whose optimum lies on the edge of the search range
            (a warning was raised for them); empty when the optimum is inside.
        search_range: per fitted quantity, the ``(lo, hi)`` searched (``"ridge"`` for the gp kind).
    """

    kind: str
    initial: Hyperparameters
    result: Hyperparameters
    evaluations: list
    optimized: list
    seconds: float
    on_boundary: list = field(default_factory=list)
    search_range: dict = field(default_factory=dict)
