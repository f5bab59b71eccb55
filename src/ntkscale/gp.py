"""NTK-GP / linearized-Laplace regression around trained weights, matrix-free; the GGN kernel.

The linearized network ``f_lin(x; θ) = f(x; θ*) + J(x)(θ − θ*)`` with the prior
``θ ~ N(θ*, s² I)`` (``s² = prior_scale``) and a Gaussian likelihood of variance ``σ²``
(``noise``) is a Gaussian process with kernel ``s² Θ`` and mean ``f(·; θ*)``. With ``Θ`` the NTK
on the training inputs ``X``, ``Θ*X`` the cross-kernel and ``λ = σ²/s²``:

    mean(x*) = f(x*) + Θ*X (Θ + λ I)⁻¹ (y − f(X))
    var(x*)  = s² [Θ** − Θ*X (Θ + λ I)⁻¹ ΘX*]        (marginal, per (test point, output))

The mean is the prediction of the linearized network trained to convergence on the MSE with
ridge ``λ`` (kernel regression with the NTK). Everything is computed from products with
:class:`ntkscale.NTKOperator` and its exact ``diagonal()``:

* the training solve ``(Θ + λ I)⁻¹ (y − f(X))`` by preconditioned CG (:func:`ntkscale.solvers.solve`),
  cached per ``λ``, with one preconditioner built once per ``λ``;
* exact variances either by batched PCG on blocks of the columns of ``ΘX*`` (the same
  preconditioner) or — when there are many test columns, which is when PCG's
  ``columns × iterations`` products cost more than ``(N C)³/3`` multiply-adds — by a tiled
  float64 Cholesky factor of ``Θ + λ I`` (:class:`ntkscale.solvers.TiledCholesky`, out of core
  past a memory budget) and one forward substitution per block of test columns; the factor also
  gives the training solve exactly;
* fast variances from a rank-``r`` Lanczos decomposition of ``Θ + λ I`` (LOVE, Pleiss et al.
  2018): ``(Θ + λ I)⁻¹ ≈ Q T⁻¹ Qᵀ = R Rᵀ``, so ``var ≈ s² [Θ** − ‖Rᵀ ΘX*‖²]``. The Krylov
  projection can only lose part of the subtracted term, so fast variances are never below the
  exact ones (to round-off): they err on the side of more uncertainty. How close they come is
  set by how much of ``Θ``'s spectrum above ``λ`` the rank misses: when the posterior variance
  is a small fraction of the prior's (small ``λ``, dense data) a rank far below ``N C`` can be off
  by a large factor; check with :meth:`NTKGP.variance_error` on a subset;
* the log marginal likelihood of ``y − f(X) ~ N(0, s² Θ + σ² I)`` with a stochastic Lanczos
  quadrature log-determinant and one CG solve, and its maximization over ``(σ², s²)``.

Rows of every kernel are ordered ``(sample, output)`` row-major; ``y``, means and variances are
shaped ``(N, C)`` (``C = 1`` for a scalar-output model).

Example:
    >>> import torch, ntkscale as nks
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    >>> X, Xs = torch.randn(40, 2), torch.randn(5, 2)
    >>> y = torch.sin(X[:, :1])
    >>> gp = NTKGP(model, X, y, noise=1e-2, dtype=torch.float64)
    >>> mean, var = gp.predict(Xs)
    >>> mean.shape, var.shape, bool((var >= 0).all())
    (torch.Size([5, 1]), torch.Size([5, 1]), True)
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch
from linear_operator import to_dense
from linear_operator.operators import LinearOperator
from torch import Tensor, nn
from tqdm.auto import tqdm

from .functional import chunks
from .operator import NTKOperator
from .solvers import (
    ConvergenceWarning,
    Preconditioner,
    SolveInfo,
    TiledCholesky,
    build_preconditioner,
    lanczos,
    solve,
)
from .solvers.cholesky import DEFAULT_MEMORY as DEFAULT_FACTOR_MEMORY
from .solvers.cholesky import cholesky_bytes, free_disk_bytes

__all__ = ["ColumnBlockedOperator", "GGNKernel", "NTKGP", "NegativeVarianceWarning", "PredictInfo", "ggn_kernel"]

log = logging.getLogger("ntkscale")

DEFAULT_RANK = 100  # preconditioner rank
DEFAULT_FAST_RANK = 100  # Lanczos (LOVE) rank of the fast variances
DEFAULT_BLOCK = 32  # right-hand-side columns per batched product / PCG block
DEFAULT_PROBES = 30  # SLQ probes of the log-determinant


class NegativeVarianceWarning(UserWarning):
    """Posterior variances came out negative by round-off and were clamped at 0."""


@dataclass
class PredictInfo:
    """What :meth:`NTKGP.predict` did.

    Attributes:
        mode: ``"exact"`` or ``"fast"``; ``None`` when only the mean was computed.
        seconds: wall time per stage (``"mean"``, ``"diag"``, ``"lanczos"``, ``"variance"``).
        solve_iterations: PCG iterations of each block of right-hand sides (exact mode).
        converged: whether every PCG solve reached ``tol`` (exact mode; ``True`` otherwise).
        max_residual: the largest final relative residual over the blocks (exact mode).
        clamped: how many variances were negative and clamped at 0.
        most_negative: the most negative variance before clamping (0.0 if none).
        fast_rank: the Lanczos rank of the fast variances (fast mode).
        solver: how the exact variances were computed: ``"cg"`` or ``"cholesky"``.
        factor: the :class:`ntkscale.solvers.CholeskyInfo` of the factor used (``"cholesky"``).
    """

    mode: str | None
    seconds: dict = field(default_factory=dict)
    solve_iterations: list = field(default_factory=list)
    converged: bool = True
    max_residual: float = 0.0
    clamped: int = 0
    most_negative: float = 0.0
    fast_rank: int | None = None
    solver: str | None = None
    factor: object | None = None


class NTKGP:
    """NTK-GP / linearized-Laplace regression around a network's current (trained) weights.

    Args:
        model: the trained network, mapping ``X`` (N, *in_shape) to (N, C) or (N,). A frozen copy
            is taken at construction: training the model afterwards does not change this GP.
        X: training inputs.  # shape: (N, *in_shape)
        y: training targets.  # shape: (N, C), or (N,) when C = 1
        noise: likelihood variance ``σ² ≥ 0``.
        prior_scale: prior variance ``s² > 0`` of the weights around the trained ones.
        backend: backend of every NTK operator (see :class:`ntkscale.NTKOperator`); ``"auto"``
            is resolved once on the training operator and reused for the test operators.
        preconditioner: ``"nystrom"``, ``"pivchol"``, ``"jacobi"``, ``None``, or a ready
            :class:`ntkscale.solvers.Preconditioner` for ``Θ + λ I`` (used as given). A named
            one is built once per ``λ`` (low-rank ones are re-shifted, not rebuilt, when ``λ``
            changes) and reused by every solve.
        rank: rank of the ``"nystrom"``/``"pivchol"`` preconditioner (default 100).
        tol: relative residual tolerance of the CG solves, > 0 (default 1e-4 for float32 and
            1e-8 for float64 operators).
        max_iter: cap on CG iterations per solve (default ``min(N C, 1000)``).
        fast_rank: Lanczos rank ``r`` of the fast variances (default 100, capped at ``N C``).
        block_size: right-hand-side columns per batched product and per PCG block (default
            32); memory of a structured product grows linearly in it.
        num_probes: Rademacher probes of the SLQ log-determinant (default 30). With
            ``num_probes ≥ N C`` the unit vectors are used instead and the trace is exact.
        num_iter: Lanczos steps per probe of the SLQ log-determinant (default ``min(N C, 100)``).
        seed: seed of the Nyström sketch, the Lanczos start vector and the SLQ probes.
        exact_solver: how :meth:`predict` computes exact variances: ``"cg"`` (batched PCG per
            block of test columns), ``"cholesky"`` (a tiled float64 Cholesky factor of
            ``Θ + λ I``, then triangular solves; also used for the mean), or ``"auto"``
            (default): the cheaper by a multiply-add estimate — ``(N C)³/3`` plus ``(N C)²``
            per test column for the factor against ``columns × iterations × 2 N P`` for PCG
            (iterations from the last training solve, else 100) — provided the factor fits on
            disk.
        factor_memory: bytes the Cholesky factorization may hold in memory at once (default
            2 GiB); a factor larger than half of it goes to ``scratch_dir``.
        scratch_dir: directory for the factor's panels (default a temporary directory, removed
            with the GP). A given directory keeps them with a manifest: an interrupted
            factorization resumes there, and a later GP on the same kernel and ``λ`` reuses it.
        progress: show tqdm bars over the blocks of exact variances and the Cholesky tiles.
        **operator_kwargs: passed to every :class:`ntkscale.NTKOperator` (``chunk_size``,
            ``params``, ``dtype``, ``memory_budget``, ...).

    Attributes:
        K: the training operator ``Θ``.  # shape: (N*C, N*C)
        solve_info: the :class:`ntkscale.solvers.SolveInfo` of the last training solve.
        info: the :class:`PredictInfo` of the last :meth:`predict`.
        fit_info: what the last :meth:`fit_hyperparameters` did (a dict).

    Raises:
        ValueError: for ``noise < 0``, ``prior_scale ≤ 0``, ``tol ≤ 0``, a ``y`` of the wrong
            shape or with NaN/inf, or bad sizes (``rank``, ``fast_rank``, ``block_size``, ...).

    Memory: the operator's own (factors or chunks), one ``N C`` vector per cached ``λ``, the
    preconditioner (``N C × rank``), the fast-variance cache (the Lanczos basis and up to two
    weighted copies, each ``N C × fast_rank``), for the log-determinant the Lanczos vectors
    (``N C × num_iter × num_probes``), and for the Cholesky path ``factor_memory`` in memory plus
    ``(N C)²/2`` float64 entries on disk.
    """

    def __init__(
        self,
        model: nn.Module,
        X: Tensor,
        y: Tensor,
        noise: float,
        prior_scale: float = 1.0,
        backend: str = "auto",
        preconditioner: str | Preconditioner | None = "nystrom",
        rank: int | None = None,
        tol: float | None = None,
        max_iter: int | None = None,
        fast_rank: int | None = None,
        block_size: int | None = None,
        num_probes: int = DEFAULT_PROBES,
        num_iter: int | None = None,
        seed: int = 0,
        exact_solver: str = "auto",
        factor_memory: int = DEFAULT_FACTOR_MEMORY,
        scratch_dir: str | None = None,
        progress: bool = False,
        **operator_kwargs,
    ):
        if exact_solver not in ("auto", "cg", "cholesky"):
            raise ValueError(f"exact_solver must be 'auto', 'cg' or 'cholesky', got {exact_solver!r}")
        self.exact_solver = exact_solver
        self.factor_memory = _check_positive_int(factor_memory, "factor_memory", DEFAULT_FACTOR_MEMORY)
        self.scratch_dir = scratch_dir
        self._chol: tuple[float, TiledCholesky] | None = None
        self._noise = _check_noise(noise)
        self._prior_scale = _check_prior_scale(prior_scale)
        if tol is not None:
            tol = _check_tol(tol)
        self.rank = _check_positive_int(rank, "rank", DEFAULT_RANK)
        self.fast_rank = _check_positive_int(fast_rank, "fast_rank", DEFAULT_FAST_RANK)
        self.block_size = _check_positive_int(block_size, "block_size", DEFAULT_BLOCK)
        self.num_probes = _check_positive_int(num_probes, "num_probes", DEFAULT_PROBES)
        self.num_iter = None if num_iter is None else _check_positive_int(num_iter, "num_iter", None)
        self.max_iter = None if max_iter is None else _check_positive_int(max_iter, "max_iter", None)
        if not (
            preconditioner is None
            or isinstance(preconditioner, str)
            or callable(getattr(preconditioner, "apply", None))
        ):
            raise ValueError(
                "preconditioner must be 'nystrom', 'pivchol', 'jacobi', None, or an object with an "
                f".apply(R) method, got {type(preconditioner).__name__}"
            )
        self.seed = int(seed)
        self.progress = bool(progress)
        self._operator_kwargs = dict(operator_kwargs)

        self._model = _frozen_copy(model, operator_kwargs.get("dtype"))
        self.K = NTKOperator(self._model, X, backend=backend, **operator_kwargs)
        self._Kb = ColumnBlockedOperator(self.K, self.block_size)  # what the solvers see
        self._backend = self.K.backend
        self.X = self.K.X1
        self.num_outputs = C = self.K.num_outputs
        self.num_train = N = self.X.shape[0]
        self.n = N * C
        self.tol = tol if tol is not None else (1e-8 if self.K.dtype == torch.float64 else 1e-4)
        self.y = _check_targets(y, N, C, self.K.dtype, self.K.device)  # shape: (N, C)
        self.f_train = self._forward(self.X)  # shape: (N, C)
        self._r = (self.y - self.f_train).reshape(-1)  # shape: (N*C,)

        self._preconditioner_arg = preconditioner
        self._base_precond: Preconditioner | None = None
        self._precond_cache: dict[float, Preconditioner | None] = {}
        self._alpha_cache: dict[float, Tensor] = {}
        self._fast_cache: dict[tuple[float, int], Tensor] = {}
        self._basis: tuple[int, Tensor, Tensor] | None = None  # (steps asked, T, Q) of Θ
        self._slq: tuple[Tensor, Tensor, bool] | None = None
        self.solve_info: SolveInfo | None = None
        self.info: PredictInfo | None = None
        self.fit_info: dict | None = None

    # -- hyperparameters --------------------------------------------------------------------------
    @property
    def noise(self) -> float:
        """The likelihood variance ``σ²``."""
        return self._noise

    @noise.setter
    def noise(self, value: float) -> None:
        self._noise = _check_noise(value)

    @property
    def prior_scale(self) -> float:
        """The prior variance ``s²`` of the weights."""
        return self._prior_scale

    @prior_scale.setter
    def prior_scale(self, value: float) -> None:
        self._prior_scale = _check_prior_scale(value)

    @property
    def ridge(self) -> float:
        """``λ = σ² / s²``, the shift of the training system ``Θ + λ I``."""
        return self._noise / self._prior_scale

    def __repr__(self) -> str:
        return (
            f"NTKGP(N={self.num_train}, C={self.num_outputs}, noise={self.noise:.3g}, "
            f"prior_scale={self.prior_scale:.3g}, backend={self._backend!r}, "
            f"preconditioner={self._preconditioner_name()!r}, dtype={self.K.dtype})"
        )

    # -- training solve ---------------------------------------------------------------------------
    def _preconditioner_name(self):
        p = self._preconditioner_arg
        return p if p is None or isinstance(p, str) else getattr(p, "name", type(p).__name__)

    def preconditioner(self, lam: float | None = None) -> Preconditioner | None:
        """The preconditioner of ``Θ + λ I`` (built on first use, then reused).

        Args:
            lam: the shift ``λ`` (default the current ``σ²/s²``).
        """
        lam = self.ridge if lam is None else float(lam)
        arg = self._preconditioner_arg
        if arg is None:
            return None
        if not isinstance(arg, str):
            return arg
        key = _key(lam)
        if key in self._precond_cache:
            return self._precond_cache[key]
        base = self._base_precond
        if base is None or arg == "jacobi":
            P = build_preconditioner(self._Kb, arg, noise=lam, rank=self.rank, seed=self.seed)
            if base is None:
                self._base_precond = P
        else:
            P = base.with_noise(lam)  # same sketch / pivots, re-weighted: no products
        self._precond_cache[key] = P
        return P

    def _solve(self, rhs: Tensor, lam: float, x0: Tensor | None = None, warn: bool = True):
        return solve(
            self._Kb,
            rhs,
            noise=lam,
            preconditioner=self.preconditioner(lam),
            tol=self.tol,
            max_iter=self.max_iter,
            x0=x0,
            warn=warn,
        )

    def _alpha(self, lam: float, x0: Tensor | None = None) -> Tensor:
        """``(Θ + λ I)⁻¹ (y − f(X))``, cached per ``λ``.  # shape: (N*C,)"""
        key = _key(lam)
        hit = self._alpha_cache.get(key)
        if hit is not None:
            return hit
        if self._chol is not None and self._chol[0] == key:  # direct: exact to round-off
            alpha = self._chol[1].solve(self._r).to(self.K.dtype)
            self._alpha_cache[key] = alpha
            return alpha
        alpha, info = self._solve(self._r, lam, x0=x0)
        self.solve_info = info
        self._alpha_cache[key] = alpha
        return alpha

    def use_cholesky(self, num_columns: int) -> bool:
        """Whether exact variances for ``num_columns`` test columns take the Cholesky path."""
        if self.exact_solver != "auto":
            return self.exact_solver == "cholesky"
        n = self.n
        if self._chol is not None and self._chol[0] == _key(self.ridge):
            return True  # already factored: n² per column
        factor = n**3 / 3 + n**2 * num_columns
        if self.K.dtype != torch.float64:
            factor *= 2  # float64 multiply-adds run at about half the float32 rate
        iters = self.solve_info.iterations if self.solve_info is not None else 100
        cg = num_columns * iters * 2 * self.num_train * self.K.num_params
        est = f"~{factor:.2g} multiply-adds for the factor, ~{cg:.2g} for PCG ({iters} iterations)"
        if factor >= cg:
            log.info("NTKGP exact variances of %d columns by PCG: %s", num_columns, est)
            return False
        need = cholesky_bytes(n)
        if need > self.factor_memory // 2:
            where = self.scratch_dir or tempfile.gettempdir()
            free = free_disk_bytes(where)
            if need >= 0.9 * free:
                log.warning(
                    "NTKGP exact variances by PCG: the Cholesky factor would be cheaper (%s) but needs "
                    "%.1f GiB of disk and %s has %.1f GiB free; pass scratch_dir= on a larger disk",
                    est, need / 2**30, where, free / 2**30,
                )
                return False
        log.info("NTKGP exact variances of %d columns by a tiled Cholesky factor: %s", num_columns, est)
        return True

    def cholesky(self, lam: float | None = None) -> TiledCholesky:
        """The tiled float64 Cholesky factor of ``Θ + λ I`` (computed on first use; one ``λ`` kept)."""
        lam = self.ridge if lam is None else float(lam)
        key = _key(lam)
        if self._chol is not None and self._chol[0] == key:
            return self._chol[1]
        if self._chol is not None:
            self._chol[1].close()
            self._chol = None
        chol = TiledCholesky(
            self.K,
            lam,
            dtype=torch.float64,
            memory_budget=self.factor_memory,
            scratch_dir=self.scratch_dir,
            progress=self.progress,
        )
        self._chol = (key, chol)
        self._alpha_cache.pop(key, None)  # the direct solve replaces an iterative one
        return chol

    def representer_weights(self) -> Tensor:
        """``(Θ + λ I)⁻¹ (y − f(X))`` at the current hyperparameters.  # shape: (N, C)"""
        return self._alpha(self.ridge).reshape(self.num_train, self.num_outputs)

    # -- prediction -----------------------------------------------------------------------------
    def _forward(self, X: Tensor) -> Tensor:
        """``f(X)`` of the frozen network, in chunks, without a graph.  # shape: (n, C)"""
        C = self.num_outputs
        with torch.no_grad():
            out = [self._model(X[sl]).reshape(-1, C) for sl in chunks(X.shape[0], self.K.chunk_size)]
        return torch.cat(out).to(self.K.dtype)

    def _operator(self, X1: Tensor, X2: Tensor | None = None) -> NTKOperator:
        return NTKOperator(self._model, X1, X2, backend=self._backend, **self._operator_kwargs)

    def predict(
        self, X_test: Tensor, mode: str = "exact", return_var: bool = True
    ) -> tuple[Tensor, Tensor] | Tensor:
        """Posterior mean and marginal variances at ``X_test``.

        Args:
            X_test: test inputs.  # shape: (M, *in_shape)
            mode: ``"exact"`` (batched PCG on the columns of ``ΘX*``, with the one
                preconditioner) or ``"fast"`` (the rank-``fast_rank`` Lanczos cache, built once
                per ``λ``; never below the exact variances).
            return_var: also compute the variances; if ``False`` only the mean is returned.

        Returns:
            ``(mean, var)``, each of shape (M, C); or ``mean`` alone with ``return_var=False``.
            Variances that come out negative by round-off are clamped at 0 with a
            :class:`NegativeVarianceWarning`. :attr:`info` records the stages' times.
        """
        if mode not in ("exact", "fast"):
            raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
        lam, s2, C = self.ridge, self.prior_scale, self.num_outputs
        info = PredictInfo(mode=mode if return_var else None)
        self.info = info
        t0 = time.perf_counter()
        Ksx = self._operator(X_test, self.X)  # shape: (M*C, N*C)
        M = Ksx.X1.shape[0]
        direct = return_var and mode == "exact" and self.use_cholesky(M * C)
        if direct:
            chol = self.cholesky(lam)
            info.factor = chol.info
            info.seconds["factor"] = time.perf_counter() - t0
        alpha = self._alpha(lam)
        mean = self._forward(Ksx.X1) + (Ksx @ alpha).reshape(M, C)  # shape: (M, C)
        info.seconds["mean"] = time.perf_counter() - t0
        if not return_var:
            return mean
        t0 = time.perf_counter()
        Kss = self._operator(Ksx.X1)
        prior = (Kss.to(torch.float64) if direct else Kss).diagonal().detach()  # shape: (M*C,)
        info.seconds["diag"] = time.perf_counter() - t0
        if mode == "exact":
            t0 = time.perf_counter()
            info.solver = "cholesky" if direct else "cg"
            quad = self._direct_quadratic(Ksx, chol) if direct else self._exact_quadratic(Ksx, lam, info)
            info.seconds["variance"] = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            R = self._lanczos_cache(lam, self.fast_rank)
            info.fast_rank = R.shape[1]
            info.seconds["lanczos"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            quad = self._fast_quadratic(Ksx, R)
            info.seconds["variance"] = time.perf_counter() - t0
        var = self._clamp(s2 * (prior - quad), s2 * prior, info).to(self.K.dtype)
        return mean, var.reshape(M, C)

    def _exact_quadratic(self, Ksx: NTKOperator, lam: float, info: PredictInfo) -> Tensor:
        """``diag(Θ*X (Θ + λ I)⁻¹ ΘX*)`` by PCG on blocks of columns.  # shape: (M*C,)"""
        C = self.num_outputs
        M = Ksx.X1.shape[0]
        Kxs = Ksx.mT  # shape: (N*C, M*C)
        P = self.preconditioner(lam)
        per_block = max(1, self.block_size // C)  # test points per block
        quad = torch.empty(M * C, dtype=self.K.dtype, device=self.K.device)
        worst, ok = 0.0, True
        starts = range(0, M, per_block)
        for s in tqdm(starts, desc="NTKGP variances", disable=not self.progress, leave=False):
            cols = slice(s * C, min(M, s + per_block) * C)
            Kb = to_dense(Kxs[:, cols]).detach()  # shape: (N*C, b*C)
            Z, sinfo = solve(
                self._Kb, Kb, noise=lam, preconditioner=P, tol=self.tol, max_iter=self.max_iter, warn=False
            )
            quad[cols] = (Kb * Z).sum(0)
            info.solve_iterations.append(sinfo.iterations)
            ok = ok and sinfo.converged
            worst = max(worst, sinfo.residual_norm.max().item())
        info.converged, info.max_residual = ok, worst
        if not ok:
            warnings.warn(
                f"NTKGP variances: CG did not reach tol {self.tol:.0e} on every block (largest "
                f"relative residual {worst:.1e}); raise max_iter (now {self.max_iter}) or the "
                f"preconditioner's rank (now rank={self.rank}), or use preconditioner='nystrom'",
                ConvergenceWarning,
                stacklevel=3,
            )
        return quad

    def _direct_quadratic(self, Ksx: NTKOperator, chol: TiledCholesky) -> Tensor:
        """``‖L⁻¹ ΘX*‖²`` per test row, in blocks of test columns.  # shape: (M*C,)"""
        C, n = self.num_outputs, self.n
        M = Ksx.X1.shape[0]
        Kxs = Ksx.mT.to(torch.float64)  # shape: (N*C, M*C)
        # a block of test columns (n × b) takes a quarter of the budget; the cross kernel is
        # computed in row chunks of the training rows that take another sixteenth
        per_block = max(1, self.factor_memory // (4 * n * 8 * C))
        rows = max(C, self.factor_memory // (16 * per_block * C * 8))
        rows -= rows % C
        quad = torch.empty(M * C, dtype=torch.float64, device=self.K.device)
        starts = range(0, M, per_block)
        for s in tqdm(starts, desc="NTKGP variances", disable=not self.progress, leave=False):
            c0, c1 = s * C, min(M, s + per_block) * C
            B = torch.empty(n, c1 - c0, dtype=torch.float64, device=self.K.device)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                B[r0:r1] = to_dense(Kxs[r0:r1, c0:c1]).detach()
            quad[c0:c1] = chol.inv_quad(B)
            del B
        return quad

    def _lanczos_cache(self, lam: float, rank: int) -> Tensor:
        """``R`` with ``R Rᵀ = Q (T + λ I)⁻¹ Qᵀ ≈ (Θ + λ I)⁻¹`` from ``rank`` Lanczos steps on ``Θ``.

        Krylov spaces are shift-invariant and the first ``r`` steps of a longer run are the
        ``r``-step run, so one basis (``Q``, ``T`` of ``Θ`` itself) serves every ``λ`` and every
        rank up to the longest computed: changing the noise or lowering the rank costs no products.

        Returns:
            ``R``, cached per ``(λ, rank)``.  # shape: (N*C, r)
        """
        key = (_key(lam), rank)
        hit = self._fast_cache.get(key)
        if hit is not None:
            return hit
        m = min(rank, self.n)
        if self._basis is None or self._basis[0] < m:
            T, Q = lanczos(self._Kb, num_iter=m, noise=0.0, seed=self.seed)  # may stop early (breakdown)
            self._basis = (m, T, Q)
        _, T, Q = self._basis
        m = min(m, T.shape[0])
        theta, S = torch.linalg.eigh(T[:m, :m] + lam * torch.eye(m, dtype=T.dtype, device=T.device))
        # Ritz values of a PSD operator are ≥ λ ≥ 0; drop numerically zero ones (λ = 0, singular Θ).
        keep = theta > theta.max().clamp_min(0) * m * torch.finfo(T.dtype).eps
        R = Q[:, :m] @ (S[:, keep] * theta[keep].rsqrt())  # shape: (N*C, r)
        if len(self._fast_cache) >= 2:  # each R is N C × r: keep the two most recent
            self._fast_cache.pop(next(iter(self._fast_cache)))
        self._fast_cache[key] = R
        return R

    def _fast_quadratic(self, Ksx: NTKOperator, R: Tensor) -> Tensor:
        """``‖Rᵀ ΘX*‖²`` per test row.  # shape: (M*C,)

        Either products ``Θ*X R`` in blocks of columns of ``R`` (each column costs a pass over the
        training data), or — with the factor backends, when ``R`` has many columns — explicit
        row blocks of ``Θ*X`` (GEMMs over the layer factors) multiplied by ``R``; whichever
        costs fewer multiply-adds.
        """
        rows_total, n = Ksx.shape
        r = R.shape[1]
        quad = torch.zeros(rows_total, dtype=R.dtype, device=R.device)
        if self._explicit_cross_cheaper(rows_total, r):
            C = self.num_outputs
            budget = self._operator_kwargs.get("memory_budget") or 256 * 2**20
            rows = max(C, budget // (2 * n * R.element_size()))  # the block and one temporary
            rows -= rows % C
            for r0 in range(0, rows_total, rows):
                B = to_dense(Ksx[r0 : r0 + rows]).detach()  # shape: (rows, N*C)
                quad[r0 : r0 + rows] = (B @ R).square().sum(1)
                del B
            return quad
        for sl in chunks(r, self.block_size):
            quad += (Ksx @ R[:, sl].contiguous()).detach().square().sum(1)
        return quad

    def _explicit_cross_cheaper(self, test_rows: int, r: int) -> bool:
        """Multiply-add estimate: ``r`` products ``r P (N + M)`` against explicit blocks
        ``M C · N C · (r + 2 √P)`` (the Gram GEMMs cost about ``Σ_l o_l ≈ 2 √P`` per entry)."""
        if self._backend not in ("structured", "keops", "cuda"):
            return False  # explicit blocks go through Jacobians there: no cheaper than products
        N, C, P = self.num_train, self.num_outputs, self.K.num_params
        M = test_rows // C
        return r * P * (N + M) > test_rows * N * C * (r + 2 * math.sqrt(P))

    def _clamp(self, var: Tensor, scale: Tensor, info: PredictInfo) -> Tensor:
        neg = var < 0
        count = int(neg.sum())
        if count:
            worst = var.min().item()
            rel = (var[neg] / scale[neg].clamp_min(torch.finfo(var.dtype).tiny)).min().item()
            info.clamped, info.most_negative = count, worst
            if info.solver == "cholesky":
                hint = "the factor is float64 already: add noise"
            elif var.dtype != torch.float64:
                hint = "compute in float64 (dtype=torch.float64) or tighten tol"
            else:
                hint = f"tighten tol (now {self.tol:.0e}) or add noise"
            warnings.warn(
                f"NTKGP: {count} of {var.numel()} posterior variances came out negative (most "
                f"negative {worst:.3e}, {rel:.1e} relative to the prior variance s²·Θ**) and were "
                f"clamped at 0; this is round-off in Θ** − Θ*X (Θ + λI)⁻¹ ΘX*: {hint}",
                NegativeVarianceWarning,
                stacklevel=3,
            )
        return var.clamp_min(0.0)

    def variance_error(self, X_test: Tensor, fast_rank: int | None = None) -> dict:
        """How far the fast variances are from the exact ones on ``X_test`` (e.g. a subset).

        Args:
            X_test: test inputs to compare on.  # shape: (M, *in_shape)
            fast_rank: Lanczos rank of the fast variances (default :attr:`fast_rank`).

        Returns:
            A dict with ``median_relative_error`` and ``max_relative_error`` (of
            ``|fast − exact| / exact`` over entries with ``exact > 0``), ``fast_rank``, and the
            two variance arrays ``fast`` and ``exact`` of shape (M, C).
        """
        saved = self.fast_rank
        if fast_rank is not None:
            self.fast_rank = _check_positive_int(fast_rank, "fast_rank", DEFAULT_FAST_RANK)
        try:
            _, fast = self.predict(X_test, mode="fast")
            rank = self.info.fast_rank
            _, exact = self.predict(X_test, mode="exact")
        finally:
            self.fast_rank = saved
        pos = exact > 0
        rel = (fast[pos] - exact[pos]).abs() / exact[pos]
        return {
            "median_relative_error": rel.median().item() if rel.numel() else float("nan"),
            "max_relative_error": rel.max().item() if rel.numel() else float("nan"),
            "fast_rank": rank,
            "fast": fast,
            "exact": exact,
        }

    # -- marginal likelihood ----------------------------------------------------------------------
    def _slq_nodes(self) -> tuple[Tensor, Tensor, bool]:
        """Ritz values and weights of ``Θ`` (noise 0) from fixed probes, computed once.

        Krylov spaces are shift-invariant, so ``logdet(Θ + λ I) ≈ n · mean Σ_j τ_j log(θ_j + λ)``
        for every ``λ`` from this one run.

        Returns:
            ``(theta, weights, exact)``: each of the first two of shape (b, m); ``exact`` when
            the probes are the ``n`` unit vectors (the trace is then not estimated).
        """
        if self._slq is not None:
            return self._slq
        n = self.n
        m = min(n, 100) if self.num_iter is None else min(self.num_iter, n)
        dtype, device = self.K.dtype, self.K.device
        exact = self.num_probes >= n
        if exact:
            Z = torch.eye(n, dtype=dtype, device=device)
        else:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            Z = torch.randint(0, 2, (n, self.num_probes), generator=gen, device=device).to(dtype) * 2 - 1
        T, _ = lanczos(self._Kb, num_iter=m, v0=Z, noise=0.0, seed=self.seed)  # T: (b, m, m)
        theta, S = torch.linalg.eigh(T)
        self._slq = (theta.clamp_min(0), S[:, 0, :].square(), exact)
        return self._slq

    def _logdet(self, lam: float) -> tuple[float, float]:
        """SLQ ``logdet(Θ + λ I)`` and its standard error over probes (0 for exact probes)."""
        theta, weights, exact = self._slq_nodes()
        logs = torch.log(theta + lam)
        per_probe = self.n * torch.where(weights > 0, weights * logs, torch.zeros_like(logs)).sum(-1)
        b = per_probe.numel()
        stderr = 0.0 if exact else ((per_probe.std() / math.sqrt(b)).item() if b > 1 else math.nan)
        return per_probe.mean().item(), stderr

    def _lml(self, noise: float, prior_scale: float, x0: Tensor | None = None) -> tuple[float, dict]:
        n = self.n
        lam = noise / prior_scale
        alpha = self._alpha(lam, x0=x0)
        quad = torch.dot(self._r, alpha).item() / prior_scale  # rᵀ (s²Θ + σ²I)⁻¹ r
        ld_theta, stderr = self._logdet(lam)
        ld = n * math.log(prior_scale) + ld_theta  # logdet(s²Θ + σ²I)
        value = -0.5 * quad - 0.5 * ld - 0.5 * n * math.log(2 * math.pi)
        return value, {"quadratic": quad, "logdet": ld, "logdet_stderr": stderr, "value": value}

    def log_marginal_likelihood(
        self, noise: float | None = None, prior_scale: float | None = None, return_info: bool = False
    ) -> float | tuple[float, dict]:
        """``log p(y | X) = log N(y − f(X); 0, s² Θ + σ² I)`` of the linearized network.

        ``−½ rᵀ(s²Θ + σ²I)⁻¹ r − ½ logdet(s²Θ + σ²I) − (NC/2) log 2π`` with ``r = y − f(X)``: the
        quadratic term from the cached CG solve ``(Θ + λ I)⁻¹ r`` (divided by ``s²``), the
        log-determinant as ``NC log s² + logdet(Θ + λ I)`` by stochastic Lanczos quadrature
        from one fixed set of probes (so values at different hyperparameters are comparable).

        Args:
            noise: ``σ²`` (default the GP's).
            prior_scale: ``s²`` (default the GP's).
            return_info: also return a dict with ``quadratic``, ``logdet``, ``logdet_stderr``
                (the probe standard error of the SLQ estimate; 0 with exact probes) and ``value``.

        Returns:
            The log marginal likelihood (a float), or ``(value, info)``.
        """
        noise = self.noise if noise is None else _check_noise(noise)
        prior_scale = self.prior_scale if prior_scale is None else _check_prior_scale(prior_scale)
        value, info = self._lml(noise, prior_scale)
        return (value, info) if return_info else value

    def fit_hyperparameters(
        self,
        optimize: tuple[str, ...] | str = ("noise", "prior_scale"),
        ridge_range: tuple[float, float] = (1e-6, 1e2),
        grid_size: int = 17,
        refine_steps: int = 20,
        update: bool = True,
    ) -> tuple[float, float]:
        """Maximize the log marginal likelihood over ``(log σ², log s²)``.

        For a fixed ratio ``λ = σ²/s²`` the likelihood is concave in ``log s²`` with maximizer
        ``s² = rᵀ(Θ + λ I)⁻¹ r / (N C)``, so the 2-D problem is a 1-D search over ``log λ``
        (the profile likelihood): a log-spaced grid of ``grid_size`` points over
        ``ridge_range × mean(diag Θ)``, then golden-section refinement in the best grid
        point's bracket. Each evaluation is one warm-started PCG solve (the preconditioner is
        re-shifted, not rebuilt); the log-determinant comes for every ``λ`` from one SLQ run.
        With only ``"noise"`` (``s²`` fixed) or only ``"prior_scale"`` (``σ²`` fixed) the search
        is over ``λ`` with the other held.

        Args:
            optimize: which of ``"noise"`` and ``"prior_scale"`` to fit.
            ridge_range: the range of ``λ / mean(diag Θ)`` searched.
            grid_size: points of the initial grid, ≥ 3.
            refine_steps: golden-section steps (each shrinks the bracket by 0.618).
            update: set the GP's ``noise`` and ``prior_scale`` to the result.

        Returns:
            ``(noise, prior_scale)``. The result never has a lower likelihood than the starting
            hyperparameters (if the search finds nothing better, they are kept).
            :attr:`fit_info` records the start, the result and every evaluation.
        """
        opt = {optimize} if isinstance(optimize, str) else set(optimize)
        if not opt or not opt <= {"noise", "prior_scale"}:
            raise ValueError(f"optimize must name 'noise' and/or 'prior_scale', got {optimize!r}")
        lo, hi = ridge_range
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"ridge_range must be (lo, hi) with 0 < lo < hi < inf, got {ridge_range!r}")
        grid_size = _check_positive_int(grid_size, "grid_size", 17)
        if grid_size < 3:
            raise ValueError(f"grid_size must be >= 3, got {grid_size}")
        if opt == {"prior_scale"} and self.noise == 0:
            raise ValueError("fitting prior_scale alone needs noise > 0 (λ = σ²/s² would be 0)")
        start = time.perf_counter()
        n = self.n
        s2_fixed, sigma2_fixed = self.prior_scale, self.noise
        history: list[tuple[float, float, float]] = []
        cache: dict[float, float] = {}

        def hyper(log_lam: float) -> tuple[float, float]:
            lam = math.exp(log_lam)
            if opt == {"noise"}:
                return lam * s2_fixed, s2_fixed
            if opt == {"prior_scale"}:
                return sigma2_fixed, sigma2_fixed / lam
            q = torch.dot(self._r, self._alpha(lam, x0=nearest(lam))).item()  # rᵀ(Θ + λI)⁻¹r
            s2 = max(q / n, torch.finfo(self.K.dtype).tiny)
            return lam * s2, s2

        def nearest(lam: float) -> Tensor | None:
            if not self._alpha_cache:
                return None
            key = min(self._alpha_cache, key=lambda k: abs(math.log(max(k, 1e-300)) - math.log(lam)))
            return self._alpha_cache[key]

        def objective(log_lam: float) -> float:
            if log_lam in cache:
                return cache[log_lam]
            sigma2, s2 = hyper(log_lam)
            value, _ = self._lml(sigma2, s2, x0=nearest(math.exp(log_lam)))
            history.append((sigma2, s2, value))
            cache[log_lam] = value
            return value

        initial = self._lml(self.noise, self.prior_scale)[0]
        dbar = self.K.diagonal().detach().mean().clamp_min(torch.finfo(self.K.dtype).tiny).item()
        grid = torch.linspace(math.log(lo * dbar), math.log(hi * dbar), grid_size, dtype=torch.float64).tolist()
        values = [objective(g) for g in grid]
        i = max(range(grid_size), key=lambda j: values[j])
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid_size - 1)]
        golden = (math.sqrt(5) - 1) / 2
        c, d = b - golden * (b - a), a + golden * (b - a)
        fc, fd = objective(c), objective(d)
        for _ in range(int(refine_steps)):
            if fc >= fd:
                b, d, fd = d, c, fc
                c = b - golden * (b - a)
                fc = objective(c)
            else:
                a, c, fc = c, d, fd
                d = a + golden * (b - a)
                fd = objective(d)
        best_log = max(cache, key=cache.get)
        best_value = cache[best_log]
        if best_value >= initial:
            sigma2, s2 = hyper(best_log)
        else:
            sigma2, s2, best_value = self.noise, self.prior_scale, initial
        # keep the caches of the start and the result only
        keep = {_key(self.ridge), _key(sigma2 / s2)}
        self._alpha_cache = {k: v for k, v in self._alpha_cache.items() if k in keep}
        self._precond_cache = {k: v for k, v in self._precond_cache.items() if k in keep}
        self.fit_info = {
            "initial": {"noise": self.noise, "prior_scale": self.prior_scale, "lml": initial},
            "result": {"noise": sigma2, "prior_scale": s2, "lml": best_value},
            "evaluations": history,
            "optimized": sorted(opt),
            "seconds": time.perf_counter() - start,
        }
        if update:
            self.noise, self.prior_scale = sigma2, s2
        return sigma2, s2


class ColumnBlockedOperator(LinearOperator):
    """A square operator whose products go through ``block`` right-hand-side columns at a time.

    The NTK backends' products take memory linear in the number of columns (a structured
    product at N = 5,000 with 512-wide layers holds ~10 MB per column in float32), and
    :func:`ntkscale.solvers.build_preconditioner` multiplies by ``rank`` columns at once. This
    wrapper keeps every product within ``block`` columns; diagonals and rows are the wrapped
    operator's own.

    Args:
        K: a square ``LinearOperator`` (e.g. an :class:`ntkscale.NTKOperator`).  # shape: (n, n)
        block: the most columns per product with ``K``.
    """

    def __init__(self, K, block: int = DEFAULT_BLOCK):
        super().__init__(K, block=block)
        self.base, self.block = K, int(block)

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def _size(self) -> torch.Size:
        return self.base.shape

    def _transpose_nonbatch(self):
        return ColumnBlockedOperator(self.base.mT, block=self.block)

    def _matmul(self, rhs: Tensor) -> Tensor:
        if rhs.dim() == 1 or rhs.shape[-1] <= self.block:
            return self.base.matmul(rhs)
        return torch.cat(
            [self.base.matmul(rhs[:, sl].contiguous()) for sl in chunks(rhs.shape[-1], self.block)], dim=-1
        )

    def _diagonal(self) -> Tensor:
        return self.base.diagonal()

    def _getitem(self, row_index, col_index, *batch_indices):
        return self.base._getitem(row_index, col_index, *batch_indices)

    def _get_indices(self, row_index, col_index, *batch_indices):
        return self.base._get_indices(row_index, col_index, *batch_indices)

    def to_dense(self) -> Tensor:
        return to_dense(self.base)

    def _bilinear_derivative(self, left_vecs, right_vecs):
        raise NotImplementedError("ColumnBlockedOperator is not differentiable")


# -- the GGN kernel for classification ------------------------------------------------------------


class GGNKernel(LinearOperator):
    """``Λ^{1/2} Θ Λ^{1/2}`` for a block-diagonal ``Λ^{1/2}`` with C×C blocks, lazily.

    Built by :func:`ggn_kernel`. Products are three steps (block multiply, ``Θ @``, block
    multiply); the diagonal is exact, from the C×C diagonal blocks of ``Θ`` taken a chunk of
    samples at a time (``Θ[s:e, s:e]`` for contiguous row ranges); rows (``[idx, :]``) are
    products with unit vectors.

    Args:
        K: the square kernel ``Θ``, rows ordered (sample, output).  # shape: (N*C, N*C)
        sqrt_lambda: the symmetric square roots ``Λ_i^{1/2}``.  # shape: (N, C, C)
    """

    def __init__(self, K, sqrt_lambda: Tensor, diag_chunk: int = 256):
        super().__init__(K, sqrt_lambda, diag_chunk=diag_chunk)
        self.K, self.S, self.diag_chunk = K, sqrt_lambda, diag_chunk

    def _size(self) -> torch.Size:
        return self.K.shape

    def _transpose_nonbatch(self) -> "GGNKernel":
        return self

    def _block(self, V: Tensor) -> Tensor:
        """Block-diagonal product ``Λ^{1/2} V``.  # V shape: (N*C, k)"""
        N, C, _ = self.S.shape
        return torch.bmm(self.S, V.reshape(N, C, -1)).reshape(N * C, -1)

    def _matmul(self, rhs: Tensor) -> Tensor:
        vec = rhs.dim() == 1
        V = rhs.unsqueeze(-1) if vec else rhs
        out = self._block(self.K.matmul(self._block(V)))
        return out.squeeze(-1) if vec else out

    def _diagonal(self) -> Tensor:
        N, C, _ = self.S.shape
        out = []
        for sl in chunks(N, self.diag_chunk):
            s, e = sl.start, sl.stop
            Kb = to_dense(self.K[s * C : e * C, s * C : e * C]).reshape(e - s, C, e - s, C)
            idx = torch.arange(e - s, device=Kb.device)
            B = Kb[idx, :, idx, :]  # shape: (b, C, C), the diagonal blocks
            S = self.S[sl]
            out.append(torch.einsum("bij,bjk,bik->bi", S, B, S))  # diag(S B S)
        return torch.cat(out).reshape(-1)

    def _rows(self, idx: Tensor) -> Tensor:
        """Dense rows ``self[idx, :]``: products with unit vectors (the operator is symmetric)."""
        n = self.shape[-1]
        E = torch.zeros(n, idx.numel(), dtype=self.S.dtype, device=self.S.device)
        E[idx.to(E.device), torch.arange(idx.numel(), device=E.device)] = 1.0
        return self._matmul(E).mT

    def _getitem(self, row_index, col_index, *batch_indices):
        from linear_operator.operators import DenseLinearOperator

        rows = torch.arange(self.shape[0])[row_index].reshape(-1)
        return DenseLinearOperator(self._rows(rows)[..., col_index])

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        row_index, col_index = torch.broadcast_tensors(row_index, col_index)
        r_u, r_inv = torch.unique(row_index.reshape(-1).cpu(), return_inverse=True)
        block = self._rows(r_u)  # shape: (u, n)
        return block[r_inv.to(block.device), col_index.reshape(-1).to(block.device)].reshape(row_index.shape)

    def to_dense(self) -> Tensor:
        """The explicit matrix (N*C, N*C): one product with the identity."""
        n = self.shape[-1]
        return self._matmul(torch.eye(n, dtype=self.S.dtype, device=self.S.device))


def ggn_kernel(K, probs: Tensor) -> GGNKernel:
    """The generalized Gauss–Newton kernel ``Λ^{1/2} Θ Λ^{1/2}`` of a softmax likelihood.

    ``Λ = blockdiag(Λ_1, …, Λ_N)`` with ``Λ_i = diag(p_i) − p_i p_iᵀ``, the Hessian of the
    cross-entropy with respect to the logits of sample i. Its symmetric square root is taken per
    block by ``eigh`` (eigenvalues clamped at 0: ``Λ_i`` is PSD with one zero eigenvalue along
    the all-ones vector).

    Args:
        K: the NTK ``Θ`` (or any symmetric ``LinearOperator``), rows ordered (sample, output).
            # shape: (N*C, N*C)
        probs: softmax probabilities, rows summing to 1.  # shape: (N, C)

    Returns:
        A :class:`GGNKernel` of shape (N*C, N*C).

    Raises:
        ValueError: ``probs`` is not (N, C) matching ``K``, has NaN/inf, negative entries, or
            rows not summing to 1 (to 1e-4).

    Example:
        >>> import torch
        >>> from linear_operator.operators import DenseLinearOperator
        >>> J = torch.randn(6, 10, dtype=torch.float64)
        >>> p = torch.softmax(torch.randn(2, 3, dtype=torch.float64), -1)
        >>> G = ggn_kernel(DenseLinearOperator(J @ J.T), p)
        >>> G.shape, bool(torch.allclose(G.diagonal(), G.to_dense().diagonal()))
        (torch.Size([6, 6]), True)
    """
    if not torch.is_tensor(probs) or probs.dim() != 2:
        shape = tuple(probs.shape) if torch.is_tensor(probs) else type(probs).__name__
        raise ValueError(f"probs must be a tensor of shape (N, C), got {shape}")
    N, C = probs.shape
    if torch.is_tensor(K):
        from linear_operator.operators import DenseLinearOperator

        K = DenseLinearOperator(K)
    n = K.shape[-1]
    if len(K.shape) != 2 or K.shape[0] != n or n != N * C:
        raise ValueError(
            f"K must be square of size N*C = {N}*{C} = {N * C} to match probs of shape {(N, C)}, "
            f"got shape {tuple(K.shape)}"
        )
    probs = probs.detach().to(dtype=K.dtype, device=K.device)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("probs contains NaN or inf")
    if bool((probs < 0).any()) or not torch.allclose(probs.sum(-1), torch.ones_like(probs[:, 0]), atol=1e-4):
        raise ValueError("probs must be probabilities: entries >= 0 and rows summing to 1 (softmax outputs)")
    Lam = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)  # shape: (N, C, C)
    evals, evecs = torch.linalg.eigh(Lam)
    S = (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ evecs.mT  # shape: (N, C, C)
    return GGNKernel(K, 0.5 * (S + S.mT))


# -- helpers ----------------------------------------------------------------------------------------


def _key(lam: float) -> float:
    """Cache key of a shift: ``λ`` to 12 significant digits (``σ²/s²`` round-off is not a miss)."""
    return float(f"{float(lam):.12g}")


def _frozen_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A copy of the network at its current weights, without gradients (cast to ``dtype``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"NTKGP(model, X, y, ...): model must be a torch.nn.Module, got {type(model).__name__}")
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.grad = None
    if dtype is not None:
        frozen = frozen.to(dtype)
    return frozen


def _check_targets(y, N: int, C: int, dtype: torch.dtype, device) -> Tensor:
    if not torch.is_tensor(y):
        raise ValueError(f"y must be a torch.Tensor of shape ({N}, {C}), got {type(y).__name__}")
    expected = f"({N}, {C})" + (f" or ({N},)" if C == 1 else "")
    if y.dim() == 1 and C == 1 and y.shape[0] == N:
        y = y.unsqueeze(-1)
    if tuple(y.shape) != (N, C):
        raise ValueError(
            f"y must have shape {expected} (N samples x C model outputs), got {tuple(y.shape)}"
        )
    if y.is_complex() or not (y.is_floating_point() or y.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"y must be real-valued, got dtype {y.dtype}")
    y = y.detach().to(dtype=dtype, device=device)
    bad = ~torch.isfinite(y)
    if bool(bad.any()):
        first = int(bad.any(-1).nonzero()[0])
        raise ValueError(f"y contains NaN or inf ({int(bad.sum())} entries, first in sample {first})")
    return y


def _check_noise(noise) -> float:
    if torch.is_tensor(noise):
        noise = noise.item()
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise (the likelihood variance σ²) must be a finite float >= 0, got {noise!r}")
    return float(noise)


def _check_prior_scale(prior_scale) -> float:
    if torch.is_tensor(prior_scale):
        prior_scale = prior_scale.item()
    if (
        isinstance(prior_scale, bool)
        or not isinstance(prior_scale, (int, float))
        or not math.isfinite(prior_scale)
        or prior_scale <= 0
    ):
        raise ValueError(
            f"prior_scale (the prior variance s² of the weights) must be a finite float > 0, got {prior_scale!r}"
        )
    return float(prior_scale)


def _check_tol(tol) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol (the relative CG residual tolerance) must be a finite float > 0, got {tol!r}")
    return float(tol)


def _check_positive_int(value, name: str, default):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value
