"""Shift-invariant Krylov objects: one Lanczos run of ``K`` serves every shift ``K + λ I``.

Krylov spaces are shift-invariant (``K`` and ``K + λ I`` generate the same ones, with ``T``
shifted by ``λ``), and the first ``r`` steps of an ``m``-step Lanczos run are the ``r``-step run.
So a single run on ``K`` gives, without further products with ``K``:

* :class:`LanczosBasis` — ``Q_m``, ``T_m`` from one start vector, and for every ``λ`` and every
  rank ``r ≤ m`` the LOVE factor ``R`` with ``R Rᵀ = Q_r (T_r + λ I)⁻¹ Q_rᵀ ≈ (K + λ I)⁻¹``
  (Pleiss et al. 2018), used for fast predictive variances;
* :class:`StochasticLogdet` — Ritz values and quadrature weights of fixed probes, and for every
  ``λ`` the stochastic Lanczos quadrature estimate of ``log det(K + λ I)`` (Ubaru, Chen & Saad
  2017), used for marginal likelihoods and evidences.

Both touch ``K`` only through batched products ``K @ V``; neither knows what ``K`` is.

Example:
    >>> import torch
    >>> from linear_operator.operators import DenseLinearOperator
    >>> A = torch.randn(50, 50, dtype=torch.float64)
    >>> K = DenseLinearOperator(A @ A.T)
    >>> basis = LanczosBasis(K, num_iter=50)
    >>> R = basis.inverse_root(0.1)
    >>> ref = torch.linalg.inv(A @ A.T + 0.1 * torch.eye(50, dtype=torch.float64))
    >>> bool(torch.allclose(R @ R.T, ref, atol=1e-8))
    True
    >>> ld = StochasticLogdet(K, num_probes=50)(0.1)
    >>> round(ld.value, 6) == round(torch.logdet(A @ A.T + 0.1 * torch.eye(50, dtype=torch.float64)).item(), 6)
    True
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ._reduce import reductions
from ._utils import check_noise, check_operator, check_positive_int, make_generator
from .lanczos import _check_num_iter, _LanczosProcess, logdet_from_nodes, quadrature_nodes

__all__ = ["LanczosBasis", "LogdetEstimate", "StochasticLogdet"]


class _Cast:
    """Products with ``K`` in ``K``'s dtype, results in ``dtype`` (a float64 Lanczos run on a
    float32 operator: the basis is orthogonalized in float64, the products stay float32)."""

    def __init__(self, K, dtype: torch.dtype):
        self.K, self.dtype, self.shape, self.device = K, dtype, K.shape, K.device

    def matmul(self, V: Tensor) -> Tensor:
        return self.K.matmul(V.to(self.K.dtype).contiguous()).detach().to(self.dtype)


class LanczosBasis:
    """``m`` Lanczos steps on ``K`` from one start vector, reusable for every shift and rank ≤ m.

    Args:
        K: square symmetric PSD ``LinearOperator``.  # shape: (n, n)
        num_iter: Lanczos steps ``m`` (capped at ``n``).
        seed: seed of the start vector (and of restarts after an exact breakdown).
        dtype: precision of the basis and of ``T`` (default float64 whatever ``K``'s dtype: a
            float32 basis loses orthogonality and its small Ritz values drown in round-off,
            which cut the usable rank of the fast variances to ~17 steps). Products with ``K``
            stay in ``K``'s dtype.

    Attributes:
        Q: orthonormal Lanczos vectors (this rank's rows for a sharded ``K``).  # shape: (n, m)
        T: the tridiagonal ``Qᵀ K Q``.  # shape: (m, m)
        steps: ``m``, the rank reached (``min(num_iter, n)``).

    For an operator sharded over ``torch.distributed`` ranks (e.g.
    :class:`ntkscale.distributed.NTKOperator`) the construction is collective: inner products go
    through :func:`ntkscale.solvers.reductions`, the start vector is this rank's rows of the one
    global draw, and ``Q`` (and every ``R``) holds this rank's rows; ``T`` is the same everywhere.

    Memory: ``n × m`` numbers of ``dtype`` (50,000 × 500 in float64: 200 MB).
    """

    def __init__(self, K, num_iter: int, seed: int = 0, dtype: torch.dtype | None = torch.float64):
        check_operator(K)
        red = reductions(K)  # sums over all rows (all ranks of a sharded K)
        n = red.n
        m = _check_num_iter(num_iter, n)
        dtype = K.dtype if dtype is None else dtype
        gen = make_generator(seed, K.device)
        v0 = red.randn(1, gen, dtype, K.device)  # this rank's rows of one global draw
        proc = _LanczosProcess(_Cast(K, dtype), v0, 0.0, gen, reorthogonalize=True, capacity=m, red=red)
        for _ in range(m):
            proc.step()
        self.T = proc.tridiagonal()[0]  # shape: (m, m)
        self.Q = proc.Q[0, : proc.m].mT  # shape: (n, m); a view of the run's buffer, no copy
        del proc
        self.steps = self.T.shape[0]
        self.seed = int(seed)
        self.n = n

    @property
    def dtype(self) -> torch.dtype:
        return self.Q.dtype

    def ritz(self, noise: float = 0.0, rank: int | None = None) -> tuple[Tensor, Tensor]:
        """Eigen-decomposition ``T_r + noise I = S diag(θ) Sᵀ``: ``(θ, S)``, ascending."""
        r = self._rank(rank)
        eye = torch.eye(r, dtype=self.T.dtype, device=self.T.device)
        return torch.linalg.eigh(self.T[:r, :r] + check_noise(noise) * eye)

    def inverse_root(self, noise: float, rank: int | None = None) -> Tensor:
        """``R`` with ``R Rᵀ = Q_r (T_r + noise I)⁻¹ Q_rᵀ ≈ (K + noise I)⁻¹``.

        Ritz values of ``T_r + noise I`` that are zero to round-off (``noise = 0`` on a singular
        ``K``) are dropped, so ``R`` may have fewer than ``r`` columns.

        Args:
            noise: the shift ``λ ≥ 0``.
            rank: ``r ≤ steps`` (default ``steps``).

        Returns:
            ``R`` in the basis' dtype.  # shape: (n, r')
        """
        r = self._rank(rank)
        theta, S = self.ritz(noise, r)
        keep = theta > theta.max().clamp_min(0) * r * torch.finfo(theta.dtype).eps
        return self.Q[:, :r] @ (S[:, keep] * theta[keep].rsqrt())

    def _rank(self, rank: int | None) -> int:
        if rank is None:
            return self.steps
        check_positive_int(rank, "rank")
        if rank > self.steps:
            raise ValueError(
                f"rank {rank} exceeds the {self.steps} Lanczos steps of this basis; build a "
                f"LanczosBasis with num_iter >= {rank}"
            )
        return rank


@dataclass
class LogdetEstimate:
    """A stochastic Lanczos quadrature estimate of ``log det(K + λ I)``.

    Attributes:
        value: the estimate.
        stderr: the probe standard error (0 with exact probes, ``nan`` with one probe). It
            measures the probe noise only, not the quadrature error of too few steps.
        exact: whether the probes were the ``n`` unit vectors (no trace estimation).
    """

    value: float
    stderr: float
    exact: bool


class StochasticLogdet:
    """Ritz nodes of fixed probes of ``K``, and ``log det(K + λ I)`` for every ``λ`` from them.

    For each probe ``z``, ``zᵀ log(K + λ I) z ≈ n Σ_j τ_j log(θ_j + λ)`` with the Ritz values
    ``θ_j`` and weights ``τ_j`` of ``num_iter`` Lanczos steps on ``K`` from ``z`` (shift
    invariance: no run per ``λ``). The nodes are computed on the first call.

    Args:
        K: square symmetric PSD ``LinearOperator``.  # shape: (n, n)
        num_probes: Rademacher probes; with ``num_probes ≥ n`` the ``n`` unit vectors are used
            and the trace is exact (then ``n`` steps make the estimate exact to round-off).
        num_iter: Lanczos steps per probe (default ``min(n, 100)``).
        seed: seed of the probes.

    Memory: the Lanczos vectors of the run, ``n × num_iter × num_probes`` numbers of ``K``'s dtype.

    On an operator sharded over ``torch.distributed`` ranks the node computation is collective
    (inner products through :func:`ntkscale.solvers.reductions`; each rank holds its rows of the
    probes) and the estimate is the same on every rank.
    """

    def __init__(self, K, num_probes: int = 30, num_iter: int | None = None, seed: int = 0):
        check_operator(K)
        self.n = reductions(K).n  # rows over all ranks of a sharded K
        check_positive_int(num_probes, "num_probes")
        self.K = K
        self.num_probes = num_probes
        self.num_iter = _check_num_iter(min(self.n, 100) if num_iter is None else num_iter, self.n)
        self.seed = int(seed)
        self.exact = num_probes >= self.n
        self._nodes: tuple[Tensor, Tensor] | None = None

    def nodes(self) -> tuple[Tensor, Tensor]:
        """``(theta, weights)`` of ``K`` (shift 0), each of shape (probes, m); computed once."""
        if self._nodes is None:
            K, n = self.K, self.n
            red = reductions(K)
            gen = make_generator(self.seed, K.device)
            if self.exact:  # this rank's rows of the n unit vectors
                Z = torch.eye(n, dtype=K.dtype, device=K.device)[red.offset : red.offset + red.n_local]
            else:
                Z = red.rademacher(self.num_probes, gen, K.dtype, K.device)
            theta, weights = quadrature_nodes(K, Z, 0.0, self.num_iter, gen, True, red)
            self._nodes = (theta.clamp_min(0), weights)
            self.K = None  # the nodes are all that is needed from now on
        return self._nodes

    def __call__(self, noise: float = 0.0) -> LogdetEstimate:
        """The estimate of ``log det(K + noise I)``."""
        theta, weights = self.nodes()
        value, stderr = logdet_from_nodes(theta + check_noise(noise), weights, self.n, self.exact)
        return LogdetEstimate(value, stderr, self.exact)

    logdet = __call__


def warn_rank(asked: int, reached: int, what: str = "fast variances") -> None:
    """Warn that a Lanczos factor has fewer columns than asked (never silent)."""
    if reached < asked:
        warnings.warn(
            f"the Lanczos factor of the {what} has rank {reached} < the {asked} asked (Ritz values "
            "zero to round-off were dropped: the kernel is singular at this shift); add noise",
            RuntimeWarning,
            stacklevel=3,
        )
