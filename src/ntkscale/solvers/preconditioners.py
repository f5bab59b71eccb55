"""Preconditioners for CG on ``K + noise I``, built matrix-free.

Each preconditioner is an object with ``apply(R)`` returning ``P⁻¹ R`` for ``R`` of shape
``(n, k)`` (or ``(n,)``), and the attributes ``name``, ``rank``, ``seconds`` (build time),
``noise`` (the shift it was built for) and ``n``. Build one with :func:`build_preconditioner` and
pass it to :func:`ntkscale.solvers.solve` as ``preconditioner=`` to reuse it across solves;
``with_noise(noise)`` re-targets a built one to ``K + noise I`` without touching ``K`` again.

What each one touches on ``K``:

* ``"jacobi"``: ``K.diagonal()`` only.
* ``"pivchol"``: ``K.diagonal()`` and one dense row ``K[idx, :]`` per pivot (``rank`` rows).
* ``"nystrom"``: one batched product ``K @ Ω`` with ``rank`` columns.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from ._reduce import Reductions, reductions
from ._utils import check_noise, check_operator, make_generator, rows, shifted_matmul

__all__ = [
    "PRECONDITIONERS",
    "JacobiPreconditioner",
    "NystromPreconditioner",
    "PivotedCholeskyPreconditioner",
    "Preconditioner",
    "build_preconditioner",
]

PRECONDITIONERS = ("jacobi", "pivchol", "nystrom")
DEFAULT_RANK = 100


class Preconditioner:
    """Base class: ``apply(R)`` returns ``P⁻¹ R`` for a symmetric positive definite ``P``."""

    name: str = "preconditioner"
    rank: int | None = None
    seconds: float = 0.0
    noise: float = 0.0
    n: int = 0

    def apply(self, R: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """``P⁻¹ R``.

        Args:
            R: residuals.  # shape: (n, k) or (n,)
        """
        raise NotImplementedError

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        return self.apply(R)

    def with_noise(self, noise: float) -> Preconditioner:
        """The same preconditioner for ``K + noise I``: re-weighted, no products with ``K``.

        Equals building it afresh at ``noise`` (same sketch / pivots / diagonal).
        """
        new = copy.copy(self)
        new._set_noise(check_noise(noise))
        return new

    def _set_noise(self, noise: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        rank = "" if self.rank is None else f", rank={self.rank}"
        return f"{type(self).__name__}(n={self.n}{rank}, noise={self.noise:g}, seconds={self.seconds:.3g})"


class JacobiPreconditioner(Preconditioner):
    """``P = diag(K) + noise I`` from the exact diagonal of ``K``.

    Zero diagonal entries (only possible when ``noise == 0`` and ``K`` has a zero row) are floored
    at ``eps * max(diag K)`` so that ``P`` stays invertible. ``rank`` is ``None``.
    """

    name = "jacobi"

    def __init__(self, K, noise: float = 0.0):
        start = time.perf_counter()
        self.n = check_operator(K)
        self.noise = check_noise(noise)
        self.diag = K.diagonal().detach()  # shape: (n,)
        self._set_noise(self.noise)
        self.seconds = time.perf_counter() - start

    def _set_noise(self, noise: float) -> None:
        self.noise = noise
        d = self.diag + noise  # shape: (n,)
        floor = max(torch.finfo(d.dtype).eps * d.max().item(), torch.finfo(d.dtype).tiny)
        self.inv_diag = 1.0 / d.clamp_min(floor)  # shape: (n,)

    def apply(self, R: torch.Tensor) -> torch.Tensor:
        if R.dim() == 1:
            return self.inv_diag * R
        return self.inv_diag.unsqueeze(-1) * R


class _LowRankPreconditioner(Preconditioner):
    """``P⁻¹ = U diag(inv_eig) Uᵀ + inv_tail (I − U Uᵀ)`` with orthonormal ``U`` of shape (n, r)."""

    U: torch.Tensor  # shape: (n, r)
    inv_eig: torch.Tensor  # shape: (r,)
    inv_tail: float
    red: Reductions | None = None  # sums over the rows of a sharded K; None: plain

    def apply(self, R: torch.Tensor) -> torch.Tensor:
        vec = R.dim() == 1
        if vec:
            R = R.unsqueeze(-1)
        UtR = self.U.mT @ R if self.red is None else self.red.gram(self.U, R)  # shape: (r, k)
        out = self.inv_tail * R + self.U @ ((self.inv_eig - self.inv_tail).unsqueeze(-1) * UtR)
        return out.squeeze(-1) if vec else out


class PivotedCholeskyPreconditioner(_LowRankPreconditioner):
    """``P = L Lᵀ + s I`` with ``L`` the greedy pivoted Cholesky factor of ``K`` of rank ≤ ``rank``.

    Each step picks the largest entry of the residual diagonal ``diag(K − L Lᵀ)`` as pivot and
    fetches that one row ``K[i, :]``. It stops early when the residual trace falls below
    ``100 eps · trace(K)`` (the factor is then exact to round-off); ``rank`` is the rank reached.

    The shift is ``s = noise``. When ``noise == 0`` a small shift is used instead so that ``P`` is
    invertible: ``s = trace(K − L Lᵀ) / n`` (the mean unexplained variance, i.e. the mean of the
    eigenvalues the factor misses), floored at ``eps · trace(K) / n``.

    ``P⁻¹`` is applied through the eigendecomposition ``L Lᵀ = U Λ Uᵀ`` (from a QR of ``L``), which
    is the Woodbury identity written without its cancellation-prone subtraction.
    """

    name = "pivchol"

    def __init__(self, K, noise: float = 0.0, rank: int | None = None):
        start = time.perf_counter()
        n = self.n = check_operator(K)
        self.noise = check_noise(noise)
        max_rank = min(n, _check_rank(rank))
        d = K.diagonal().detach().clone()  # shape: (n,)
        dtype, device = d.dtype, d.device
        eps = torch.finfo(dtype).eps
        trace0 = d.clamp_min(0).sum().item()
        L = torch.zeros(n, max_rank, dtype=dtype, device=device)  # shape: (n, r)
        pivots: list[int] = []
        m = 0
        while m < max_rank:
            residual_trace = d.clamp_min(0).sum().item()
            if residual_trace <= 100 * eps * trace0:
                break
            i = int(torch.argmax(d))
            pivot = d[i].item()
            if pivot <= 100 * eps * trace0 / n:
                break
            row = rows(K, torch.tensor([i], device=device))[0]  # shape: (n,)
            col = (row - L[:, :m] @ L[i, :m]) / math.sqrt(pivot)  # shape: (n,)
            L[:, m] = col
            d -= col.square()
            pivots.append(i)
            d[pivots] = 0.0  # exactly explained; never picked again
            m += 1
        L = L[:, :m]
        self.pivots = torch.tensor(pivots, dtype=torch.long)
        self.residual_trace, self.trace = d.clamp_min(0).sum().item(), trace0
        self.rank = m
        if m > 0:
            Q, Rl = torch.linalg.qr(L)  # shape: (n, m), (m, m)
            lam, V = torch.linalg.eigh(Rl @ Rl.mT)  # L Lᵀ = (Q V) diag(lam) (Q V)ᵀ
            self.U = Q @ V  # shape: (n, m)
            self.eigvals = lam.clamp_min(0)  # shape: (m,)
        else:
            self.U = torch.zeros(n, 0, dtype=dtype, device=device)
            self.eigvals = torch.zeros(0, dtype=dtype, device=device)
        self._set_noise(self.noise)
        self.seconds = time.perf_counter() - start

    def _set_noise(self, noise: float) -> None:
        self.noise = noise
        finfo = torch.finfo(self.eigvals.dtype)
        if noise > 0:
            self.shift = noise
        else:
            self.shift = max(self.residual_trace / self.n, finfo.eps * self.trace / self.n, finfo.tiny)
        self.inv_eig = 1.0 / (self.eigvals + self.shift)  # shape: (r,)
        self.inv_tail = 1.0 / self.shift


class NystromPreconditioner(_LowRankPreconditioner):
    """Randomized Nyström preconditioner (Frangella, Tropp & Udell 2023, Algorithms 2.1 and 5.1).

    One batched product ``Y = K Ω`` with an orthonormalized Gaussian sketch ``Ω`` (n × rank,
    drawn from ``seed``) gives the rank-``r`` Nyström approximation ``K ≈ U Λ̂ Uᵀ``, computed with
    the stabilizing shift ``ν = sqrt(n) · eps · ‖Y‖_F`` (Tropp et al. 2017); if the small Cholesky
    factorization still fails in low precision, ``ν`` is raised tenfold and retried. Then

        ``P⁻¹ = (λ̂_r + μ) U (Λ̂ + μ I)⁻¹ Uᵀ + (I − U Uᵀ)``

    with ``μ = noise``. When ``noise == 0`` the choice is ``μ = λ̂_r`` (the smallest retained
    Nyström eigenvalue, the scale of the part of the spectrum the sketch missed), floored at
    ``eps · λ̂_1`` so that ``P`` stays invertible when ``K`` has rank below ``r``.
    """

    name = "nystrom"

    def __init__(self, K, noise: float = 0.0, rank: int | None = None, seed: int = 0):
        start = time.perf_counter()
        self.n = check_operator(K)
        red = self.red = reductions(K)  # rows over all ranks of a sharded K
        n = red.n
        self.noise = check_noise(noise)
        r = min(n, _check_rank(rank))
        dtype, device = K.dtype, K.device
        eps = torch.finfo(dtype).eps
        gen = make_generator(seed, device)
        Omega = red.randn(r, gen, dtype, device)  # shape: (n, r)
        Omega = red.orthonormal(Omega)
        Y = shifted_matmul(K, Omega, 0.0)  # shape: (n, r), the one product with K
        nu = math.sqrt(n) * eps * red.frobenius(Y)
        nu = max(nu, torch.finfo(dtype).tiny)
        for _ in range(6):
            Y_nu = Y + nu * Omega  # shape: (n, r)
            C = red.gram(Omega, Y_nu)  # shape: (r, r)
            chol, info = torch.linalg.cholesky_ex(0.5 * (C + C.mT))
            if int(info) == 0:
                break
            nu *= 10.0
        else:
            raise RuntimeError(
                "Nystrom preconditioner: the sketch Ωᵀ K Ω is not positive definite even with a "
                f"shift of {nu:.3g}; is K symmetric positive semi-definite?"
            )
        B = torch.linalg.solve_triangular(chol.mT, Y_nu, upper=True, left=False)  # B = Y_nu C⁻ᵀ
        U, S, _ = red.thin_svd(B)  # shape: (n, r), (r,)
        lam = (S.square() - nu).clamp_min(0)  # shape: (r,), descending
        self.U, self.eigvals, self.shift_nu, self.rank = U, lam, nu, r
        self._set_noise(self.noise)
        self.seconds = time.perf_counter() - start

    def _set_noise(self, noise: float) -> None:
        self.noise = noise
        lam = self.eigvals  # shape: (r,), descending
        lam_max, lam_r = lam[0].item(), lam[-1].item()
        finfo = torch.finfo(lam.dtype)
        self.mu = noise if noise > 0 else max(lam_r, finfo.eps * lam_max, finfo.tiny)
        self.inv_eig = (lam_r + self.mu) / (lam + self.mu)  # shape: (r,)
        self.inv_tail = 1.0


def _check_rank(rank) -> int:
    if rank is None:
        return DEFAULT_RANK
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1 (or None for {DEFAULT_RANK}), got {rank!r}")
    return rank


def build_preconditioner(
    K, name: str | None, noise: float = 0.0, rank: int | None = None, seed: int = 0
) -> Preconditioner | None:
    """Build a preconditioner for ``K + noise I`` by name.

    Args:
        K: square symmetric PSD ``LinearOperator``.  # shape: (n, n)
        name: one of ``"jacobi"``, ``"pivchol"``, ``"nystrom"``, or ``None`` (returns ``None``).
        noise: the shift ``noise ≥ 0`` of the system the preconditioner is for.
        rank: rank of ``"pivchol"`` / ``"nystrom"`` (default ``min(n, 100)``; ignored by Jacobi).
        seed: seed of the Nyström sketch.

    Returns:
        A :class:`Preconditioner` (or ``None``).

    Example:
        >>> import torch
        >>> from linear_operator.operators import DenseLinearOperator
        >>> J = torch.randn(50, 5, dtype=torch.float64)
        >>> P = build_preconditioner(DenseLinearOperator(J @ J.T), "nystrom", noise=1e-2, rank=5)
        >>> P.name, P.rank, P.apply(torch.ones(50, 2, dtype=torch.float64)).shape
        ('nystrom', 5, torch.Size([50, 2]))
    """
    if name is None:
        return None
    if not isinstance(name, str) or name not in PRECONDITIONERS:
        raise ValueError(
            f"unknown preconditioner {name!r}; expected one of {', '.join(map(repr, PRECONDITIONERS))}, "
            "None, or an object with an .apply(R) method"
        )
    if name == "jacobi":
        return JacobiPreconditioner(K, noise)
    if name == "pivchol":
        return PivotedCholeskyPreconditioner(K, noise, rank)
    return NystromPreconditioner(K, noise, rank, seed)
