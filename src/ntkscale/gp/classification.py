"""``NTKClassifierGP``: linearized Laplace for a softmax classifier, with the GGN, matrix-free.

A trained network ``f(x; θ*)`` with C logits, a prior ``θ ~ N(θ*, s² I)`` and the categorical
likelihood linearized at ``θ*`` give the Gaussian posterior over the weights with precision
``Σ⁻¹ = Σ_i J_iᵀ Λ_i J_i + I/s²`` (the generalized Gauss–Newton), where
``Λ_i = diag(p_i) − p_i p_iᵀ`` is the Hessian of the cross-entropy in the logits at the trained
probabilities ``p_i = softmax(f(x_i))``. The predictive logits of a test point are Gaussian with
mean ``f(x*)`` and covariance ``J* Σ J*ᵀ``.

In function space (Woodbury, with ``G = Λ^{1/2} J``, ``Λ^{1/2}`` the symmetric per-sample root):

    J* Σ J*ᵀ = s² [Θ** − Θ*X Λ^{1/2} (Λ^{1/2} Θ Λ^{1/2} + I/s²)⁻¹ Λ^{1/2} ΘX*]

which is GP regression's posterior covariance with the GGN kernel ``K_G = Λ^{1/2} Θ Λ^{1/2}``,
the cross-kernel ``Θ*X Λ^{1/2}``, unit noise and prior variance ``s²``: the algebra is
:class:`~ntkscale.gp.KernelGP`'s (PCG on ``K_G + I/s²`` with its Nyström preconditioner). Each
``Λ_i`` has rank C − 1 (its null vector is the all-ones vector: adding a constant to all logits
does not change the softmax); the root ``Λ^{1/2}`` keeps that null space, and the shift
``I/s²`` keeps the system positive definite, so nothing inverts ``Λ``.

Example:
    >>> import torch, ntkscale as nks
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    >>> X, y = torch.randn(20, 2, dtype=torch.float64), torch.randint(0, 3, (20,))
    >>> clf = nks.NTKClassifierGP(net, X, y, prior_scale=1.0)
    >>> mean, cov = clf.predict_logits(X[:4])
    >>> mean.shape, cov.shape
    (torch.Size([4, 3]), torch.Size([4, 3, 3]))
    >>> probs = clf.predict(X[:4], link="probit")
    >>> bool(torch.allclose(probs.sum(-1), torch.ones(4, dtype=torch.float64)))
    True
"""

from __future__ import annotations

import math

import torch
from linear_operator import to_dense
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..functional import chunks
from ..operator import NTKOperator
from ._checks import check_positive_int, check_prior_scale, check_tol
from .ggn import GGNKernel, ggn_kernel
from .inference import KernelGP
from .ntkgp import _frozen_copy

__all__ = ["NTKClassifierGP"]

LINKS = ("probit", "mc")


class NTKClassifierGP:
    """Linearized-Laplace (GGN) predictive of a trained softmax classifier, matrix-free.

    Args:
        model: the trained network, mapping ``X`` (N, *in_shape) to logits (N, C), C ≥ 2. A
            frozen copy is taken.
        X: training inputs.  # shape: (N, *in_shape)
        y: integer class labels in ``[0, C)``.  # shape: (N,)
        prior_scale: ``s² > 0``, the prior variance of the weights around ``θ*`` (the inverse
            of laplace-torch's ``prior_precision``).
        num_classes: C, if given: checked against the model's output width.
        backend: NTK backend (see :class:`ntkscale.NTKOperator`).
        preconditioner: of ``K_G + I/s²``, as for :class:`~ntkscale.gp.KernelGP` (default
            ``"nystrom"``).
        rank: the preconditioner's rank (default ``None``: the adaptive Nyström rank, as in
            :class:`ntkscale.gp.KernelGP`).
        tol: relative residual tolerance of the PCG solves (default 1e-8 in float64, 1e-4 in
            float32).
        max_iter: cap on PCG iterations per solve.
        exact_solver: ``"auto"`` (the kernel-only layer's cost model picks), ``"cg"`` or
            ``"cholesky"`` (a tiled float64 factor of ``K_G + I/s²``).
        test_block: test points per block of the covariance computation (each block is one
            PCG solve with ``test_block · C`` right-hand sides).
        progress: tqdm bars over blocks of test points.
        **operator_kwargs: for every :class:`ntkscale.NTKOperator` (``dtype``, ``params``,
            ``chunk_size``, ``memory_budget``, ...).

    Attributes:
        kernel: the GGN kernel ``Λ^{1/2} Θ Λ^{1/2}`` on the training set (lazy).
        posterior: the :class:`~ntkscale.gp.KernelGP` doing the algebra (noise 1, prior ``s²``).
        probs: the trained network's probabilities on the training set.  # shape: (N, C)
    """

    def __init__(
        self,
        model: nn.Module,
        X: Tensor,
        y: Tensor,
        prior_scale: float = 1.0,
        *,
        num_classes: int | None = None,
        backend: str = "auto",
        preconditioner: str | None = "nystrom",
        rank: int | None = None,
        tol: float | None = None,
        max_iter: int | None = None,
        exact_solver: str = "auto",
        test_block: int = 64,
        progress: bool = False,
        **operator_kwargs,
    ):
        prior_scale = check_prior_scale(prior_scale)
        if tol is not None:
            check_tol(tol)
        self.test_block = check_positive_int(test_block, "test_block", 64)
        if num_classes is not None:
            check_positive_int(num_classes, "num_classes", None)
        self._model = _frozen_copy(model, operator_kwargs.get("dtype"))
        self._operator_kwargs = dict(operator_kwargs)
        self.Theta = NTKOperator(self._model, X, backend=backend, **operator_kwargs)
        self._backend = self.Theta.backend
        self.X = self.Theta.X1
        self.num_train = N = self.X.shape[0]
        logits = self.forward(self.X)  # shape: (N, C), also checks the output
        C = logits.shape[-1]
        if self.Theta.num_outputs != C or logits.dim() != 2 or C < 2:
            raise ValueError(
                f"the model must output logits of shape (N, C) with C >= 2 classes; it returned "
                f"shape {tuple(logits.shape)}"
            )
        if num_classes is not None and num_classes != C:
            raise ValueError(
                f"num_classes={num_classes} but the model outputs {C} logits per sample; a softmax "
                f"classifier over {num_classes} classes must output {num_classes}"
            )
        self.num_classes = C
        self.y = _check_labels(y, N, C, self.X.device)
        self.progress = bool(progress)
        self.f_train = logits
        self.probs = torch.softmax(logits, dim=-1)  # shape: (N, C)
        self.kernel: GGNKernel = ggn_kernel(self.Theta, self.probs)
        self.posterior = KernelGP(
            self.kernel, torch.zeros(N * C, dtype=self.Theta.dtype, device=self.Theta.device),
            noise=1.0, prior_scale=prior_scale, preconditioner=preconditioner, rank=rank, tol=tol,
            max_iter=max_iter, exact_solver=exact_solver, column_group=C, progress=progress,
        )

    # -- hyperparameters ------------------------------------------------------------------------
    @property
    def prior_scale(self) -> float:
        """``s²``, the prior variance of the weights (the preconditioner is re-shifted, not rebuilt)."""
        return self.posterior.prior_scale

    @prior_scale.setter
    def prior_scale(self, value: float) -> None:
        self.posterior.prior_scale = check_prior_scale(value)

    def __repr__(self) -> str:
        return (
            f"NTKClassifierGP(N={self.num_train}, C={self.num_classes}, prior_scale={self.prior_scale:.3g}, "
            f"backend={self._backend!r}, dtype={self.Theta.dtype})"
        )

    # -- the network ------------------------------------------------------------------------------
    def forward(self, X: Tensor) -> Tensor:
        """The trained network's logits ``f(X; θ*)``, in chunks, without a graph.  # shape: (M, C)"""
        X = self._test_inputs(X)
        with torch.no_grad():
            out = [self._model(X[sl]) for sl in chunks(X.shape[0], self.Theta.chunk_size)]
        out = torch.cat(out)
        if out.dim() != 2:
            raise ValueError(
                f"the model must output logits of shape (N, C) with C >= 2 classes; it returned "
                f"shape {tuple(out.shape)}"
            )
        return out.to(self.Theta.dtype)

    def _test_inputs(self, X: Tensor) -> Tensor:
        if not torch.is_tensor(X):
            raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
        if hasattr(self, "X") and X.shape[1:] != self.X.shape[1:]:
            raise ValueError(
                f"X has per-sample shape {tuple(X.shape[1:])} but the training inputs have "
                f"{tuple(self.X.shape[1:])}"
            )
        if X.is_floating_point():
            X = X.to(self.Theta.dtype)
        return X.detach()

    # -- predictive -------------------------------------------------------------------------------
    def predict_logits(self, X_test: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and covariance of the linearized predictive logits.

        ``mean = f(x*; θ*)`` and ``cov = J* (Σ_i J_iᵀ Λ_i J_i + I/s²)⁻¹ J*ᵀ`` per test point,
        computed in function space: per block of test points, one PCG solve with
        ``test_block · C`` right-hand sides, or (when cheaper) one triangular solve with a tiled
        Cholesky factor of ``K_G + I/s²``.

        Args:
            X_test: test inputs.  # shape: (M, *in_shape)

        Returns:
            ``(mean, cov)`` of shapes (M, C) and (M, C, C); each ``cov[i]`` is symmetric PSD.
        """
        X_test = self._test_inputs(X_test)
        mean = self.forward(X_test)  # shape: (M, C)
        M, C = mean.shape
        s2, lam = self.prior_scale, self.posterior.ridge
        S = self.kernel.S  # shape: (N, C, C), Λ_i^{1/2}
        N = self.num_train
        cov = torch.empty(M, C, C, dtype=mean.dtype, device=mean.device)
        blocks = list(chunks(M, self.test_block))
        # the kernel-only layer picks the route: a tiled Cholesky factor of K_G + I/s² when its
        # cost model says the factor is cheaper than PCG for M·C right-hand sides
        chol = self.posterior.cholesky(lam) if self.posterior.use_cholesky(M * C) else None
        # one operator per side, sliced per block: each side's factors are computed once
        Kxs, Kss = self._kernel(self.X, X_test), self._kernel(X_test)
        for sl in tqdm(blocks, desc="logit covariances", disable=not self.progress, leave=False):
            b, rows = sl.stop - sl.start, slice(sl.start * C, sl.stop * C)
            prior = to_dense(Kss[rows, rows]).reshape(b, C, b, C)  # Θ** on the block
            idx = torch.arange(b, device=prior.device)
            prior = prior[idx, :, idx, :]  # shape: (b, C, C), the per-point blocks
            cross = to_dense(Kxs[:, rows]).reshape(N, C, b * C)  # Θ(X, X*)
            B = torch.bmm(S, cross).reshape(N * C, b * C)  # Λ^{1/2} Θ(X, X*)
            if chol is not None:  # Bᵀ (K_G + I/s²)⁻¹ B = (L⁻¹ B)ᵀ (L⁻¹ B)
                W = chol.solve_lower(B).to(B.dtype).reshape(N * C, b, C)
                quad = torch.einsum("nbc,nbd->bcd", W, W)
            else:
                Z, _ = self.posterior.solve(B, lam)  # (K_G + I/s²)⁻¹ B by PCG
                quad = torch.einsum("nbc,nbd->bcd", B.reshape(N * C, b, C), Z.reshape(N * C, b, C))
            blk = s2 * (prior - quad)
            cov[sl] = 0.5 * (blk + blk.mT)
        return mean, cov

    def predict(
        self,
        X_test: Tensor,
        link: str = "probit",
        num_samples: int = 1000,
        seed: int | None = None,
    ) -> Tensor:
        """Predictive class probabilities.

        Args:
            X_test: test inputs.  # shape: (M, *in_shape)
            link: ``"probit"`` — ``softmax(mean / sqrt(1 + π/8 · diag(cov)))`` per class (the
                multi-class probit approximation, as laplace-torch computes it); ``"mc"`` — the
                average of ``softmax(f)`` over ``num_samples`` samples ``f ~ N(mean, cov)``.
            num_samples: Monte Carlo samples per test point (``link="mc"``).
            seed: seed of the Monte Carlo samples.

        Returns:
            Probabilities, rows summing to 1.  # shape: (M, C)
        """
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {link!r}")
        num_samples = check_positive_int(num_samples, "num_samples", 1000)
        mean, cov = self.predict_logits(X_test)
        return probabilities(mean, cov, link=link, num_samples=num_samples, seed=seed)

    def predict_map(self, X_test: Tensor) -> Tensor:
        """The trained network's own probabilities ``softmax(f(x*; θ*))``.  # shape: (M, C)"""
        return torch.softmax(self.forward(X_test), dim=-1)

    def _kernel(self, X1: Tensor, X2: Tensor | None = None) -> NTKOperator:
        return NTKOperator(self._model, X1, X2, backend=self._backend, **self._operator_kwargs)


def probabilities(mean: Tensor, cov: Tensor, link: str = "probit", num_samples: int = 1000,
                  seed: int | None = None) -> Tensor:
    """Class probabilities of Gaussian logits ``N(mean, cov)`` by the probit link or Monte Carlo.

    Args:
        mean: logit means.  # shape: (M, C)
        cov: logit covariances, symmetric PSD.  # shape: (M, C, C)
        link: ``"probit"`` or ``"mc"`` (see :meth:`NTKClassifierGP.predict`).
        num_samples: Monte Carlo samples (``"mc"``).
        seed: seed of the samples.

    Returns:
        Probabilities.  # shape: (M, C)
    """
    if link == "probit":
        var = cov.diagonal(dim1=-2, dim2=-1).clamp_min(0)
        return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), dim=-1)
    if link != "mc":
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    evals, evecs = torch.linalg.eigh(cov)  # PSD roots; cov may be singular (rank C − 1 directions)
    root = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)  # shape: (M, C, C), root rootᵀ = cov
    gen = torch.Generator(device=mean.device)
    gen.manual_seed(0 if seed is None else int(seed))
    probs = torch.zeros_like(mean)
    for s in range(0, num_samples, 256):
        k = min(256, num_samples - s)
        eps = torch.randn(k, *mean.shape, dtype=mean.dtype, device=mean.device, generator=gen)
        f = mean + torch.einsum("mcd,kmd->kmc", root, eps)  # shape: (k, M, C)
        probs += torch.softmax(f, dim=-1).sum(0)
    return probs / num_samples


def _check_labels(y, N: int, C: int, device) -> Tensor:
    """``y`` as (N,) int64 labels in ``[0, C)``, else a ``ValueError`` saying what came."""
    if not torch.is_tensor(y):
        raise ValueError(f"y must be a torch.Tensor of N = {N} integer labels, got {type(y).__name__}")
    if y.dim() == 2 and y.shape == (N, C):
        raise ValueError(
            f"y must be integer class labels of shape ({N},), got shape {tuple(y.shape)}; for one-hot "
            f"targets pass y.argmax(-1)"
        )
    if y.shape != (N,):
        raise ValueError(f"y must be integer class labels of shape ({N},) to match X, got shape {tuple(y.shape)}")
    if y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must be integer class labels, got dtype {y.dtype}")
    if y.is_floating_point():
        bad = ~torch.isfinite(y) | (y != y.round())
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"y must be integer class labels in [0, {C}); got a non-integer value {y[i].item()!r} "
                f"(sample {i})"
            )
    y = y.detach().long().to(device)
    bad = (y < 0) | (y >= C)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"y must be class labels in [0, {C}) for a model with C = {C} logits; got {int(y[i])} "
            f"(sample {i}). Does the model output one logit per class?"
        )
    return y
