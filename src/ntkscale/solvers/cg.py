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
from ._utils import check_float, check_noise, check_operator, check_positive_int, shifted_matmul
from .preconditioners import build_preconditioner

__all__ = ["ConvergenceWarning", "SingularKernelError", "SolveInfo", "solve"]

# Breakdown tests, applied only while the noise does not regularize K in working precision
# (noise ≤ SINGULAR_CURVATURE · eps · λ, with λ the largest Rayleigh quotient pᵀKp / pᵀp seen).
SINGULAR_CURVATURE = 10.0  # pᵀ(K + noise I)p ≤ this · eps · λ · pᵀp: vanishing curvature
RESIDUAL_GROWTH = 100.0  # the recursive residual grew this-fold (see solve: over what)


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance; the message names the knob."""


class SingularKernelError(ValueError):
    """``K + noise I`` is singular (to working precision) and the right-hand side is not in its
    range: CG broke down, and no iteration count or preconditioner can help; ``noise > 0`` is
    needed.

    Attributes:
        iterations: CG iterations made before the breakdown was detected.
        rank_bound: an upper bound on the rank of ``K`` when the operator exposes one
            (``K.num_params``, as for ``K = J Jᵀ`` with ``J`` of ``num_params`` columns), else ``None``.
        n: the size of ``K``.
    """

    def __init__(self, message: str, iterations: int, rank_bound: int | None, n: int):
        super().__init__(message)
        self.iterations, self.rank_bound, self.n = iterations, rank_bound, n


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
        preconditioner_rank: rank of a low-rank preconditioner (for ``"nystrom"`` without a
            ``rank``, the one chosen adaptively), else ``None``.
        preconditioner_seconds: time spent building the preconditioner within this solve (0 for
            none or a ready-built one); included in ``seconds``.
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
    preconditioner_rank: int | None = None
    preconditioner_seconds: float = 0.0

    def __str__(self) -> str:
        worst = self.residual_norm.max().item() if self.residual_norm.numel() else 0.0
        state = "converged" if self.converged else "NOT converged"
        return (
            f"CG {state}: {self.iterations} iterations, max relative residual {worst:.2e} "
            f"(tol {self.tol:.0e}), preconditioner={self.preconditioner}"
            f"{'' if self.preconditioner_rank is None else f' (rank {self.preconditioner_rank})'}, "
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
        rank: rank of the ``"nystrom"`` / ``"pivchol"`` preconditioners; ignored otherwise.
            Default: ``"nystrom"`` chooses it adaptively when ``noise > 0`` (the sketch doubles
            until its estimated tail eigenvalue is near ``noise``, or a cost cap of about half
            the products plain CG would need, at most ``min(n, 1000)``; see
            :class:`~ntkscale.solvers.NystromPreconditioner`), else ``min(n, 100)``. The rank
            used is reported as ``info.preconditioner_rank``.
        x0: initial guess.  # shape: like rhs
        progress: show a tqdm bar with the iteration and the largest recursive residual.
        seed: seed of the Nyström sketch.
        warn: emit a :class:`ConvergenceWarning` when not converged.

    Returns:
        ``(x, info)``: the solution, shaped like ``rhs`` (dtype ``K.dtype``), and a
        :class:`SolveInfo`.

    Breakdown: while ``noise`` is too small to regularize ``K`` in working precision (``noise = 0``
    in particular), each iteration checks for the signs of a singular ``K`` with a right-hand
    side outside its range: curvature ``pᵀ(K + noise I)p`` that is negative or vanishing (below
    ``10 · eps`` times the largest Rayleigh quotient seen), or a residual grown to 100× the
    smallest it had reached. CG then stops and :class:`SingularKernelError` is raised, naming the
    rank bound when ``K`` exposes ``num_params`` (an NTK ``J Jᵀ`` has rank ≤ P, so with
    ``N·C > P`` it is singular) and saying that ``noise > 0`` is needed. The same error is raised
    when such a solve ends unconverged on an operator whose ``num_params`` is below its size.

    Raises:
        ValueError: for a non-square ``K``, ``noise < 0``, ``tol ≤ 0``, ``max_iter < 1``, an
            ``rhs``/``x0`` of the wrong shape or with NaN/inf, or an unknown preconditioner.
        SingularKernelError: ``K + noise I`` is singular and CG broke down (see above).

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

    built = time.perf_counter()
    P = _resolve_preconditioner(K, preconditioner, n, noise, rank, seed)
    built = time.perf_counter() - built if isinstance(preconditioner, str) else 0.0
    pname = None if P is None else getattr(P, "name", type(P).__name__)

    def A(V: torch.Tensor) -> torch.Tensor:
        nonlocal matvecs
        matvecs += 1
        return shifted_matmul(K, V, noise)

    def Pinv(R: torch.Tensor) -> torch.Tensor:
        return R if P is None else P.apply(R)

    matvecs = iterations = restarts = 0
    breakdown = roundoff = False
    eps = torch.finfo(dtype).eps
    lam_seen = 0.0  # largest Rayleigh quotient pᵀ(K + noise I)p / pᵀp met so far
    singular: str | None = None  # the sign of breakdown met, when noise does not regularize K
    # The recursive residual of CG also jumps far above the smallest it reached on ill-conditioned
    # nonsingular systems (8 × 8 Hilbert: 1e-5 → 0.3), though rarely above where the run started
    # (‖r_k‖ ≤ √κ ‖r_0‖). So growth over its smallest names K singular only when K's rank is known
    # to be short; otherwise the residual must grow over the run's starting one.
    rank_bound = _rank_bound(K)
    rank_short = rank_bound is not None and rank_bound < n
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
    best = rel.clone()  # smallest recursive residual reached per column

    bar = tqdm(total=max_iter, desc="CG", disable=not progress, leave=False)
    try:
        while not bool(done.all()) and iterations < max_iter:
            todo = (~done).nonzero().squeeze(1)
            # One PCG run from the current x on the unconverged columns.
            Z = Pinv(R[:, todo])  # shape: (n, t)
            D = Z.clone()  # search directions, shape: (n, t)
            rz = red.dot(R[:, todo], Z)  # shape: (t,)
            act = torch.arange(todo.numel(), device=device)  # positions into todo still iterating
            while act.numel() and iterations < max_iter and singular is None:
                cols = todo[act]
                Da = D[:, act]
                ADa = A(Da)  # shape: (n, a)
                dAd, dd = red.sum(torch.stack([(Da * ADa).sum(0), (Da * Da).sum(0)]))  # one reduction
                quotient = dAd / dd.clamp_min(torch.finfo(dtype).tiny)
                lam_seen = max(lam_seen, quotient.max().item())
                floor = SINGULAR_CURVATURE * eps * lam_seen
                unregularized = noise <= floor
                ok = dAd > 0
                breakdown = breakdown or not bool(ok.all())
                if unregularized and not bool((quotient > floor).all()):
                    sign = "negative" if not bool(ok.all()) else "vanishing"
                    singular = f"{sign} curvature pᵀKp"
                alpha = torch.where(ok, rz[act] / torch.where(ok, dAd, 1.0), 0.0)
                X[:, cols] += alpha * Da
                R[:, cols] -= alpha * ADa
                iterations += 1
                rec = red.norm(R[:, cols]) / bnorm[cols]
                if progress:
                    bar.update(1)
                    bar.set_postfix(residual=f"{rec.max().item():.2e}")
                reference = best[cols] if rank_short else rel[cols]
                if unregularized and singular is None and bool((rec > RESIDUAL_GROWTH * reference).any()):
                    singular = _GREW
                best[cols] = torch.minimum(best[cols], rec)
                if singular is not None:
                    break
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
            if singular is not None:
                break
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
    if not converged and singular is None and noise <= SINGULAR_CURVATURE * eps * lam_seen:
        if rank_short:
            singular = "no convergence"
    if singular is not None:
        message = _singular_message(singular, iterations, noise, rank_bound, n, lam_seen, dtype)
        raise SingularKernelError(message, iterations, rank_bound, n)
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
        preconditioner_rank=getattr(P, "rank", None),
        preconditioner_seconds=built,
    )
    if warn and not converged:
        warnings.warn(_advice(info, P, roundoff, breakdown, dtype), ConvergenceWarning, stacklevel=2)
    return (X.squeeze(-1) if vec else X), info


_GREW = f"the residual grew over {RESIDUAL_GROWTH:g}-fold"


def _rank_bound(K) -> int | None:
    """``K.num_params`` when the operator exposes it (an upper bound on the rank of ``J Jᵀ``)."""
    p = getattr(K, "num_params", None)
    return p if isinstance(p, int) and not isinstance(p, bool) and p > 0 else None


def _singular_message(sign: str, iterations: int, noise: float, rank_bound, n: int, lam: float, dtype) -> str:
    if rank_bound is not None and rank_bound < n:
        what = (
            f"K is singular: its rank is at most P = {rank_bound} (the parameters it is taken over) "
            f"< N·C = {n} (its size)"
        )
    else:
        what = f"K + noise I is singular to working precision ({dtype})"
    floor = SINGULAR_CURVATURE * torch.finfo(dtype).eps * lam
    how = "noise = 0" if noise == 0 else f"noise = {noise:.3g} below the precision floor {floor:.3g}"
    return (
        f"{what}, with {how}: CG broke down after {iterations} iterations ({sign}). A right-hand "
        "side outside the range of K has no solution, and no max_iter or preconditioner rank can "
        f"help: use noise > 0 (e.g. 1e-6 to 1e-2 times mean(diag K); the largest curvature seen "
        f"was {lam:.3g})"
    )


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
        knob = "use preconditioner='nystrom' (its default rank adapts to the noise)"
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
    return check_float(tol, "tol", positive=True)


def _check_max_iter(max_iter) -> int:
    return check_positive_int(max_iter, "max_iter")


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
