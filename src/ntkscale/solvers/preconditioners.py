"""Preconditioners for CG on ``K + noise I``, built matrix-free.

Each preconditioner is an object with ``apply(R)`` returning ``P⁻¹ R`` for ``R`` of shape
``(n, k)`` (or ``(n,)``), and the attributes ``name``, ``rank``, ``seconds`` (build time),
``noise`` (the shift it was built for) and ``n``. Build one with :func:`build_preconditioner` and
pass it to :func:`ntkscale.solvers.solve` as ``preconditioner=`` to reuse it across solves;
``with_noise(noise)`` re-targets a built one to ``K + noise I`` without touching ``K`` again.

What each one touches on ``K``:

* ``"jacobi"``: ``K.diagonal()`` only.
* ``"pivchol"``: ``K.diagonal()`` and one dense row ``K[idx, :]`` per pivot (``rank`` rows).
* ``"nystrom"``: one batched product ``K @ Ω`` with ``rank`` columns; with ``rank=None`` and
  ``noise > 0`` the rank is chosen adaptively, one batched product per doubling of the sketch
  (each column of ``Ω`` is multiplied by ``K`` once).
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
ADAPTIVE_START_RANK = 32  # the first sketch of the adaptive Nyström preconditioner
ADAPTIVE_MAX_RANK = 1000  # its default cap (the sketch holds about 3 n × rank numbers)
ADAPTIVE_TAIL_FACTOR = 10.0  # stop once the estimated tail eigenvalue is ≤ this × noise


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

    A batched product ``Y = K Ω`` with an orthonormalized Gaussian sketch ``Ω`` (n × rank, drawn
    from ``seed``) gives the rank-``r`` Nyström approximation ``K ≈ U Λ̂ Uᵀ``, computed with the
    stabilizing shift ``ν = sqrt(n) · eps · ‖Y‖_F`` (Tropp et al. 2017); if the small Cholesky
    factorization still fails in low precision, ``ν`` is raised tenfold and retried. Then

        ``P⁻¹ = (λ̂_r + μ) U (Λ̂ + μ I)⁻¹ Uᵀ + (I − U Uᵀ)``

    with ``μ = noise``. When ``noise == 0`` the choice is ``μ = λ̂_r`` (the smallest retained
    Nyström eigenvalue, the scale of the part of the spectrum the sketch missed), floored at
    ``eps · λ̂_1`` so that ``P`` stays invertible when ``K`` has rank below ``r``.

    **Adaptive rank** (``rank=None`` and ``noise > 0``): the sketch starts at
    ``ADAPTIVE_START_RANK`` (32) columns and doubles; each stage multiplies only its new columns
    by ``K`` (orthogonalized against the earlier ones, so ``[Ω_old, Ω_new]`` stays orthonormal and
    the earlier products are reused as they are) and recomputes the Nyström eigenvalues from the
    small ``r × r`` Gram matrices in float64. Growth stops at the first of:

    * the estimated tail eigenvalue ``λ̂_r`` is at most ``ADAPTIVE_TAIL_FACTOR · noise`` (10 ×):
      the preconditioned system then has condition number about ``1 + λ̂_r / noise ≤ 11``;
    * the cost cap ``r ≥ ⌈½ sqrt(1 + λ̂_1 / noise)⌉``: plain CG needs on the order of
      ``sqrt(κ)`` iterations for ``κ = (λ_1 + noise) / noise``, so the sketch never spends more
      column products than about half of what plain CG would (a stage is cut to end there);
    * ``max_rank`` (default ``min(n, 1000)``).

    ``rank`` is then the sketch size reached and ``stages`` the sizes after each stage. With
    ``noise == 0`` there is no noise to aim at, and the fixed default rank 100 is used.
    ``with_noise`` re-weights the built sketch; it does not re-choose the rank.

    Args:
        K: square symmetric PSD operator.  # shape: (n, n)
        noise: the shift ``noise ≥ 0`` of the system ``K + noise I``.
        rank: sketch size; ``None`` chooses it adaptively (see above).
        seed: seed of the Gaussian sketch.
        max_rank: cap of the adaptive rank (default ``min(n, ADAPTIVE_MAX_RANK)``).
    """

    name = "nystrom"

    def __init__(
        self, K, noise: float = 0.0, rank: int | None = None, seed: int = 0, max_rank: int | None = None
    ):
        start = time.perf_counter()
        self.n = check_operator(K)
        red = self.red = reductions(K)  # rows over all ranks of a sharded K
        n = red.n
        self.noise = check_noise(noise)
        gen = make_generator(seed, K.device)
        self.adaptive = rank is None and self.noise > 0
        if self.adaptive:
            cap = min(n, ADAPTIVE_MAX_RANK if max_rank is None else _check_rank(max_rank))
            self._build_adaptive(K, n, cap, gen)
        else:
            self._build_fixed(K, n, min(n, _check_rank(rank)), gen)
        self._set_noise(self.noise)
        self.seconds = time.perf_counter() - start

    def _build_fixed(self, K, n: int, r: int, gen: torch.Generator) -> None:
        red = self.red
        dtype, device = K.dtype, K.device
        eps = torch.finfo(dtype).eps
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
            raise RuntimeError(_NOT_PSD.format(nu=nu))
        B = torch.linalg.solve_triangular(chol.mT, Y_nu, upper=True, left=False)  # B = Y_nu C⁻ᵀ
        U, S, _ = red.thin_svd(B)  # shape: (n, r), (r,)
        lam = (S.square() - nu).clamp_min(0)  # shape: (r,), descending
        self.U, self.eigvals, self.shift_nu, self.rank = U, lam, nu, r
        self.stages = [r]

    def _build_adaptive(self, K, n: int, cap: int, gen: torch.Generator) -> None:
        dtype, device = K.dtype, K.device
        f64 = torch.float64
        eps = torch.finfo(dtype).eps
        red = self.red
        Omega = torch.zeros(red.n_local, 0, dtype=dtype, device=device)  # orthonormal sketch so far
        Y = torch.zeros(red.n_local, 0, dtype=dtype, device=device)  # K Ω, each column multiplied once
        G = torch.zeros(0, 0, dtype=f64, device=device)  # Yᵀ Y
        C = torch.zeros(0, 0, dtype=f64, device=device)  # Ωᵀ Y
        stages: list[int] = []
        r_next = min(cap, ADAPTIVE_START_RANK)
        while True:
            r = Omega.shape[1]
            W = red.randn(r_next - r, gen, dtype, device)  # shape: (n, k)
            for _ in range(2):  # block Gram-Schmidt, twice ("twice is enough")
                if r:
                    W = W - Omega @ red.gram(Omega, W)
                W = red.orthonormal(W)
            Yw = shifted_matmul(K, W, 0.0)  # shape: (n, k), the only product with the new columns
            Omega, Y = torch.cat([Omega, W], 1), torch.cat([Y, Yw], 1)  # shape: (n, r + k)
            Yw64 = Yw.to(f64)
            G = _grow_symmetric(G, red.gram(Yw64, Y.to(f64)))
            Cw = red.gram(Omega.to(f64), Yw64)  # shape: (r + k, k), the new columns of Ωᵀ Y
            C = _grow_symmetric(C, Cw.mT)  # Ωᵀ K Ω is symmetric: the new rows are Cwᵀ
            S2, Wsmall, nu = _nystrom_from_grams(G, C, eps, red.frobenius(Y), n)
            lam = (S2 - nu).clamp_min(0)  # shape: (r,), descending
            stages.append(Omega.shape[1])
            r = Omega.shape[1]
            lam1, lam_r = lam[0].item(), lam[-1].item()
            budget = math.ceil(0.5 * math.sqrt(1.0 + lam1 / self.noise))
            if lam_r <= ADAPTIVE_TAIL_FACTOR * self.noise or r >= min(cap, budget) or r >= n:
                break
            r_next = min(2 * r, cap, budget, n)
        # U = Y_ν W (orthonormal in exact arithmetic), in float64. The Gram route loses about
        # eps · cond(G) of orthogonality, so one Rayleigh-Ritz step in the basis U L₂⁻ᵀ
        # (UᵀU = L₂ L₂ᵀ, exactly orthonormal) restores it: Y_ν C_ν⁻¹ Y_νᵀ = U S² Uᵀ.
        U = (Y.to(f64) + nu * Omega.to(f64)) @ Wsmall  # shape: (n, r)
        L2, info = torch.linalg.cholesky_ex(red.gram(U, U))
        if int(info) == 0:
            S2, V = torch.linalg.eigh(L2.mT @ (S2.unsqueeze(-1) * L2))
            S2, V = S2.flip(0), V.flip(1)
            U = U @ torch.linalg.solve_triangular(L2.mT, V, upper=True)
            lam = (S2 - nu).clamp_min(0)
        self.U = U.to(dtype)  # shape: (n, r)
        self.eigvals = lam.to(dtype)  # shape: (r,), descending
        self.shift_nu, self.rank, self.stages = nu, r, stages

    def _set_noise(self, noise: float) -> None:
        self.noise = noise
        lam = self.eigvals  # shape: (r,), descending
        lam_max, lam_r = lam[0].item(), lam[-1].item()
        finfo = torch.finfo(lam.dtype)
        self.mu = noise if noise > 0 else max(lam_r, finfo.eps * lam_max, finfo.tiny)
        self.inv_eig = (lam_r + self.mu) / (lam + self.mu)  # shape: (r,)
        self.inv_tail = 1.0


_NOT_PSD = (
    "Nystrom preconditioner: the sketch Ωᵀ K Ω is not positive definite even with a shift of {nu:.3g}; "
    "is K symmetric positive semi-definite?"
)


def _grow_symmetric(G: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[[G, Rᵀ_old], [R_old, R_new]]`` from ``G`` (r × r) and the new rows ``R`` (k × (r + k))."""
    r = G.shape[0]
    return torch.cat([torch.cat([G, rows[:, :r].mT], 1), rows], 0)


def _nystrom_from_grams(
    G: torch.Tensor, C: torch.Tensor, eps: float, ynorm: float, n: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Nyström eigenvalues from ``G = Yᵀ Y`` and ``C = Ωᵀ Y`` (float64, r × r, ``Ω`` orthonormal).

    With the shift ``ν`` (as in the fixed-rank build), ``Y_ν = Y + ν Ω``, ``C_ν = C + ν I = L Lᵀ``
    and ``B = Y_ν L⁻ᵀ``: ``Bᵀ B = L⁻¹ (G + ν (C + Cᵀ) + ν² I) L⁻ᵀ = V S² Vᵀ``. Returns the
    ``S²`` (descending; the Nyström eigenvalues are ``(S² − ν)₊``), ``W = L⁻ᵀ V S⁻¹`` (so that
    ``U = Y_ν W``) and ``ν``.
    """
    r = G.shape[0]
    eye = torch.eye(r, dtype=G.dtype, device=G.device)
    Cs = 0.5 * (C + C.mT)
    nu = max(math.sqrt(n) * eps * ynorm, torch.finfo(torch.float32).tiny)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(Cs + nu * eye)
        if int(info) == 0:
            break
        nu *= 10.0
    else:
        raise RuntimeError(_NOT_PSD.format(nu=nu))
    G_nu = G + nu * (C + C.mT) + nu * nu * eye
    Linv_G = torch.linalg.solve_triangular(chol, G_nu, upper=False)  # L⁻¹ G_ν
    M = torch.linalg.solve_triangular(chol, Linv_G.mT, upper=False)  # L⁻¹ G_ν L⁻ᵀ
    S2, V = torch.linalg.eigh(0.5 * (M + M.mT))  # ascending
    S2, V = S2.flip(0), V.flip(1)
    S2 = S2.clamp_min(torch.finfo(G.dtype).tiny)
    W = torch.linalg.solve_triangular(chol.mT, V, upper=True) / S2.sqrt()  # L⁻ᵀ V S⁻¹
    return S2, W, nu


def _check_rank(rank) -> int:
    if rank is None:
        return DEFAULT_RANK
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1 (or None for {DEFAULT_RANK}), got {rank!r}")
    return rank


def build_preconditioner(
    K, name: str | None, noise: float = 0.0, rank: int | None = None, seed: int = 0, max_rank: int | None = None
) -> Preconditioner | None:
    """Build a preconditioner for ``K + noise I`` by name.

    Args:
        K: square symmetric PSD ``LinearOperator``.  # shape: (n, n)
        name: one of ``"jacobi"``, ``"pivchol"``, ``"nystrom"``, or ``None`` (returns ``None``).
        noise: the shift ``noise ≥ 0`` of the system the preconditioner is for.
        rank: rank of ``"pivchol"`` / ``"nystrom"`` (ignored by Jacobi). Default: ``min(n, 100)``
            for ``"pivchol"``; for ``"nystrom"`` chosen adaptively when ``noise > 0`` (see
            :class:`NystromPreconditioner`), else ``min(n, 100)``.
        seed: seed of the Nyström sketch.
        max_rank: cap of the adaptive Nyström rank (default ``min(n, 1000)``); used only when
            ``rank`` is ``None``.

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
    return NystromPreconditioner(K, noise, rank, seed, max_rank)
