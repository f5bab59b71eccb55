"""The bandit policies' posterior: a growing kernel history, its factor, and the Laplace evidence.

Between two retrainings the network is fixed, so its NTK on the history only grows: each round
appends one row (the pulled arm's kernel against the history, which the round computed anyway
to score the arms). :class:`GrowingKernelHistory` keeps that Gram matrix and the Cholesky factor
of ``Θ + λ I``, extended by one row per round in O(n²) instead of refactored in O(n³), and hands
the algebra to :class:`ntkscale.gp.KernelGP` — PCG with the factor as its (exact) preconditioner,
so a solve takes one iteration and the residual check still guards round-off. After a retraining
the Gram is rebuilt from :class:`ntkscale.NTKOperator` and the factor recomputed.

The linearized-Laplace evidence of the network's weights (prior ``N(0, s² I)``, GGN at the
trained weights ``θ*``, Gaussian likelihood ``σ²``), in the convention of
:meth:`ntkscale.gp.KernelGP.log_marginal_likelihood` with ``kind="laplace"``:

    log Z(σ², s²) = −‖r‖²/(2σ²) − (n/2) log(2πσ²) − ½ Σᵢ log(1 + s² μᵢ / σ²) − ‖θ*‖²/(2 s²)

with ``r = y − f(X; θ*)`` and ``μᵢ`` the eigenvalues of the NTK Gram ``Θ``. Given the
eigenvalues (one ``eigh`` of the n × n Gram) every evaluation and its gradient in
``(log σ², log s²)`` costs O(n): :func:`fit_laplace_evidence` maximizes it exactly by L-BFGS-B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from linear_operator.operators import DenseLinearOperator
from torch import Tensor

from ..gp import KernelGP
from ..solvers import Preconditioner

__all__ = ["CholeskyPreconditioner", "EvidenceFit", "GrowingKernelHistory", "fit_laplace_evidence", "laplace_evidence"]


class CholeskyPreconditioner(Preconditioner):
    """``P = L Lᵀ``, an explicit Cholesky factor of ``K + noise I``: PCG converges in one step.

    Args:
        L: lower-triangular factor.  # shape: (n, n)
        noise: the shift it factors.
    """

    name = "cholesky"

    def __init__(self, L: Tensor, noise: float):
        self.L, self.noise, self.n = L, float(noise), int(L.shape[0])

    def apply(self, R: Tensor) -> Tensor:
        vec = R.dim() == 1
        R2 = R.unsqueeze(-1) if vec else R
        out = torch.cholesky_solve(R2.to(self.L.dtype), self.L).to(R.dtype)
        return out.squeeze(-1) if vec else out

    def _set_noise(self, noise: float) -> None:
        raise ValueError(
            f"a Cholesky preconditioner factors K + {self.noise:g} I only; build a new one for noise {noise:g}"
        )


class GrowingKernelHistory:
    """The NTK Gram of the observed arms under a fixed network, grown by a row per round.

    Args:
        capacity: the most rows it will hold (the horizon).
        dtype: dtype of the algebra (float64 recommended).
        device: where it lives.

    Attributes:
        n: rows held.
        noise, prior_scale: ``σ²``, ``s²``; ``λ = σ²/s²`` is the factor's shift.
    """

    def __init__(self, capacity: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"):
        self.capacity = int(capacity)
        self.G = torch.zeros(capacity, capacity, dtype=dtype, device=device)
        self.L = torch.zeros(capacity, capacity, dtype=dtype, device=device)
        self.r = torch.zeros(capacity, dtype=dtype, device=device)
        self.n = 0
        self.noise, self.prior_scale = 1.0, 1.0
        self.appended = 0  # rows added by a rank-one extension since the last reset
        self.refactored = 0  # full factorizations

    @property
    def ridge(self) -> float:
        """``λ = σ² / s²``."""
        return self.noise / self.prior_scale

    def reset(self, G: Tensor, residual: Tensor, noise: float, prior_scale: float) -> None:
        """Replace the history: a new Gram (after a retraining) and its factor at ``σ²/s²``."""
        n = G.shape[0]
        if n > self.capacity:
            raise ValueError(f"the history holds at most {self.capacity} rows, got a Gram of {n}")
        self.n, self.noise, self.prior_scale = n, float(noise), float(prior_scale)
        self.G[:n, :n] = G.to(self.G.dtype)
        self.r[:n] = residual.reshape(-1).to(self.r.dtype)
        if n:
            A = self.G[:n, :n] + self.ridge * torch.eye(n, dtype=self.G.dtype, device=self.G.device)
            self.L[:n, :n] = torch.linalg.cholesky(A)
        self.refactored += 1
        self.appended = 0

    def append(self, k_row: Tensor, k_self: float, residual: float) -> None:
        """Add one observation: its kernel against the history ``(n,)``, with itself, its residual.

        The factor grows by ``l = L⁻¹ k`` and ``√(k_self + λ − ‖l‖²)``: O(n²), no refactoring.
        """
        n = self.n
        if n >= self.capacity:
            raise ValueError(f"the history is full ({self.capacity} rows)")
        k = k_row.reshape(-1).to(self.G.dtype)
        if k.numel() != n:
            raise ValueError(f"k_row must have n = {n} entries, got {k.numel()}")
        self.G[n, :n] = k
        self.G[:n, n] = k
        self.G[n, n] = float(k_self)
        self.r[n] = float(residual)
        if n:
            l = torch.linalg.solve_triangular(self.L[:n, :n], k.unsqueeze(-1), upper=False).squeeze(-1)
            self.L[n, :n] = l
            d = float(k_self) + self.ridge - float(l.square().sum())
        else:
            d = float(k_self) + self.ridge
        # in exact arithmetic d ≥ λ > 0; round-off can only shave it
        self.L[n, n] = math.sqrt(max(d, self.ridge * 1e-12, torch.finfo(self.G.dtype).tiny))
        self.n = n + 1
        self.appended += 1

    def log_det_ratio(self) -> float:
        """``log det(I + Θ/λ)`` from the factor's diagonal: ``Σ 2 log Lᵢᵢ − n log λ``."""
        n = self.n
        if not n:
            return 0.0
        return float(2.0 * torch.log(torch.diagonal(self.L[:n, :n])).sum() - n * math.log(self.ridge))

    def posterior(self) -> KernelGP:
        """:class:`ntkscale.gp.KernelGP` on the history at ``(σ², s²)``, preconditioned by the factor.

        Raises:
            ValueError: the history is empty (the prior needs no posterior object).
        """
        n = self.n
        if not n:
            raise ValueError("the history is empty")
        return KernelGP(
            DenseLinearOperator(self.G[:n, :n]), self.r[:n], self.noise, self.prior_scale,
            preconditioner=CholeskyPreconditioner(self.L[:n, :n], self.ridge), exact_solver="cg",
            max_iter=20, block_size=max(32, n),
        )


@dataclass
class EvidenceFit:
    """What :func:`fit_laplace_evidence` found.

    Attributes:
        noise, prior_scale: the maximizer ``(σ², s²)``.
        evidence: the log evidence there.
        initial_noise, initial_prior_scale, initial_evidence: the start and its evidence.
        iterations: L-BFGS-B iterations.
    """

    noise: float
    prior_scale: float
    evidence: float
    initial_noise: float
    initial_prior_scale: float
    initial_evidence: float
    iterations: int


def _terms(mu: np.ndarray, rss: float, n: int, wsq: float, u: float, v: float):
    s2n, s2 = math.exp(u), math.exp(v)
    rho = (s2 / s2n) * mu
    value = -rss / (2 * s2n) - 0.5 * n * (math.log(2 * math.pi) + u) - 0.5 * np.log1p(rho).sum() - wsq / (2 * s2)
    frac = (rho / (1 + rho)).sum()
    du = rss / (2 * s2n) - 0.5 * n + 0.5 * frac
    dv = -0.5 * frac + wsq / (2 * s2)
    return float(value), np.array([du, dv])


def laplace_evidence(eigenvalues: Tensor, residual: Tensor, weight_norm_sq: float, noise: float,
                     prior_scale: float) -> float:
    """The linearized-Laplace log evidence (module docstring) from the Gram's eigenvalues.

    Args:
        eigenvalues: eigenvalues ``μᵢ`` of the NTK Gram (negative round-off is clipped).  # shape: (n,)
        residual: ``y − f(X; θ*)``.  # shape: (n,)
        weight_norm_sq: ``‖θ*‖²``.
        noise: ``σ² > 0``.
        prior_scale: ``s² > 0``.
    """
    if noise <= 0 or prior_scale <= 0:
        raise ValueError(f"noise and prior_scale must be > 0, got {noise}, {prior_scale}")
    mu = eigenvalues.detach().double().clamp_min(0).cpu().numpy()
    rss = float(residual.detach().double().square().sum())
    return _terms(mu, rss, mu.size, float(weight_norm_sq), math.log(noise), math.log(prior_scale))[0]


def fit_laplace_evidence(
    eigenvalues: Tensor,
    residual: Tensor,
    weight_norm_sq: float,
    noise: float,
    prior_scale: float,
    noise_range: tuple[float, float] = (1e-6, 1e1),
    prior_scale_range: tuple[float, float] = (1e-4, 1e4),
    max_iter: int = 100,
) -> EvidenceFit:
    """Maximize :func:`laplace_evidence` over ``(log σ², log s²)`` from ``(noise, prior_scale)``.

    L-BFGS-B with the exact gradient, in the box ``noise_range × prior_scale_range``; warm-started
    at the previous optimum this is the online update of the bandit policies. The result never
    has a lower evidence than the start.
    """
    from scipy.optimize import minimize

    mu = eigenvalues.detach().double().clamp_min(0).cpu().numpy()
    rss = float(residual.detach().double().square().sum())
    n, wsq = mu.size, float(weight_norm_sq)
    bounds = [(math.log(noise_range[0]), math.log(noise_range[1])),
              (math.log(prior_scale_range[0]), math.log(prior_scale_range[1]))]
    x0 = np.array([min(max(math.log(noise), bounds[0][0]), bounds[0][1]),
                   min(max(math.log(prior_scale), bounds[1][0]), bounds[1][1])])
    start = _terms(mu, rss, n, wsq, math.log(noise), math.log(prior_scale))[0]

    def neg(x):
        val, grad = _terms(mu, rss, n, wsq, float(x[0]), float(x[1]))
        return -val, -grad

    res = minimize(neg, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": max_iter})
    best = -float(res.fun)
    if not best >= start:  # never worse than the start
        return EvidenceFit(noise, prior_scale, start, noise, prior_scale, start, int(res.nit))
    return EvidenceFit(math.exp(res.x[0]), math.exp(res.x[1]), best, noise, prior_scale, start, int(res.nit))
