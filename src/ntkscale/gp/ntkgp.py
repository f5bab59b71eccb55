"""``NTKGP``: NTK-GP / linearized-Laplace regression around a trained network — the adapter.

The linearized network ``f_lin(x; θ) = f(x; θ*) + J(x)(θ − θ*)`` with the prior
``θ ~ N(θ*, s² I)`` (``s² = prior_scale``) and a Gaussian likelihood of variance ``σ²``
(``noise``) is a Gaussian process with kernel ``s² Θ`` and mean ``f(·; θ*)``. With ``λ = σ²/s²``:

    mean(x*) = f(x*) + Θ*X (Θ + λ I)⁻¹ (y − f(X))
    var(x*)  = s² [Θ** − Θ*X (Θ + λ I)⁻¹ ΘX*]        (marginal, per (test point, output))

This class turns the network into operators (:class:`ntkscale.NTKOperator` on the training set,
the cross-kernel, the test diagonal), evaluates ``f(X)`` and the residuals, draws prior samples
of the linearized network by Jacobian-vector products, and leaves every piece of algebra to
:class:`ntkscale.gp.KernelGP` (:attr:`NTKGP.posterior`), which knows only linear operators.

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
    >>> gp.sample(Xs, num_samples=3, seed=0).shape
    torch.Size([3, 5, 1])
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import Tensor, nn

from ..functional import chunks
from ..operator import NTKOperator
from ..solvers import Preconditioner, reductions
from ..solvers.cholesky import DEFAULT_MEMORY as DEFAULT_FACTOR_MEMORY
from ._checks import check_mode, check_noise, check_positive_int, check_prior_scale, check_targets, check_tol
from .inference import DEFAULT_PROBES, KernelGP
from .results import PredictInfo, VarianceError

__all__ = ["NTKGP"]


def _forward_to_posterior(name: str, doc: str) -> property:
    return property(
        lambda self: getattr(self.posterior, name),
        lambda self, value: setattr(self.posterior, name, value),
        doc=doc,
    )


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
            one is built once (re-shifted, not rebuilt, when ``λ`` changes) and reused by every
            solve, including the batched solve of :meth:`sample`.
        rank: rank of the ``"nystrom"``/``"pivchol"`` preconditioner. Default ``None``: for
            ``"nystrom"`` chosen adaptively (the sketch grows until its tail eigenvalue is near
            ``λ``; see :class:`ntkscale.solvers.NystromPreconditioner`) and reported as
            :attr:`preconditioner_rank` and ``info.preconditioner_rank``; 100 for
            ``"pivchol"`` (and for ``"nystrom"`` at ``λ = 0``).
        tol: relative residual tolerance of the CG solves, > 0 (default 1e-4 for float32 and
            1e-8 for float64 operators).
        max_iter: cap on CG iterations per solve (default ``min(N C, 1000)``).
        fast_rank: Lanczos rank ``r`` of the fast variances (default 100, capped at ``N C``).
        block_size: right-hand-side columns per batched product and per PCG block (default 32).
        num_probes: Rademacher probes of the SLQ log-determinant (default 30). With
            ``num_probes ≥ N C`` the unit vectors are used instead and the trace is exact.
        num_iter: Lanczos steps per probe of the SLQ log-determinant (default ``min(N C, 100)``).
        seed: seed of the Nyström sketch, the Lanczos start vector and the SLQ probes.
        exact_solver: how :meth:`predict` computes exact variances: ``"cg"``, ``"cholesky"``
            (a tiled float64 factor of ``Θ + λ I``), or ``"auto"`` (default): the cheaper by a
            multiply-add estimate — ``(N C)³/3`` plus ``(N C)²`` per test column for the factor
            against ``columns × iterations × (one product's cost, from the operator's cost
            model)`` for PCG — provided the factor fits on disk.
        factor_memory: bytes the Cholesky factorization may hold in memory at once (default 2 GiB).
        scratch_dir: directory for the factor's panels (default a temporary directory).
        progress: show tqdm bars over the blocks of exact variances and the Cholesky tiles.
        **operator_kwargs: passed to every :class:`ntkscale.NTKOperator` (``chunk_size``,
            ``params``, ``dtype``, ``memory_budget``, ...).

    Attributes:
        K: the training operator ``Θ``.  # shape: (N*C, N*C)
        posterior: the :class:`ntkscale.gp.KernelGP` doing the algebra on ``Θ``.
        info: the :class:`ntkscale.gp.PredictInfo` of the last :meth:`predict` / :meth:`sample`.

    Raises:
        ValueError: for ``noise < 0``, ``prior_scale ≤ 0``, ``tol ≤ 0``, a ``y`` of the wrong
            shape or with NaN/inf, or bad sizes (``rank``, ``fast_rank``, ``block_size``, ...).

    Memory: the operator's own (factors or chunks), one ``N C`` vector per cached ``λ``, the
    preconditioner (``N C × rank``), the fast variances' float64 Lanczos basis and up to two
    factors (each ``N C × fast_rank``), for the log-determinant the Lanczos vectors
    (``N C × num_iter × num_probes``), for :meth:`sample` ``P × S`` tangents and a few ``N C × S``
    blocks, and for the Cholesky path ``factor_memory`` plus ``(N C)²/2`` float64 entries on disk.
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
        settings = dict(
            preconditioner=preconditioner, rank=rank, tol=tol, max_iter=max_iter, fast_rank=fast_rank,
            block_size=block_size, num_probes=num_probes, num_iter=num_iter, seed=seed,
            exact_solver=exact_solver, factor_memory=factor_memory, scratch_dir=scratch_dir, progress=progress,
        )
        # cheap checks first: a bad argument fails before any operator is built
        check_noise(noise)
        check_prior_scale(prior_scale)
        if tol is not None:
            check_tol(tol)
        for name in ("rank", "fast_rank", "block_size", "num_probes", "num_iter", "max_iter"):
            check_positive_int(settings[name], name, None)
        if exact_solver not in ("auto", "cg", "cholesky"):
            raise ValueError(f"exact_solver must be 'auto', 'cg' or 'cholesky', got {exact_solver!r}")
        model = _frozen_copy(model, operator_kwargs.get("dtype"))
        self._setup(model, X, y, noise, prior_scale, backend, settings, dict(operator_kwargs))

    def _train_operator(self, model, X, backend, operator_kwargs):
        """The training kernel ``Θ(X, X)`` (a subclass may shard it over processes)."""
        return NTKOperator(model, X, backend=backend, **operator_kwargs)

    @property
    def _local(self) -> NTKOperator:
        """The (process-local) operator holding this GP's training inputs and weights."""
        return getattr(self.K, "local", self.K)

    def _setup(self, model, X, y, noise, prior_scale, backend, settings, operator_kwargs):
        self._model = model
        self._settings = settings
        self._operator_kwargs = operator_kwargs
        self.K = self._train_operator(model, X, backend, operator_kwargs)
        loc = self._local
        self._backend = self.K.backend
        self.X = loc.X1
        self.num_outputs = C = self.K.num_outputs
        self.num_train = N = self.X.shape[0]
        self.n = N * C
        self.y = check_targets(y, N, C, self.K.dtype, self.K.device)  # shape: (N, C)
        self.f_train = self._forward(self.X)  # shape: (N, C)
        weight_norm_sq = sum(p.detach().double().square().sum().item() for p in loc.params)
        red = reductions(self.K)  # over all ranks when the training data is sharded
        if red.group is None:
            ymean, ysq = self.y.mean(0), self.y.square().mean().item()
        else:
            count = red.n // C
            ymean = red.sum(self.y.sum(0)) / count
            ysq = red.sum(self.y.square().sum().reshape(1)).item() / red.n
        yc = self.y - ymean
        target_var = red.sum(yc.square().sum().reshape(1)).item() / red.n or ysq or 1.0
        self.posterior = KernelGP(
            self.K, (self.y - self.f_train).reshape(-1), noise, prior_scale, column_group=C,
            memory_budget=operator_kwargs.get("memory_budget"), weight_norm_sq=weight_norm_sq,
            num_weights=loc.num_params, noise_reference=target_var, **settings,
        )
        self.info: PredictInfo | None = None

    def with_data(self, X: Tensor, y: Tensor) -> "NTKGP":
        """A GP on new training data with the same frozen network, hyperparameters and settings.

        For a growing data set (Thompson sampling, active learning): no copy of the network is
        taken again; the kernel, its preconditioner and caches are those of the new data.

        Args:
            X: training inputs.  # shape: (N', *in_shape)
            y: training targets.  # shape: (N', C)
        """
        new = type(self).__new__(type(self))
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k.startswith("_dist")})
        settings = dict(self._settings)
        for name in ("rank", "tol", "max_iter", "fast_rank", "block_size", "num_probes", "num_iter",
                     "exact_solver", "factor_memory", "scratch_dir", "progress", "seed"):
            settings[name] = getattr(self.posterior, name)
        settings["tol"] = self.posterior.tol if self._settings["tol"] is not None else None
        given = settings["preconditioner"]
        if not (given is None or isinstance(given, str)):  # built for the old data: build anew
            name = getattr(given, "name", None)
            if name not in ("nystrom", "pivchol", "jacobi"):
                raise ValueError(
                    f"with_data cannot rebuild the preconditioner object {type(given).__name__} for "
                    "new data: construct this GP with preconditioner='nystrom', 'pivchol', 'jacobi' or None"
                )
            settings["preconditioner"] = name
        new._setup(self._model, X, y, self.noise, self.prior_scale, self._backend, settings, self._operator_kwargs)
        return new

    # -- hyperparameters and knobs (held by the posterior) -------------------------------------
    noise = _forward_to_posterior("noise", "The likelihood variance ``σ²``.")
    prior_scale = _forward_to_posterior("prior_scale", "The prior variance ``s²`` of the weights.")
    fast_rank = _forward_to_posterior("fast_rank", "Lanczos rank of the fast variances.")
    block_size = _forward_to_posterior("block_size", "Right-hand-side columns per product / PCG block.")
    rank = _forward_to_posterior("rank", "Rank asked of the low-rank preconditioner (``None``: adaptive).")
    tol = _forward_to_posterior("tol", "Relative residual tolerance of the CG solves.")
    max_iter = _forward_to_posterior("max_iter", "Cap on CG iterations per solve.")
    num_probes = _forward_to_posterior("num_probes", "SLQ probes of the log-determinant.")
    num_iter = _forward_to_posterior("num_iter", "Lanczos steps per SLQ probe.")
    seed = _forward_to_posterior("seed", "Seed of the sketch, the Lanczos start vector and the probes.")
    exact_solver = _forward_to_posterior("exact_solver", "'auto', 'cg' or 'cholesky'.")
    factor_memory = _forward_to_posterior("factor_memory", "Bytes the Cholesky factorization may hold.")
    scratch_dir = _forward_to_posterior("scratch_dir", "Directory of the Cholesky factor's panels.")
    progress = _forward_to_posterior("progress", "Show tqdm bars.")

    @property
    def ridge(self) -> float:
        """``λ = σ² / s²``, the shift of the training system ``Θ + λ I``."""
        return self.posterior.ridge

    @property
    def preconditioner_rank(self) -> int | None:
        """The rank of the low-rank preconditioner built (the adaptive choice when :attr:`rank`
        is ``None``); ``None`` before the first solve, or for Jacobi / no preconditioner."""
        return self.posterior.preconditioner_rank

    @property
    def solve_info(self):
        """The :class:`ntkscale.solvers.SolveInfo` of the last training solve."""
        return self.posterior.solve_info

    @property
    def fit_info(self):
        """The :class:`ntkscale.gp.FitInfo` of the last :meth:`fit_hyperparameters`."""
        return self.posterior.fit_info

    @property
    def weight_norm_sq(self) -> float:
        """``‖θ*‖²`` over the parameters the kernel is taken over (the Laplace evidence's scatter)."""
        return self.posterior.weight_norm_sq

    def __repr__(self) -> str:
        return (
            f"NTKGP(N={self.num_train}, C={self.num_outputs}, noise={self.noise:.3g}, "
            f"prior_scale={self.prior_scale:.3g}, backend={self._backend!r}, "
            f"preconditioner={self.posterior.preconditioner_name!r}, dtype={self.K.dtype})"
        )

    # -- operators and the network ---------------------------------------------------------------
    def kernel(self, X1: Tensor, X2: Tensor | None = None) -> NTKOperator:
        """The NTK ``Θ(X1, X2)`` of the frozen network (``Θ(X1, X1)`` without ``X2``), with this
        GP's backend and operator settings.  # shape: (N1*C, N2*C)"""
        return NTKOperator(self._model, X1, X2, backend=self._backend, **self._operator_kwargs)

    def _forward(self, X: Tensor) -> Tensor:
        """``f(X)`` of the frozen network, in chunks, without a graph.  # shape: (n, C)"""
        C = self.num_outputs
        with torch.no_grad():
            out = [self._model(X[sl]).reshape(-1, C) for sl in chunks(X.shape[0], self._local.chunk_size)]
        return torch.cat(out).to(self.K.dtype)

    def forward(self, X: Tensor) -> Tensor:
        """``f(X; θ*)``, the trained network's outputs (the prior mean).  # shape: (M, C)"""
        return self._forward(self.kernel(X).X1)

    def preconditioner(self, lam: float | None = None) -> Preconditioner | None:
        """The preconditioner of ``Θ + λ I`` (built on first use, then reused)."""
        return self.posterior.preconditioner(lam)

    def representer_weights(self) -> Tensor:
        """``(Θ + λ I)⁻¹ (y − f(X))`` at the current hyperparameters.  # shape: (N, C)"""
        return self.posterior.representer_weights().reshape(self.num_train, self.num_outputs)

    def use_cholesky(self, num_columns: int) -> bool:
        """Whether exact variances for ``num_columns`` test columns take the Cholesky path."""
        return self.posterior.use_cholesky(num_columns)

    def cholesky(self, lam: float | None = None):
        """The tiled float64 Cholesky factor of ``Θ + λ I`` (computed on first use; one ``λ`` kept)."""
        return self.posterior.cholesky(lam)

    # -- prediction ------------------------------------------------------------------------------
    def predict(
        self,
        X_test: Tensor,
        mode: str = "exact",
        return_var: bool = True,
        fast_rank: int | None = None,
        num_samples: int = 64,
        seed: int | None = None,
    ) -> tuple[Tensor, Tensor] | Tensor:
        """Posterior mean and marginal variances at ``X_test``.

        Args:
            X_test: test inputs.  # shape: (M, *in_shape)
            mode: ``"exact"`` (batched PCG on the columns of ``ΘX*``, or the Cholesky factor),
                ``"fast"`` (the rank-``fast_rank`` Lanczos factor; never below the exact
                variances) or ``"sample"`` (from ``num_samples`` pathwise samples: relative
                error ``√(2/S)``, recorded in ``info.variance_relative_error``).
            return_var: also compute the variances; if ``False`` only the mean is returned.
            fast_rank: Lanczos rank for ``mode="fast"`` (default :attr:`fast_rank`).
            num_samples: ``S`` for ``mode="sample"``.
            seed: seed of the samples (default: the global RNG).

        Returns:
            ``(mean, var)``, each of shape (M, C); or ``mean`` alone with ``return_var=False``.
            In sample mode the mean is the exact posterior mean (the samples' common centre)
            and ``var`` the mean squared deviation of the samples from it. Variances that come
            out negative by round-off are clamped at 0 with a
            :class:`ntkscale.gp.NegativeVarianceWarning`. :attr:`info` records the stages.
        """
        check_mode(mode)
        if mode == "sample" and return_var:
            samples, mean = self._sample(X_test, num_samples, seed)
            var = (samples - mean).square().mean(0)
            return mean, var
        C = self.num_outputs
        post = self.posterior
        info = PredictInfo(mode=mode if return_var else None)
        self.info = info
        t0 = time.perf_counter()
        Ksx = self.kernel(X_test, self.X)  # shape: (M*C, N*C)
        M = Ksx.X1.shape[0]
        direct = return_var and mode == "exact" and post.use_cholesky(M * C)
        if direct:
            chol = post.cholesky()
            info.factor = chol.info
            info.seconds["factor"] = time.perf_counter() - t0
        mean = self._forward(Ksx.X1) + post.mean(Ksx).reshape(M, C)
        info.seconds["mean"] = time.perf_counter() - t0
        info.preconditioner_rank = post.preconditioner_rank
        if not return_var:
            return mean
        t0 = time.perf_counter()
        Kss = self.kernel(Ksx.X1)
        prior = (Kss.to(torch.float64) if direct else Kss).diagonal().detach()  # shape: (M*C,)
        info.seconds["diag"] = time.perf_counter() - t0
        seconds = dict(info.seconds)
        var = post.variance(Ksx, prior, mode=mode, fast_rank=fast_rank,
                            solver=("cholesky" if direct else "cg") if mode == "exact" else None, info=info)
        info.seconds = {**seconds, **{k: v for k, v in info.seconds.items() if k != "factor" or not direct}}
        return mean, var.reshape(M, C)

    def sample(self, X_test: Tensor, num_samples: int = 64, seed: int | None = None) -> Tensor:
        """Joint posterior samples of the linearized network at ``X_test``, by pathwise conditioning.

        A prior sample of ``f_lin`` is ``f(x) + J(x) δ`` with ``δ ~ N(0, s² I)``: all ``S`` of
        them at the training and test inputs come from one batched Jacobian-vector product per
        side. Matheron's rule then conditions them on the data with one PCG solve with ``S``
        right-hand sides (the GP's preconditioner) and one cross-kernel product
        (:meth:`ntkscale.gp.KernelGP.pathwise_update`): the cost does not grow with the
        number of test points beyond the JVP. Any statistic of ``S`` samples has Monte Carlo
        error: variances estimated from them are off by a relative ``√(2/S)``.

        Args:
            X_test: test inputs.  # shape: (M, *in_shape)
            num_samples: ``S``.
            seed: seed of ``δ`` and of the likelihood noise (default: the global RNG, so
                repeated calls give fresh samples — as Thompson sampling wants).

        Returns:
            Posterior function samples.  # shape: (S, M, C)
        """
        return self._sample(X_test, num_samples, seed)[0]

    def _sample(self, X_test: Tensor, num_samples: int, seed: int | None) -> tuple[Tensor, Tensor]:
        S = check_positive_int(num_samples, "num_samples", None)
        C, post = self.num_outputs, self.posterior
        info = PredictInfo(mode="sample", num_samples=S, variance_relative_error=math.sqrt(2.0 / S))
        self.info = info
        t0 = time.perf_counter()
        Ksx = self.kernel(X_test, self.X)
        M = Ksx.X1.shape[0]
        mean = self._forward(Ksx.X1) + post.mean(Ksx).reshape(M, C)
        info.seconds["mean"] = time.perf_counter() - t0
        info.preconditioner_rank = post.preconditioner_rank
        t0 = time.perf_counter()
        dtype, device = self.K.dtype, self.K.device
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed(int(seed))
        loc, red = self._local, post.red
        P = loc.num_params
        delta = torch.randn(P, S, dtype=dtype, device=device, generator=gen) * math.sqrt(self.prior_scale)
        eps = torch.randn(red.n, S, dtype=dtype, device=device, generator=gen) * math.sqrt(self.noise)
        eps = eps[red.offset : red.offset + self.n]  # this rank's rows of one draw over all rows
        bs = post.block_size
        prior_train = torch.cat([loc.jvp(delta[:, sl]) for sl in chunks(S, bs)], dim=1)  # (N*C, S)
        prior_test = torch.cat([Ksx.jvp(delta[:, sl]) for sl in chunks(S, bs)], dim=1)  # (M*C, S): J(X_test)
        del delta
        info.seconds["prior_samples"] = time.perf_counter() - t0
        dev = post.pathwise_update(Ksx, prior_train, prior_test, eps, info=info)  # (M*C, S)
        samples = mean.reshape(1, M, C) + dev.mT.reshape(S, M, C).to(mean.dtype)
        return samples, mean

    def variance_error(self, X_test: Tensor, fast_rank: int | None = None) -> VarianceError:
        """How far the fast variances are from the exact ones on ``X_test`` (e.g. a subset).

        Args:
            X_test: test inputs to compare on.  # shape: (M, *in_shape)
            fast_rank: Lanczos rank of the fast variances (default :attr:`fast_rank`).

        Returns:
            A :class:`ntkscale.gp.VarianceError`.
        """
        post, C = self.posterior, self.num_outputs
        Ksx = self.kernel(X_test, self.X)  # both variances from one cross-kernel and prior diagonal
        M = Ksx.X1.shape[0]
        Kss = self.kernel(Ksx.X1)
        prior = Kss.diagonal().detach()
        direct = post.use_cholesky(M * C)
        info = PredictInfo(mode="fast")
        fast = post.variance(Ksx, prior, mode="fast", fast_rank=fast_rank, info=info).reshape(M, C)
        rank = info.fast_rank
        prior_exact = Kss.to(torch.float64).diagonal().detach() if direct else prior
        exact = post.variance(Ksx, prior_exact, mode="exact", solver="cholesky" if direct else "cg").reshape(M, C)
        pos = exact > 0
        rel = (fast[pos] - exact[pos]).abs() / exact[pos]
        return VarianceError(
            median_relative_error=rel.median().item() if rel.numel() else float("nan"),
            max_relative_error=rel.max().item() if rel.numel() else float("nan"),
            fast_rank=rank,
            fast=fast,
            exact=exact,
        )

    # -- evidences -------------------------------------------------------------------------------
    def log_marginal_likelihood(
        self,
        noise: float | None = None,
        prior_scale: float | None = None,
        kind: str = "laplace",
        return_info: bool = False,
    ):
        """The evidence of the linearized network at ``(σ², s²)``.

        ``kind="laplace"`` (default): the linearized-Laplace evidence with prior ``N(0, s² I)``
        on the weights and the GGN at ``θ*`` (laplace-torch's convention),

            log p(y | θ*) − ½ [log det(I + (s²/σ²) Θ) + ‖θ*‖² / s²],

        with ``log p(y | θ*) = log N(y − f(X); 0, σ² I)``. The ``‖θ*‖²/s²`` term keeps the
        prior scale from collapsing once the network fits the data.

        ``kind="gp"``: ``log N(y − f(X); 0, s² Θ + σ² I)``, the GP marginal likelihood with the
        prior centred at the trained weights (one cached CG solve).

        Both log-determinants come from one stochastic Lanczos quadrature run on ``Θ``
        (:class:`ntkscale.solvers.StochasticLogdet`), exact with ``num_probes ≥ N C``.

        Args:
            noise: ``σ²`` (default the GP's).
            prior_scale: ``s²`` (default the GP's).
            kind: ``"laplace"`` or ``"gp"``.
            return_info: also return the :class:`ntkscale.gp.EvidenceInfo` (its terms and the
                probe standard error ``logdet_stderr``).
        """
        return self.posterior.log_marginal_likelihood(noise, prior_scale, kind=kind, return_info=return_info)

    def fit_hyperparameters(
        self,
        optimize: tuple[str, ...] | str = ("noise", "prior_scale"),
        ridge_range: tuple[float, float] = (1e-6, 1e2),
        grid_size: int = 17,
        refine_steps: int = 20,
        update: bool = True,
        kind: str = "laplace",
        noise_range: tuple[float, float] = (1e-8, 1e1),
        prior_scale_range: tuple[float, float] = (1e-3, 1e6),
    ) -> tuple[float, float]:
        """Maximize the evidence of ``kind`` over ``(log σ², log s²)``.

        ``kind="laplace"`` (default): a log grid over ``noise_range × var(y)`` and
        ``prior_scale_range × ‖θ*‖² / min(N C, P)``, then a pattern search; no solves.
        ``kind="gp"``: the profile over ``λ`` in ``ridge_range × mean(diag Θ)`` (one warm-started
        PCG solve per evaluation). See :meth:`ntkscale.gp.KernelGP.fit_hyperparameters`.

        An optimum on the edge of its range raises a :class:`ntkscale.gp.HyperparameterWarning`.

        Returns:
            ``(noise, prior_scale)``, never with a lower evidence than the start.
            :attr:`fit_info` records the start, the result and every evaluation.
        """
        return self.posterior.fit_hyperparameters(
            optimize, kind=kind, ridge_range=ridge_range, noise_range=noise_range,
            prior_scale_range=prior_scale_range, grid_size=grid_size, refine_steps=refine_steps, update=update,
        )


def _frozen_copy(model: nn.Module, dtype: torch.dtype | None, owner: str = "NTKGP(model, X, y, ...)") -> nn.Module:
    """A copy of the network at its current weights, without gradients (cast to ``dtype``);
    ``owner`` names the caller in the error for a non-module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.grad = None
    if dtype is not None:
        frozen = frozen.to(dtype)
    return frozen
