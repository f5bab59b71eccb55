"""``NTKKernel``: a network's empirical NTK as a GPyTorch kernel, lazily.

``NTKKernel(model)`` drops into a standard ``gpytorch.models.ExactGP`` (usually inside a
``ScaleKernel``, with a ``GaussianLikelihood``). Its ``forward(x1, x2)`` returns the
:class:`~ntkscale.NTKOperator` ``Θ(x1, x2)`` — a ``LinearOperator`` that is never formed unless
GPyTorch asks for it (it does for small problems, under ``gpytorch.settings.max_cholesky_size``
and ``max_eager_kernel_size``, 800 and 2 x 800 by default).

When GPyTorch solves with conjugate gradients (Cholesky off, or N above those sizes), it
preconditions ``K̂ = c Θ + D`` by a low-rank root ``L`` (``L Lᵀ ≈ c Θ``) and the Woodbury
identity. It asks the kernel for that root through ``pivoted_cholesky``; the NTK's operator
answers with the randomized Nyström factor ``L = U Λ̂^{1/2}`` of
:class:`~ntkscale.solvers.NystromPreconditioner` (rank ``preconditioner_rank``, cached per
training set: one product with the NTK, reused across optimizer steps, rescaled by the output
scale). GPyTorch's own default — a rank-15 greedy pivoted Cholesky — leaves CG far from
converged on an NTK, whose spectrum decays slowly after its first few eigenvalues.

Conventions:

* GPyTorch passes 2-D inputs ``(n, d)``; ``input_shape`` (e.g. ``(1, 8, 8)``) un-flattens them
  for convolutional networks.
* A network with C > 1 outputs gives a kernel with ``num_outputs_per_input == C`` whose rows are
  ordered ``(sample, output)`` — GPyTorch's *interleaved* multitask layout: use it with
  ``gpytorch.distributions.MultitaskMultivariateNormal(mean (n, C), covar)`` (interleaved, the
  default) and a ``MultitaskGaussianLikelihood(num_tasks=C, rank=0)``.
* The kernel is taken at the network's weights when the kernel is built (a frozen copy): the
  network is not a submodule, so ``gp.parameters()`` (and an optimizer over them) holds only
  the GP's hyperparameters.
* Batched kernels (``batch_shape``) and ``last_dim_is_batch`` are not supported.

Example:
    >>> import torch, gpytorch
    >>> from ntkscale.gpytorch import NTKKernel
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    >>> k = gpytorch.kernels.ScaleKernel(NTKKernel(net))
    >>> x = torch.randn(5, 2)
    >>> k(x).shape
    torch.Size([5, 5])
"""

from __future__ import annotations

from typing import Iterable, Sequence

import gpytorch
import torch
from linear_operator.operators import ConstantMulLinearOperator, LinearOperator
from torch import Tensor, nn

from .gp.ntkgp import _frozen_copy
from .operator import NTKOperator
from .solvers import NystromPreconditioner
from .solvers._utils import check_positive_int

__all__ = ["NTKKernel", "ScaledNTKOperator"]

DEFAULT_PRECONDITIONER_RANK = 100


class ScaledNTKOperator(ConstantMulLinearOperator):
    """``c · Θ`` for an :class:`~ntkscale.NTKOperator` ``Θ`` and a scalar tensor ``c``.

    What ``NTKKernel.forward`` returns (with ``c = 1``); ``ScaleKernel`` multiplies it by its
    output scale, which stays a ``ScaledNTKOperator`` (``c`` carries the gradient). Its
    :meth:`pivoted_cholesky` — the low-rank root GPyTorch builds its CG preconditioner from —
    is ntkscale's randomized Nyström factor instead of a greedy pivoted Cholesky.

    Args:
        base_linear_op: the NTK operator Θ.  # shape: (n, m)
        constant: the scale c, a 0-dim tensor.
        preconditioner_rank: rank of the Nyström factor (at least what GPyTorch asks for).
        nystrom_cache: a dict shared across copies, so the factor of one Θ is built once.
    """

    def __init__(
        self,
        base_linear_op: NTKOperator,
        constant: Tensor,
        preconditioner_rank: int = DEFAULT_PRECONDITIONER_RANK,
        nystrom_cache: dict | None = None,
    ):
        if not torch.is_tensor(constant):
            constant = torch.tensor(constant, device=base_linear_op.device, dtype=base_linear_op.dtype)
        LinearOperator.__init__(
            self,
            base_linear_op,
            constant,
            preconditioner_rank=preconditioner_rank,
            nystrom_cache=nystrom_cache,
        )
        self.base_linear_op = base_linear_op
        self._constant = constant
        self.preconditioner_rank = preconditioner_rank
        self.nystrom_cache = {} if nystrom_cache is None else nystrom_cache

    def _ntk_kwargs(self) -> dict:
        return {"preconditioner_rank": self.preconditioner_rank, "nystrom_cache": self.nystrom_cache}

    def _mul_constant(self, other) -> "ScaledNTKOperator":
        other = torch.as_tensor(other, dtype=self._constant.dtype, device=self._constant.device)
        return ScaledNTKOperator(self.base_linear_op, self._constant * other, **self._ntk_kwargs())

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        base = self.base_linear_op._getitem(row_index, col_index, *batch_indices)
        return ScaledNTKOperator(base, self._constant, **self._ntk_kwargs())

    def _transpose_nonbatch(self) -> "ScaledNTKOperator":
        return ScaledNTKOperator(self.base_linear_op._transpose_nonbatch(), self._constant, **self._ntk_kwargs())

    def nystrom_factor(self, rank: int | None = None) -> Tensor:
        """The Nyström root ``L = U Λ̂^{1/2}`` of the unscaled Θ (``L Lᵀ ≈ Θ``), cached.

        # shape: (n, r)
        """
        r = min(self.shape[-1], max(int(rank or 0), self.preconditioner_rank))
        X1 = self.base_linear_op.X1  # copies (detach, rebuilds) share its storage
        # the entry holds X1 itself, so its storage cannot be freed and reused by other data
        # while the key is cached; _version catches writes in place
        key = (X1.data_ptr(), X1.storage_offset(), tuple(X1.shape), X1._version, self.shape[-1], r)
        hit = self.nystrom_cache.get(key)
        if hit is None:
            with torch.no_grad():
                P = NystromPreconditioner(self.base_linear_op, noise=0.0, rank=r)
                hit = (X1, P.U * P.eigvals.clamp_min(0).sqrt())
            self.nystrom_cache.clear()  # one training set at a time
            self.nystrom_cache[key] = hit
        return hit[1]

    def pivoted_cholesky(self, rank: int, error_tol: float | None = None, return_pivots: bool = False):
        """A low-rank root ``L`` with ``L Lᵀ ≈ c Θ``: ntkscale's Nyström factor, scaled by √c.

        GPyTorch's ``AddedDiagLinearOperator`` calls this to build its Woodbury preconditioner
        ``L Lᵀ + D`` (and its log-determinant) for CG. The rank is
        ``max(rank, preconditioner_rank)``. Pivots have no meaning for a Nyström factor; with
        ``return_pivots=True`` (never asked by GPyTorch's solvers) this falls back to
        linear_operator's greedy pivoted Cholesky.
        """
        base = self.base_linear_op
        if return_pivots or self.shape[-1] != self.shape[-2] or not _same(base.X1, base.X2):
            return super().pivoted_cholesky(rank, error_tol=error_tol, return_pivots=return_pivots)
        return self.nystrom_factor(rank) * self._constant.clamp_min(0).sqrt()


class NTKKernel(gpytorch.kernels.Kernel):
    """The empirical NTK of a network as a ``gpytorch.kernels.Kernel``.

    Args:
        model: any ``nn.Module`` mapping a batch (n, *input_shape) to (n, C) or (n,). A frozen
            copy is taken: later training of ``model`` does not change this kernel.
        input_shape: per-sample shape the network expects, when GPyTorch's 2-D inputs (n, d)
            must be un-flattened (e.g. ``(1, 8, 8)`` for a CNN on 8x8 images); ``None`` passes
            them as they come.
        params: the parameters the NTK is taken over (as for :class:`~ntkscale.NTKOperator`).
        backend: the NTK backend (``"auto"`` lets the cost model pick).
        dtype: cast the network's copy to this dtype (default: the network's). Inputs must
            come in this dtype (e.g. ``gp.double()`` and float64 data).
        preconditioner_rank: rank of the Nyström factor used to precondition GPyTorch's CG.
        preconditioner: ``"nystrom"`` (default) or ``None`` for GPyTorch's own greedy pivoted
            Cholesky of rank ``gpytorch.settings.max_preconditioner_size`` (15 by default).
        operator_kwargs: further keyword arguments for :class:`~ntkscale.NTKOperator`
            (``chunk_size``, ``memory_budget``, ...).
        **kwargs: for ``gpytorch.kernels.Kernel`` (e.g. ``active_dims``).

    ``forward(x1, x2)`` returns a :class:`ScaledNTKOperator` of shape (n1·C, n2·C) holding the
    lazy cross-NTK; ``diag=True`` returns its exact diagonal (shape (n·C,)). Operators are cached
    per pair of input tensors, so repeated calls on the same training data (one per optimizer
    step) reuse the network's per-layer factors.
    """

    has_lengthscale = False

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int] | None = None,
        params: str | Tensor | Iterable[str | Tensor] | None = None,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        preconditioner_rank: int = DEFAULT_PRECONDITIONER_RANK,
        preconditioner: str | None = "nystrom",
        operator_kwargs: dict | None = None,
        **kwargs,
    ):
        if not isinstance(model, nn.Module):  # before anything else is checked
            raise TypeError(f"NTKKernel(model): model must be a torch.nn.Module, got {type(model).__name__}")
        if kwargs.get("batch_shape") not in (None, torch.Size([])):
            raise ValueError("NTKKernel does not support batch_shape (one kernel per network)")
        check_positive_int(preconditioner_rank, "preconditioner_rank")
        if preconditioner not in ("nystrom", None):
            raise ValueError(
                f"preconditioner must be 'nystrom' (ntkscale's Nyström root) or None (GPyTorch's own "
                f"greedy pivoted Cholesky), got {preconditioner!r}"
            )
        super().__init__(**kwargs)
        frozen = _frozen_copy(model, dtype, "NTKKernel(model)")
        # not a submodule: gp.parameters() must hold only the GP's hyperparameters, and
        # gp.double()/gp.to() must not touch the network
        object.__setattr__(self, "_network", frozen)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.params = params
        self.backend = backend
        self.preconditioner_rank = preconditioner_rank
        self.preconditioner = preconditioner
        self.operator_kwargs = dict(operator_kwargs or {})
        self._operators: list = []  # (x1, x2 or None, operator), most recent last
        self._nystrom_cache: dict = {}
        self._num_outputs: int | None = None

    @property
    def network(self) -> nn.Module:
        """The frozen copy of the network the kernel is taken at."""
        return self._network

    def _shape_inputs(self, x: Tensor, name: str) -> Tensor:
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(
                f"NTKKernel takes 2-D inputs (n, d) as GPyTorch passes them (no batch dimensions); "
                f"{name} has shape {tuple(x.shape)}"
            )
        if self.input_shape is None:
            return x
        d = 1
        for s in self.input_shape:
            d *= s
        if x.shape[-1] != d:
            raise ValueError(
                f"{name} has {x.shape[-1]} features per sample but input_shape={self.input_shape} "
                f"needs {d}"
            )
        return x.reshape(x.shape[0], *self.input_shape)

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        """C, the network's outputs per input (GPyTorch's multitask interleaving)."""
        if self._num_outputs is None:
            xs = self._shape_inputs(x1[..., :1, :] if x1.dim() == 2 else x1, "x1")
            with torch.no_grad():
                out = self._network(xs.to(next(self._network.parameters()).dtype))
            self._num_outputs = 1 if out.dim() == 1 else int(out.shape[-1])
        return self._num_outputs

    def operator(self, x1: Tensor, x2: Tensor | None = None) -> NTKOperator:
        """The (cached) NTK operator ``Θ(x1, x2)`` on GPyTorch-shaped inputs (n, d)."""
        square = x2 is None or x2 is x1 or _same(x1, x2)
        for i, (a, b, K) in enumerate(self._operators):
            if _same(a, x1) and ((b is None) if square else (b is not None and _same(b, x2))):
                self._operators.append(self._operators.pop(i))
                return K
        X1 = self._shape_inputs(x1.detach(), "x1")
        X2 = None if square else self._shape_inputs(x2.detach(), "x2")
        K = NTKOperator(self._network, X1, X2, backend=self.backend, params=self.params, **self.operator_kwargs)
        self._operators.append((x1.detach().clone(), None if square else x2.detach().clone(), K))
        while len(self._operators) > 4:  # train, test-train, test and the joint set
            self._operators.pop(0)
        return K

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise ValueError("NTKKernel does not support last_dim_is_batch=True")
        K = self.operator(x1, x2)
        if diag:
            if K.shape[0] != K.shape[1]:
                raise ValueError(f"diag=True needs as many rows as columns; x1 and x2 give {tuple(K.shape)}")
            return K.diagonal()  # exact: squared Jacobian norms, or Θ(x1_i, x2_i) entries
        one = torch.ones((), dtype=K.dtype, device=K.device)
        if self.preconditioner is None:
            return ConstantMulLinearOperator(K, one)
        return ScaledNTKOperator(K, one, preconditioner_rank=self.preconditioner_rank, nystrom_cache=self._nystrom_cache)


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
