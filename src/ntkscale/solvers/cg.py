"""Batched preconditioned conjugate gradients on ``K + noise I``, matrix-free.

The solver touches ``K`` only through batched products ``K @ V`` (and, for the preconditioners,
``K.diagonal()`` and a few rows ``K[idx, :]``); it never forms ``K``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import settings
from ._reduce import reductions
from ._utils import check_noise, check_operator, shifted_matmul
from .preconditioners import build_preconditioner

__all__ = ["ConvergenceWarning", "SolveInfo", "solve"]


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance; the message names the knob."""


@dataclass
class SolveInfo:
    """What :func:`solve` did.

    Attributes:
        iterations: total CG iterations (each one batched over all unconverged columns).
        residual_norm: true relative residual ``||rhs - (K + noise I) x|| / ||rhs||`` per column,
            computed from ``x`` at the end (0 for a zero column).  # shape: (k,)
        converged: whether every column reached ``tol``.
        converged_per_column: per-column flag.  # shape: (k,)
        preconditioner: name of the preconditioner used, or ``None``.
        seconds: wall time of the solve, including building the preconditioner.
        matvecs: products with ``K`` made by the solve (a batched ``K @ V`` counts once); the
            preconditioner's construction is not included.
        tol: the tolerance in force.
        max_iter: the iteration cap in force.
        restarts: how often CG was restarted from the current ``x`` because the recursive
            residual claimed convergence but the true residual did not.
    """

    iterations: int
    residual_norm: torch.Tensor
    converged: bool
    converged_per_column: torch.Tensor
    preconditioner: str | None
    seconds: float
    matvecs: int
    tol: float = 0.0
    max_iter: int = 0
    restarts: int = 0

    def __str__(self) -> str:
        worst = self.residual_norm.max().item() if self.residual_norm.numel() else 0.0
        state = "converged" if self.converged else "NOT converged"
        return (
            f"CG {state}: {self.iterations} iterations, max relative residual {worst:.2e} "
            f"(tol {self.tol:.0e}), preconditioner={self.preconditioner}, "
            f"{self.matvecs} matvecs, {self.seconds:.3g} s"
        )


def solve(
    K,
    rhs: torch.Tensor,
    noise: float = 0.0,
    preconditioner=None,
    tol: float | None = None,
    max_iter: int | None = None,
    rank: int | None = None,
    x0: torch.Tensor | None = None,
    progress: bool = False,
    seed: int = 0,
    warn: bool = True,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve ``(K + noise I) x = rhs`` by batched preconditioned conjugate gradients.

    All right-hand sides are iterated together (one ``K @ V`` per iteration over the columns not
    yet converged); a column is frozen once its recursive residual reaches ``tol``. At the end the
    true relative residual ``||rhs - (K + noise I) x|| / ||rhs||`` is computed per column; where
    it is still above ``tol`` CG is restarted from the current ``x`` (within ``max_iter``).
    If the tolerance is not met, a :class:`ConvergenceWarning` names the residual reached and
    the knob to turn; ``info.converged`` is then ``False``.

    Computation runs in ``K.dtype`` on ``K.device``: ``rhs`` and ``x0`` are moved there, and no
    autograd graph is built through the products (the solve is not differentiable).

    Args:
        K: square symmetric PSD ``linear_operator.LinearOperator``.  # shape: (n, n)
        rhs: right-hand side(s).  # shape: (n,) or (n, k)
        noise: ``noise ≥ 0`` added to the diagonal.
        preconditioner: ``"nystrom"``, ``"pivchol"``, ``"jacobi"``, ``None``, or a ready object
            with ``.apply(R)`` (e.g. from :func:`build_preconditioner`, to reuse across solves).
        tol: relative residual tolerance, > 0 (default :class:`settings.cg_tolerance`, 1e-4).
        max_iter: cap on CG iterations, ≥ 1 (default ``min(n, settings.max_cg_iterations)``,
            i.e. ``min(n, 1000)``).
        rank: rank of the ``"nystrom"`` / ``"pivchol"`` preconditioners (default
            ``min(n, 100)``); ignored otherwise.
        x0: initial guess.  # shape: like rhs
        progress: show a tqdm bar with the iteration and the largest recursive residual.
        seed: seed of the Nyström sketch.
        warn: emit a :class:`ConvergenceWarning` when not converged.

    Returns:
        ``(x, info)``: the solution, shaped like ``rhs`` (dtype ``K.dtype``), and a
        :class:`SolveInfo`.

    Raises:
        ValueError: for a non-square ``K``, ``noise < 0``, ``tol ≤ 0``, ``max_iter < 1``, an
            ``rhs``/``x0`` of the wrong shape or with NaN/inf, or an unknown preconditioner.

    Example:
        >>> import torch
        >>> from linear_operator.operators import DenseLinearOperator
        >>> J = torch.randn(200, 20, dtype=torch.float64)
        >>> K = DenseLinearOperator(J @ J.T)
        >>> x, info = solve(K, torch.ones(200, 3, dtype=torch.float64), noise=1e-2,
        ...                 preconditioner="nystrom", rank=20, tol=1e-8)
        >>> info.converged, x.shape
        (True, torch.Size([200, 3]))
    """
    start = time.perf_counter()
    n = check_operator(K)
    red = reductions(K)  # inner products and norms over all rows (all ranks of a sharded K)
    noise = check_noise(noise)
    tol = _check_tol(settings.cg_tolerance.value() if tol is None else tol)
    max_iter = _check_max_iter(min(red.n, settings.max_cg_iterations.value()) if max_iter is None else max_iter)
    dtype, device = K.dtype, K.device
    B, vec = _check_rhs(rhs, n, "rhs")
    B = B.to(dtype=dtype, device=device)  # shape: (n, k)

    P = _resolve_preconditioner(K, preconditioner, n, noise, rank, seed)
    pname = None if P is None else getattr(P, "name", type(P).__name__)

    def A(V: torch.Tensor) -> torch.Tensor:
        nonlocal matvecs
        matvecs += 1
        return shifted_matmul(K, V, noise)

    def Pinv(R: torch.Tensor) -> torch.Tensor:
        return R if P is None else P.apply(R)

    matvecs = iterations = restarts = 0
    breakdown = roundoff = False
    bnorm = red.norm(B)  # shape: (k,)
    zero_col = bnorm == 0
    bnorm = torch.where(zero_col, torch.ones_like(bnorm), bnorm)

    if x0 is None:
        X = torch.zeros_like(B)
        R = B.clone()
    else:
        X0, _ = _check_rhs(x0, n, "x0")
        if x0.shape != rhs.shape:
            raise ValueError(f"x0 must have the shape of rhs {tuple(rhs.shape)}, got {tuple(x0.shape)}")
        X = X0.to(dtype=dtype, device=device).clone()
        X[:, zero_col] = 0.0
        R = B - A(X)
    rel = red.norm(R) / bnorm  # shape: (k,), true relative residual
    done = rel <= tol

    bar = tqdm(total=max_iter, desc="CG", disable=not progress, leave=False)
    try:
        while not bool(done.all()) and iterations < max_iter:
            todo = (~done).nonzero().squeeze(1)
            # One PCG run from the current x on the unconverged columns.
            Z = Pinv(R[:, todo])  # shape: (n, t)
            D = Z.clone()  # search directions, shape: (n, t)
            rz = red.dot(R[:, todo], Z)  # shape: (t,)
            act = torch.arange(todo.numel(), device=device)  # positions into todo still iterating
            while act.numel() and iterations < max_iter:
                cols = todo[act]
                Da = D[:, act]
                ADa = A(Da)  # shape: (n, a)
                dAd = red.dot(Da, ADa)
                ok = dAd > 0
                breakdown = breakdown or not bool(ok.all())
                alpha = torch.where(ok, rz[act] / torch.where(ok, dAd, 1.0), 0.0)
                X[:, cols] += alpha * Da
                R[:, cols] -= alpha * ADa
                iterations += 1
                rec = red.norm(R[:, cols]) / bnorm[cols]
                if progress:
                    bar.update(1)
                    bar.set_postfix(residual=f"{rec.max().item():.2e}")
                keep = (rec > tol) & ok & torch.isfinite(rec)
                act = act[keep]
                if not act.numel():
                    break
                Ra = R[:, todo[act]]
                Za = Pinv(Ra)
                rz_new = red.dot(Ra, Za)
                beta = rz_new / rz[act]
                D[:, act] = Za + beta * D[:, act]
                rz[act] = rz_new
            # True residual of the columns just iterated: one batched product.
            recursive = red.norm(R[:, todo]) / bnorm[todo]
            R[:, todo] = B[:, todo] - A(X[:, todo])
            new_rel = red.norm(R[:, todo]) / bnorm[todo]
            improved = bool((new_rel < 0.5 * rel[todo]).any())
            rel[todo] = new_rel
            done = rel <= tol
            # The recursion drifted from the true residual: round-off, not too few iterations.
            roundoff = bool(((new_rel > 10 * recursive.clamp_min(tol)) & ~done[todo]).any())
            if done.all() or iterations >= max_iter:
                break
            if not improved:  # restarting cannot help: round-off floor or breakdown
                roundoff = True
                break
            restarts += 1
    finally:
        bar.close()

    converged = bool(done.all())
    info = SolveInfo(
        iterations=iterations,
        residual_norm=rel,
        converged=converged,
        converged_per_column=done,
        preconditioner=pname,
        seconds=time.perf_counter() - start,
        matvecs=matvecs,
        tol=tol,
        max_iter=max_iter,
        restarts=restarts,
    )
    if warn and not converged:
        warnings.warn(_advice(info, P, roundoff, breakdown, dtype), ConvergenceWarning, stacklevel=2)
    return (X.squeeze(-1) if vec else X), info


def _advice(info: SolveInfo, P, roundoff: bool, breakdown: bool, dtype: torch.dtype) -> str:
    bad = ~info.converged_per_column
    worst = info.residual_norm[bad].max().item() if bool(bad.any()) else float("nan")
    k = info.residual_norm.numel()
    head = (
        f"CG stopped at {info.iterations} iterations with relative residual {worst:.1e} > tol "
        f"{info.tol:.0e} ({int(bad.sum())} of {k} columns)"
    )
    if math.isnan(worst):
        return head + "; the products with K returned NaN/inf"
    if breakdown:
        return head + "; pᵀ(K + noise I)p ≤ 0 was met: K is not positive definite (add noise > 0)"
    if roundoff:
        fix = "loosen tol or add noise" if dtype == torch.float64 else "compute in float64, add noise, or loosen tol"
        return head + f"; the true residual stalled at the round-off floor of {dtype} for this conditioning: {fix}"
    rank = getattr(P, "rank", None)
    if P is None or rank is None:
        knob = "use preconditioner='nystrom' (rank=100, or up to 500)"
    else:
        knob = f"raise the preconditioner's rank (now rank={rank}, e.g. rank={2 * rank})"
    return head + f"; raise max_iter (now {info.max_iter}) or {knob}"


def _resolve_preconditioner(K, preconditioner, n: int, noise: float, rank, seed: int):
    if preconditioner is None or isinstance(preconditioner, str):
        return build_preconditioner(K, preconditioner, noise=noise, rank=rank, seed=seed)
    if not callable(getattr(preconditioner, "apply", None)):
        raise ValueError(
            "preconditioner must be 'nystrom', 'pivchol', 'jacobi', None, or an object with an "
            f".apply(R) method, got {type(preconditioner).__name__}"
        )
    pn = getattr(preconditioner, "n", None)
    if pn and pn != n:
        raise ValueError(f"preconditioner was built for size {pn}, but K has size {n}")
    return preconditioner


def _check_tol(tol) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0 or not math.isfinite(tol):
        raise ValueError(f"tol must be a finite float > 0, got {tol!r}")
    return float(tol)


def _check_max_iter(max_iter) -> int:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    return max_iter


def _check_rhs(rhs, n: int, what: str) -> tuple[torch.Tensor, bool]:
    """Return ``rhs`` as (n, k) (detached) and whether it was a vector."""
    if not torch.is_tensor(rhs):
        raise ValueError(
            f"{what} must be a torch.Tensor of shape (n,) or (n, k) with n = {n}, got {type(rhs).__name__}"
        )
    if rhs.dim() not in (1, 2) or rhs.shape[0] != n:
        raise ValueError(f"{what} must have shape (n,) or (n, k) with n = {n} (K's size), got shape {tuple(rhs.shape)}")
    if rhs.is_complex():
        raise ValueError(f"{what} must be real, got dtype {rhs.dtype}")
    rhs = rhs.detach()
    if rhs.is_floating_point():
        bad = int((~torch.isfinite(rhs)).sum())
        if bad:
            raise ValueError(f"{what} contains NaN or inf ({bad} entries)")
    vec = rhs.dim() == 1
    return (rhs.unsqueeze(-1) if vec else rhs), vec
