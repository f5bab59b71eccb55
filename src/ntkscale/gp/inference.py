"""GP regression on any kernel operator: posterior mean, variances, pathwise samples, evidences.

The model is ``r = y − m(X) ~ N(0, s² K + σ² I)`` with a train kernel ``K`` (any square PSD
``linear_operator.LinearOperator``), prior variance ``s²`` (``prior_scale``) and noise ``σ²``;
``λ = σ²/s²``. With the cross-kernel ``K*X`` (any ``(m, n)`` operator) and the test prior
diagonal ``diag K**``::

    mean correction  K*X (K + λ I)⁻¹ r
    variance         s² [diag K** − diag(K*X (K + λ I)⁻¹ KX*)]
    pathwise sample  f* − K*X (K + λ I)⁻¹ (f_X + ε)   for a joint prior sample (f_X, f*) and
                     ε ~ N(0, σ² I) (Matheron's rule; Wilson et al. 2020)

Nothing here knows what the operators are: products, the diagonal, explicit blocks
(``K[rows, cols]``) and, where an operator offers them, cost estimates
(:mod:`ntkscale.gp.operators`). :class:`KernelGP` keeps what is worth keeping between calls —
one preconditioner per ``λ`` (re-shifted, not rebuilt), the training solve per ``λ``, one
:class:`ntkscale.solvers.LanczosBasis` and one :class:`ntkscale.solvers.StochasticLogdet` for every
``λ``, and a tiled Cholesky factor for one ``λ``.

Sharded kernels: every sum over the rows of ``K`` (inner products, the mean's and the variances'
contractions with the cross-kernel, the evidences' quadratic terms) goes through
:func:`ntkscale.solvers.reductions`, as the solvers' own do. So a ``K`` whose rows are sharded over
``torch.distributed`` ranks (:class:`ntkscale.distributed.NTKOperator`) works unchanged: each rank
passes its rows of the residual and its columns of the cross-kernel (``K.cross(X_test).mT``,
shape ``(m, n_r)``), every call is collective, and means, variances and evidences come out the
same on every rank. The Cholesky routes need all of ``K`` in one process and are refused there.

Example:
    >>> import torch
    >>> from linear_operator.operators import DenseLinearOperator
    >>> _ = torch.manual_seed(0)
    >>> X, Xs = torch.randn(30, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    >>> rbf = lambda a, b: torch.exp(-0.5 * torch.cdist(a, b).square())
    >>> post = KernelGP(DenseLinearOperator(rbf(X, X)), torch.sin(X[:, 0]), noise=0.01)
    >>> var = post.variance(DenseLinearOperator(rbf(Xs, X)), torch.ones(4, dtype=torch.float64))
    >>> var.shape, bool((var >= 0).all())
    (torch.Size([4]), True)
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import warnings

import torch
from linear_operator import to_dense
from linear_operator.operators import DenseLinearOperator
from torch import Tensor
from tqdm.auto import tqdm

from ..solvers import (
    ConvergenceWarning,
    LanczosBasis,
    Preconditioner,
    StochasticLogdet,
    TiledCholesky,
    build_preconditioner,
    reductions,
    solve,
)
from ..functional import chunks
from ..solvers.cholesky import DEFAULT_MEMORY as DEFAULT_FACTOR_MEMORY
from ..solvers.cholesky import cholesky_bytes, free_disk_bytes
from ..solvers.krylov import warn_rank
from ._checks import check_noise, check_positive_int, check_prior_scale, check_tol, key
from .evidence import EvidenceMixin, HyperparameterWarning
from .operators import DEFAULT_BLOCK, ColumnBlockedOperator, block_cost, product_cost
from .results import FitInfo, PredictInfo

__all__ = ["HyperparameterWarning", "KernelGP", "NegativeVarianceWarning"]  # the warning: re-exported

log = logging.getLogger("ntkscale")

DEFAULT_FAST_RANK = 100  # Lanczos (LOVE) rank of the fast variances
DEFAULT_PROBES = 30  # SLQ probes of the log-determinant


class NegativeVarianceWarning(UserWarning):
    """Posterior variances came out negative by round-off and were clamped at 0."""


class KernelGP(EvidenceMixin):
    """Posterior algebra of GP regression with kernel ``s² K`` and noise ``σ²``, matrix-free.

    Args:
        K: the train kernel, square PSD (a ``LinearOperator`` or a dense tensor).  # shape: (n, n)
        residual: ``y − m(X)``, the targets minus the prior mean.  # shape: (n,) (or any shape with n entries)
        noise: ``σ² ≥ 0``.
        prior_scale: ``s² > 0``.
        preconditioner: ``"nystrom"``, ``"pivchol"``, ``"jacobi"``, ``None`` or a ready
            :class:`ntkscale.solvers.Preconditioner` of ``K + λ I`` (used as given). A named one is
            built once and re-shifted (not rebuilt) for every other ``λ``.
        rank: rank of the ``"nystrom"``/``"pivchol"`` preconditioner. Default ``None``: for
            ``"nystrom"`` chosen adaptively at the first ``λ > 0`` (see
            :class:`ntkscale.solvers.NystromPreconditioner`; the rank reached is
            :attr:`preconditioner_rank`), else 100.
        tol: relative residual tolerance of the CG solves (default 1e-4 in float32, 1e-8 in float64).
        max_iter: cap on CG iterations per solve (default ``min(n, 1000)``).
        fast_rank: Lanczos rank of the fast variances (default 100, capped at ``n``).
        block_size: right-hand-side columns per product with ``K`` and per PCG block (default 32).
        num_probes: SLQ probes (default 30; ``≥ n``: the unit vectors, exact trace).
        num_iter: Lanczos steps per SLQ probe (default ``min(n, 100)``).
        seed: seed of the Nyström sketch, the Lanczos start vector and the SLQ probes.
        exact_solver: ``"cg"``, ``"cholesky"`` or ``"auto"`` (the cheaper by multiply-adds).
        factor_memory: bytes the Cholesky factorization may hold in memory (default 2 GiB).
        scratch_dir: directory of the factor's panels (default a temporary one).
        progress: tqdm bars over blocks of columns and Cholesky tiles.
        column_group: columns kept together in a block (e.g. the C outputs of one test point).
        memory_budget: bytes one explicit cross-kernel block may take (default 256 MiB).
        weight_norm_sq: ``‖θ*‖²`` of the weights the kernel is the Jacobian Gram of (needed by
            the Laplace evidence; ``None`` when ``K`` is not such a kernel).
        num_weights: the number ``P`` of those weights (sets the default prior-scale search range).
        noise_reference: the scale of the default noise search range (default ``mean(r²)``).

    Attributes:
        solve_info: the :class:`ntkscale.solvers.SolveInfo` of the last training solve.
        n: rows of ``K`` (over all ranks of a sharded ``K``).
        n_local: rows held in this process (``n`` unless ``K`` is sharded).

    Raises:
        ValueError: for ``exact_solver="cholesky"`` on a sharded ``K``, and bad arguments.
    """

    def __init__(
        self,
        K,
        residual: Tensor,
        noise: float,
        prior_scale: float = 1.0,
        *,
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
        column_group: int = 1,
        memory_budget: int | None = None,
        weight_norm_sq: float | None = None,
        num_weights: int | None = None,
        noise_reference: float | None = None,
    ):
        if torch.is_tensor(K):
            K = DenseLinearOperator(K)
        shape = getattr(K, "shape", None)
        if shape is None or len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"K must be a square (n, n) operator, got shape {None if shape is None else tuple(shape)}")
        if exact_solver not in ("auto", "cg", "cholesky"):
            raise ValueError(f"exact_solver must be 'auto', 'cg' or 'cholesky', got {exact_solver!r}")
        if not (
            preconditioner is None
            or isinstance(preconditioner, str)
            or callable(getattr(preconditioner, "apply", None))
        ):
            raise ValueError(
                "preconditioner must be 'nystrom', 'pivchol', 'jacobi', None, or an object with an "
                f".apply(R) method, got {type(preconditioner).__name__}"
            )
        self.K = K
        self.red = reductions(K)  # sums over rows: over the ranks of a sharded K
        self.sharded = self.red.group is not None
        if self.sharded and exact_solver == "cholesky":
            raise ValueError(_NO_CHOLESKY)
        self.n = n = self.red.n
        self.n_local = n_local = int(shape[0])
        r = residual.detach().reshape(-1).to(dtype=K.dtype, device=K.device)
        if r.numel() != n_local:
            where = " (this rank's rows)" if self.sharded else ""
            raise ValueError(f"residual must have {n_local} entries to match K{where}, got {tuple(residual.shape)}")
        self.residual = r
        self._noise = check_noise(noise)
        self._prior_scale = check_prior_scale(prior_scale)
        self.exact_solver = exact_solver
        self.factor_memory = check_positive_int(factor_memory, "factor_memory", DEFAULT_FACTOR_MEMORY)
        self.scratch_dir = scratch_dir
        self.tol = check_tol(tol) if tol is not None else (1e-8 if K.dtype == torch.float64 else 1e-4)
        self.rank = check_positive_int(rank, "rank", None)
        self._fast_rank = check_positive_int(fast_rank, "fast_rank", DEFAULT_FAST_RANK)
        self._block_size = check_positive_int(block_size, "block_size", DEFAULT_BLOCK)
        self.num_probes = check_positive_int(num_probes, "num_probes", DEFAULT_PROBES)
        self.num_iter = None if num_iter is None else check_positive_int(num_iter, "num_iter", None)
        self.max_iter = None if max_iter is None else check_positive_int(max_iter, "max_iter", None)
        self.seed = int(seed)
        self.progress = bool(progress)
        self.column_group = check_positive_int(column_group, "column_group", 1)
        self.memory_budget = int(memory_budget or 256 * 2**20)
        self.weight_norm_sq = None if weight_norm_sq is None else float(weight_norm_sq)
        self.num_weights = num_weights
        self.residual_sq = self.red.sum(r.square().sum()).item()  # ‖r‖² over all rows, once
        self.noise_reference = float(noise_reference) if noise_reference else max(
            self.residual_sq / n, torch.finfo(K.dtype).tiny
        )
        self.Kb = ColumnBlockedOperator(K, self._block_size)  # what the solvers see

        self._preconditioner_arg = preconditioner
        self._base_precond: Preconditioner | None = None
        self._precond_cache: dict[float, Preconditioner | None] = {}
        self._alpha_cache: dict[float, Tensor] = {}
        self._cold_iterations: dict[float, int] = {}  # PCG iterations of solves from x0 = 0
        self._fast_cache: dict[tuple[float, int], Tensor] = {}
        self._basis: LanczosBasis | None = None
        self._slq: StochasticLogdet | None = None
        self._chol: tuple[float, TiledCholesky] | None = None
        self.solve_info = None
        self.fit_info: FitInfo | None = None

    # -- hyperparameters and knobs ----------------------------------------------------------------
    @property
    def noise(self) -> float:
        """The likelihood variance ``σ²``."""
        return self._noise

    @noise.setter
    def noise(self, value: float) -> None:
        self._noise = check_noise(value)

    @property
    def prior_scale(self) -> float:
        """The prior variance ``s²``."""
        return self._prior_scale

    @prior_scale.setter
    def prior_scale(self, value: float) -> None:
        self._prior_scale = check_prior_scale(value)

    @property
    def ridge(self) -> float:
        """``λ = σ² / s²``, the shift of the training system ``K + λ I``."""
        return self._noise / self._prior_scale

    @property
    def fast_rank(self) -> int:
        """Lanczos rank of the fast variances."""
        return self._fast_rank

    @fast_rank.setter
    def fast_rank(self, value: int) -> None:
        self._fast_rank = check_positive_int(value, "fast_rank", DEFAULT_FAST_RANK)

    @property
    def block_size(self) -> int:
        """Right-hand-side columns per product with ``K`` and per PCG block."""
        return self._block_size

    @block_size.setter
    def block_size(self, value: int) -> None:
        self._block_size = check_positive_int(value, "block_size", DEFAULT_BLOCK)
        self.Kb = ColumnBlockedOperator(self.K, self._block_size)

    @property
    def preconditioner_rank(self) -> int | None:
        """The rank of the low-rank preconditioner built (for ``rank=None`` the one the adaptive
        Nyström sketch reached); ``None`` before it is built or for Jacobi / none."""
        P = self._base_precond
        return None if P is None else getattr(P, "rank", None)

    @property
    def preconditioner_name(self):
        p = self._preconditioner_arg
        return p if p is None or isinstance(p, str) else getattr(p, "name", type(p).__name__)

    # -- training solve ---------------------------------------------------------------------------
    def preconditioner(self, lam: float | None = None) -> Preconditioner | None:
        """The preconditioner of ``K + λ I`` (built on first use, re-shifted for other ``λ``)."""
        lam = self.ridge if lam is None else float(lam)
        arg = self._preconditioner_arg
        if arg is None:
            return None
        if not isinstance(arg, str):
            return arg
        k = key(lam)
        if k in self._precond_cache:
            return self._precond_cache[k]
        base = self._base_precond
        if base is None or arg == "jacobi":
            P = build_preconditioner(self.Kb, arg, noise=lam, rank=self.rank, seed=self.seed)
            if base is None:
                self._base_precond = P
        else:
            P = base.with_noise(lam)  # same sketch / pivots, re-weighted: no products
        self._precond_cache[k] = P
        return P

    def solve(self, rhs: Tensor, lam: float | None = None, x0: Tensor | None = None, warn: bool = True):
        """``(K + λ I)⁻¹ rhs`` by PCG with the cached preconditioner: ``(x, SolveInfo)``.

        Args:
            rhs: right-hand sides.  # shape: (n,) or (n, k)
            lam: the shift (default the current ``λ``).
            x0: warm start.
            warn: warn when CG does not reach ``tol``.
        """
        lam = self.ridge if lam is None else float(lam)
        x, info = solve(
            self.Kb, rhs, noise=lam, preconditioner=self.preconditioner(lam), tol=self.tol,
            max_iter=self.max_iter, x0=x0, warn=warn,
        )
        if x0 is None:
            self._cold_iterations[key(lam)] = int(info.iterations)
        return x, info

    def representer_weights(self, lam: float | None = None, x0: Tensor | None = None) -> Tensor:
        """``(K + λ I)⁻¹ r``, cached per ``λ``.  # shape: (n,)"""
        lam = self.ridge if lam is None else float(lam)
        k = key(lam)
        hit = self._alpha_cache.get(k)
        if hit is not None:
            return hit
        if self._chol is not None and self._chol[0] == k:  # direct: exact to round-off
            alpha = self._chol[1].solve(self.residual).to(self.K.dtype)
        else:
            alpha, info = self.solve(self.residual, lam, x0=x0)
            self.solve_info = info
        self._alpha_cache[k] = alpha
        return alpha

    def iterations_estimate(self, lam: float | None = None) -> int:
        """PCG iterations a cold solve at ``λ`` takes: measured at this ``λ``, else the most
        measured at any ``λ`` (warm-started solves, e.g. of a hyperparameter search, are not
        counted), else 100."""
        lam = self.ridge if lam is None else float(lam)
        its = self._cold_iterations.get(key(lam))
        if its is None:
            its = max(self._cold_iterations.values(), default=100)
        return max(1, its)

    def use_cholesky(self, num_columns: int) -> bool:
        """Whether exact variances for ``num_columns`` test columns take the Cholesky path
        (never for a sharded ``K``)."""
        if self.sharded:
            return False
        if self.exact_solver != "auto":
            return self.exact_solver == "cholesky"
        n = self.n
        if self._chol is not None and self._chol[0] == key(self.ridge):
            return True  # already factored: n² per column
        factor = n**3 / 3 + n**2 * num_columns
        if self.K.dtype != torch.float64:
            factor *= 2  # float64 multiply-adds run at about half the float32 rate
        iters = self.iterations_estimate()
        cg = num_columns * iters * product_cost(self.K, 1)
        est = f"~{factor:.2g} multiply-adds for the factor, ~{cg:.2g} for PCG ({iters} iterations)"
        if factor >= cg:
            log.info("exact variances of %d columns by PCG: %s", num_columns, est)
            return False
        need = cholesky_bytes(n)
        if need > self.factor_memory // 2:
            where = self.scratch_dir or tempfile.gettempdir()
            free = free_disk_bytes(where)
            if need >= 0.9 * free:
                log.warning(
                    "exact variances by PCG: the Cholesky factor would be cheaper (%s) but needs "
                    "%.1f GiB of disk and %s has %.1f GiB free; pass scratch_dir= on a larger disk",
                    est, need / 2**30, where, free / 2**30,
                )
                return False
        log.info("exact variances of %d columns by a tiled Cholesky factor: %s", num_columns, est)
        return True

    def cholesky(self, lam: float | None = None) -> TiledCholesky:
        """The tiled float64 Cholesky factor of ``K + λ I`` (computed on first use; one ``λ`` kept)."""
        if self.sharded:
            raise ValueError(_NO_CHOLESKY)
        lam = self.ridge if lam is None else float(lam)
        k = key(lam)
        if self._chol is not None and self._chol[0] == k:
            return self._chol[1]
        if self._chol is not None:
            self._chol[1].close()
            self._chol = None
        chol = TiledCholesky(
            self.K, lam, dtype=torch.float64, memory_budget=self.factor_memory,
            scratch_dir=self.scratch_dir, progress=self.progress,
        )
        self._chol = (k, chol)
        self._alpha_cache.pop(k, None)  # the direct solve replaces an iterative one
        return chol

    def close(self) -> None:
        """Release the Cholesky factor (its temporary panels are removed)."""
        if self._chol is not None:
            self._chol[1].close()
            self._chol = None

    # -- mean and variances -----------------------------------------------------------------------
    def _check_cross(self, Ksx) -> None:
        shape = getattr(Ksx, "shape", None)
        if shape is None or len(shape) != 2 or shape[1] != self.n_local:
            got = None if shape is None else tuple(shape)
            if self.sharded:
                raise ValueError(
                    f"the cross-kernel must have shape (m, {self.n_local}): the test rows by this rank's "
                    f"{self.n_local} rows of K (e.g. K.cross(X_test).mT); got {got}"
                )
            raise ValueError(f"the cross-kernel must have shape (m, n) with n = {self.n} (the rows of K); got {got}")

    def mean(self, Ksx) -> Tensor:
        """The mean correction ``K*X (K + λ I)⁻¹ r``.  # shape: (m,)"""
        self._check_cross(Ksx)
        alpha = self.representer_weights()
        return self.red.sum((Ksx @ alpha).detach().reshape(-1))

    def variance(
        self,
        Ksx,
        prior_diag: Tensor,
        mode: str = "exact",
        fast_rank: int | None = None,
        solver: str | None = None,
        info: PredictInfo | None = None,
    ) -> Tensor:
        """Marginal posterior variances ``s² [diag K** − diag(K*X (K + λ I)⁻¹ KX*)]``.

        Args:
            Ksx: the cross-kernel ``K*X``.  # shape: (m, n)
            prior_diag: ``diag K**``.  # shape: (m,)
            mode: ``"exact"`` (PCG per block of columns, or the Cholesky factor) or ``"fast"``
                (the rank-``fast_rank`` Lanczos factor; never below the exact variances).
            fast_rank: Lanczos rank (default :attr:`fast_rank`).
            solver: ``"cg"`` or ``"cholesky"`` for exact mode (default: by :meth:`use_cholesky`).
            info: a :class:`PredictInfo` to fill (times, iterations, clamping).

        Returns:
            The variances, clamped at 0 with a :class:`NegativeVarianceWarning` where round-off
            made them negative.  # shape: (m,)
        """
        info = PredictInfo(mode=mode) if info is None else info
        self._check_cross(Ksx)
        lam, s2 = self.ridge, self.prior_scale
        m = Ksx.shape[0]
        prior = prior_diag.detach().reshape(-1)
        if prior.numel() != m:
            raise ValueError(f"prior_diag must have m = {m} entries (rows of Ksx), got {tuple(prior_diag.shape)}")
        t0 = time.perf_counter()
        if mode == "exact":
            solver = solver or ("cholesky" if self.use_cholesky(m) else "cg")
            info.solver = solver
            if solver == "cholesky":
                chol = self.cholesky(lam)
                info.factor = chol.info
                info.seconds["factor"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                quad = self.direct_quadratic(Ksx, chol)
                prior = prior.to(torch.float64)
            else:
                quad = self.exact_quadratic(Ksx, lam, info)
        elif mode == "fast":
            asked = self.fast_rank if fast_rank is None else check_positive_int(fast_rank, "fast_rank", None)
            R = self.fast_factor(lam, asked)
            info.fast_rank, info.fast_rank_requested = R.shape[1], min(asked, self.n)
            info.seconds["lanczos"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            quad = self.fast_quadratic(Ksx, R)
            prior = prior.to(quad.dtype)
        else:
            raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
        info.seconds["variance"] = time.perf_counter() - t0
        info.preconditioner_rank = self.preconditioner_rank
        return self.clamp(s2 * (prior - quad), s2 * prior, info).to(self.K.dtype)

    def exact_quadratic(self, Ksx, lam: float | None = None, info: PredictInfo | None = None) -> Tensor:
        """``diag(K*X (K + λ I)⁻¹ KX*)`` by PCG on blocks of columns.  # shape: (m,)"""
        lam = self.ridge if lam is None else float(lam)
        info = PredictInfo(mode="exact") if info is None else info
        m = Ksx.shape[0]
        Kxs = Ksx.mT  # shape: (n, m)
        P = self.preconditioner(lam)
        g = self.column_group
        width = max(g, self.block_size - self.block_size % g)
        quad = torch.empty(m, dtype=self.K.dtype, device=self.K.device)
        worst, ok = 0.0, True
        for s in tqdm(range(0, m, width), desc="exact variances", disable=not self.progress, leave=False):
            cols = slice(s, min(m, s + width))
            B = to_dense(Kxs[:, cols]).detach()  # shape: (n, b)
            Z, sinfo = solve(self.Kb, B, noise=lam, preconditioner=P, tol=self.tol, max_iter=self.max_iter,
                             warn=False)
            quad[cols] = self.red.sum((B * Z).sum(0))
            info.solve_iterations.append(sinfo.iterations)
            ok = ok and sinfo.converged
            worst = max(worst, sinfo.residual_norm.max().item())
        info.converged, info.max_residual = ok, worst
        if not ok:
            warnings.warn(
                f"variances: CG did not reach tol {self.tol:.0e} on every block (largest relative "
                f"residual {worst:.1e}); raise max_iter (now {self.max_iter}) or the preconditioner's "
                f"rank (now rank={self.rank}), or use preconditioner='nystrom'",
                ConvergenceWarning,
                stacklevel=3,
            )
        return quad

    def direct_quadratic(self, Ksx, chol: TiledCholesky | None = None) -> Tensor:
        """``‖L⁻¹ KX*‖²`` per test row, in blocks of test columns.  # shape: (m,)"""
        chol = self.cholesky() if chol is None else chol
        self._check_cross(Ksx)
        n, g = self.n, self.column_group
        m = Ksx.shape[0]
        Kxs = Ksx.mT.to(torch.float64)  # shape: (n, m)
        # a block of test columns (n × b) takes a quarter of the budget; the cross kernel is
        # computed in row chunks of the training rows that take another sixteenth
        width = max(1, self.factor_memory // (4 * n * 8 * g)) * g
        rows = max(g, self.factor_memory // (16 * width * 8))
        rows -= rows % g
        quad = torch.empty(m, dtype=torch.float64, device=self.K.device)
        for c0 in tqdm(range(0, m, width), desc="exact variances", disable=not self.progress, leave=False):
            c1 = min(m, c0 + width)
            B = torch.empty(n, c1 - c0, dtype=torch.float64, device=self.K.device)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                B[r0:r1] = to_dense(Kxs[r0:r1, c0:c1]).detach()
            quad[c0:c1] = chol.inv_quad(B)
            del B
        return quad

    def lanczos_basis(self, rank: int | None = None) -> LanczosBasis:
        """The float64 :class:`ntkscale.solvers.LanczosBasis` of ``K`` with at least ``rank``
        steps (default :attr:`fast_rank`); built once, rebuilt only for a larger rank."""
        m = min(self.fast_rank if rank is None else rank, self.n)
        if self._basis is None or self._basis.steps < m:
            self._basis = None
            self._fast_cache.clear()
            self._basis = LanczosBasis(self.Kb, num_iter=m, seed=self.seed, dtype=torch.float64)
        return self._basis

    def fast_factor(self, lam: float | None = None, rank: int | None = None) -> Tensor:
        """``R`` with ``R Rᵀ ≈ (K + λ I)⁻¹`` from ``rank`` Lanczos steps (cached per ``(λ, rank)``;
        two kept). Warns when ``R`` has fewer columns than asked.  # shape: (n, r), float64"""
        lam = self.ridge if lam is None else float(lam)
        rank = min(self.fast_rank if rank is None else rank, self.n)
        k = (key(lam), rank)
        hit = self._fast_cache.get(k)
        if hit is not None:
            return hit
        R = self.lanczos_basis(rank).inverse_root(lam, rank)
        warn_rank(rank, R.shape[1])
        if len(self._fast_cache) >= 2:  # each R is n × r: keep the two most recent
            self._fast_cache.pop(next(iter(self._fast_cache)))
        self._fast_cache[k] = R
        return R

    def explicit_blocks_cheaper(self, Ksx, r: int) -> bool:
        """Whether ``K*X R`` is cheaper from explicit row blocks of ``K*X`` than from ``r``
        products (multiply-adds, from the operator's own estimates; summed over the ranks of a
        sharded ``K``, so that every rank takes the same route)."""
        m, n = Ksx.shape
        costs = torch.tensor([block_cost(Ksx, m, n) + m * n * r, product_cost(Ksx, r)], dtype=torch.float64,
                             device=self.K.device)
        blocks, products = self.red.sum(costs).tolist()
        return blocks < products

    def fast_quadratic(self, Ksx, R: Tensor, route: str = "auto") -> Tensor:
        """``‖Rᵀ KX*‖²`` per test row.  # shape: (m,)

        Args:
            Ksx: the cross-kernel.  # shape: (m, n)
            R: the Lanczos factor.  # shape: (n, r)
            route: ``"products"`` (``Ksx @ R`` in blocks of columns), ``"blocks"`` (explicit row
                blocks of ``Ksx`` times ``R``, each within ``memory_budget``) or ``"auto"``
                (whichever :meth:`explicit_blocks_cheaper` says).
        """
        if route not in ("auto", "products", "blocks"):
            raise ValueError(f"route must be 'auto', 'products' or 'blocks', got {route!r}")
        self._check_cross(Ksx)
        m = Ksx.shape[0]
        r = R.shape[1]
        red = self.red  # Rᵀ KX* is a sum over the rows of K: over the ranks of a sharded K
        quad = torch.zeros(m, dtype=R.dtype, device=R.device)
        if route == "blocks" or (route == "auto" and self.explicit_blocks_cheaper(Ksx, r)):
            g = self.column_group
            # the block, its cast to R's dtype and the product: about 3 row-blocks of n numbers
            # (n over all ranks, so every rank takes the same blocks)
            rows = max(g, self.memory_budget // (3 * self.n * R.element_size()))
            rows -= rows % g
            for r0 in range(0, m, rows):
                B = to_dense(Ksx[r0 : r0 + rows]).detach().to(R.dtype)  # shape: (rows, n)
                quad[r0 : r0 + rows] = red.sum(B @ R).square().sum(1)
                del B
            return quad
        for sl in chunks(r, self.block_size):
            quad += red.sum((Ksx @ R[:, sl].to(Ksx.dtype).contiguous()).detach().to(R.dtype)).square().sum(1)
        return quad

    def clamp(self, var: Tensor, scale: Tensor, info: PredictInfo) -> Tensor:
        """Clamp negative variances at 0, recording and warning (with the knob to turn)."""
        neg = var < 0
        count = int(neg.sum())
        if count:
            worst = var.min().item()
            rel = (var[neg] / scale[neg].clamp_min(torch.finfo(var.dtype).tiny)).min().item()
            info.clamped, info.most_negative = count, worst
            if info.solver == "cholesky":
                hint = "the factor is float64 already: add noise"
            elif self.K.dtype != torch.float64:
                hint = "compute in float64 (dtype=torch.float64) or tighten tol"
            else:
                hint = f"tighten tol (now {self.tol:.0e}) or add noise"
            warnings.warn(
                f"{count} of {var.numel()} posterior variances came out negative (most negative "
                f"{worst:.3e}, {rel:.1e} relative to the prior variance s²·K**) and were clamped at "
                f"0; this is round-off in K** − K*X (K + λI)⁻¹ KX*: {hint}",
                NegativeVarianceWarning,
                stacklevel=3,
            )
        return var.clamp_min(0.0)

    # -- pathwise samples -------------------------------------------------------------------------
    def pathwise_update(
        self,
        Ksx,
        prior_train: Tensor,
        prior_test: Tensor,
        noise_samples: Tensor | None = None,
        info: PredictInfo | None = None,
    ) -> Tensor:
        """Posterior deviations from joint prior samples by Matheron's rule.

        ``f*_post − mean = f* − K*X (K + λ I)⁻¹ (f_X + ε)`` for a joint prior sample ``(f_X, f*)``
        of the GP with kernel ``s² K`` and ``ε ~ N(0, σ² I)``: one PCG solve with all ``S``
        right-hand sides (the cached preconditioner), then one product with the cross-kernel —
        whatever the number of test rows. The Cholesky factor replaces PCG when there is one
        for this ``λ``, or when :meth:`use_cholesky` finds it cheaper for ``S`` columns.

        Args:
            Ksx: the cross-kernel.  # shape: (m, n)
            prior_train: prior samples at the training inputs.  # shape: (n, S)
            prior_test: the same samples at the test inputs.  # shape: (m, S)
            noise_samples: ``ε`` (default drawn from the global RNG).  # shape: (n, S)
            info: a :class:`PredictInfo` to fill.

        Returns:
            Posterior samples minus the posterior mean.  # shape: (m, S)
        """
        info = PredictInfo(mode="sample") if info is None else info
        self._check_cross(Ksx)
        n, m = self.n_local, Ksx.shape[0]
        if prior_train.dim() != 2 or prior_train.shape[0] != n:
            raise ValueError(f"prior_train must have shape (n, S) with n = {n}, got {tuple(prior_train.shape)}")
        S = prior_train.shape[1]
        if tuple(prior_test.shape) != (m, S):
            raise ValueError(f"prior_test must have shape (m, S) = ({m}, {S}), got {tuple(prior_test.shape)}")
        if noise_samples is None:  # this rank's rows of one draw over all n rows
            red = self.red
            eps = torch.randn(red.n, S, dtype=self.K.dtype, device=self.K.device)
            noise_samples = eps[red.offset : red.offset + n] * math.sqrt(self.noise)
        lam = self.ridge
        rhs = (prior_train + noise_samples).to(self.K.dtype)
        t0 = time.perf_counter()
        if (self._chol is not None and self._chol[0] == key(lam)) or self.use_cholesky(S):
            # a factor exists, or one is cheaper than S × iterations products (the same cost
            # model as exact variances; exact_solver="cg" forces PCG)
            chol = self.cholesky(lam)
            info.solver, info.factor = "cholesky", chol.info
            Z = chol.solve(rhs).to(self.K.dtype)
        else:
            Z, sinfo = solve(self.Kb, rhs, noise=lam, preconditioner=self.preconditioner(lam), tol=self.tol,
                             max_iter=self.max_iter, warn=False)
            info.solver = "cg"
            info.solve_iterations.append(sinfo.iterations)
            info.converged = bool(sinfo.converged)
            info.max_residual = sinfo.residual_norm.max().item()
            if not sinfo.converged:
                warnings.warn(
                    f"samples: CG did not reach tol {self.tol:.0e} (largest relative residual "
                    f"{info.max_residual:.1e}); raise max_iter (now {self.max_iter}) or the "
                    f"preconditioner's rank (now rank={self.rank})",
                    ConvergenceWarning,
                    stacklevel=3,
                )
        info.seconds["solve"] = time.perf_counter() - t0
        info.preconditioner_rank = self.preconditioner_rank
        t0 = time.perf_counter()
        update = torch.cat(
            [self.red.sum((Ksx @ Z[:, sl].contiguous()).detach()) for sl in chunks(S, self.block_size)], dim=1
        )
        info.seconds["update"] = time.perf_counter() - t0
        return prior_test.to(update.dtype) - update


_NO_CHOLESKY = (
    "the Cholesky routes need all of K in one process, and K is sharded over torch.distributed "
    "ranks: use exact_solver='cg' or 'auto' (exact variances and samples by PCG)"
)
