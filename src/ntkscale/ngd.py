"""Natural gradient descent in function space (Zhang, Martens & Grosse 2019), matrix-free.

For the MSE loss the function-space natural gradient step is

    θ ← θ − η Jᵀ (J Jᵀ + λ I)⁻¹ (f(X) − y)

with ``J = ∂f(X)/∂θ`` and ``J Jᵀ = Θ`` the NTK on the batch. The solve runs by preconditioned
CG on :class:`ntkscale.NTKOperator` (never forming ``Θ``), and ``Jᵀ`` is applied by one chunked
VJP (``torch.func.vjp`` over ``torch.func.functional_call``). With ``η = 1`` and ``λ → 0`` one
step moves the linearized network onto the targets (the Gauss–Newton step).

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    >>> X = torch.randn(16, 2)
    >>> y = torch.sin(X[:, :1])
    >>> opt = FunctionSpaceNGD(model, lr=1.0, damping=0.1)
    >>> info = opt.step(X, y)
    >>> info.loss_after < info.loss_before
    True
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp

from ._checks import check_targets
from .functional import chunks, select_parameters
from .operator import NTKOperator
from .solvers import SolveInfo, solve
from .solvers._utils import check_float

__all__ = ["FunctionSpaceNGD", "NGDInfo", "ngd_step"]


@dataclass
class NGDInfo:
    """What one :func:`ngd_step` did.

    Attributes:
        loss_before: MSE ``mean((f(X) − y)²)`` over all N·C entries before the step.
        loss_after: the same after the step (one extra forward pass).
        iterations: CG iterations of the solve.
        residual_norm: final true relative residual of the CG solve.
        converged: whether CG reached ``tol``.
        step_norm: ``η ‖Jᵀ (Θ + λ I)⁻¹ (f − y)‖``, the length of the parameter update.
        seconds: wall time of the whole step.
        solve_info: the full :class:`ntkscale.solvers.SolveInfo`.
    """

    loss_before: float
    loss_after: float
    iterations: int
    residual_norm: float
    converged: bool
    step_norm: float
    seconds: float
    solve_info: SolveInfo


def ngd_step(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    lr: float,
    damping: float,
    backend: str = "auto",
    tol: float | None = None,
    max_iter: int | None = None,
    preconditioner: str | None = "nystrom",
    rank: int | None = None,
    params=None,
    chunk_size: int | None = None,
    **operator_kwargs,
) -> NGDInfo:
    """One function-space natural gradient step on the MSE, updating ``model`` in place.

    ``θ ← θ − lr · Jᵀ (Θ + damping · I)⁻¹ (f(X) − y)``: the solve by (preconditioned) CG on the
    NTK operator of the batch, then ``Jᵀ`` by a chunked VJP. Parameters not taken by the kernel
    (``params``; default all that require grad) are left as they are. Computation runs in the
    parameters' dtype; the data is cast to it.

    Args:
        model: the network, mapping ``X`` (N, *in_shape) to (N, C) or (N,).
        X: inputs of the batch.  # shape: (N, *in_shape)
        y: targets.  # shape: (N, C), or (N,) when C = 1
        lr: step size ``η > 0``.
        damping: ``λ ≥ 0`` added to the NTK's diagonal (``0`` only when ``Θ`` is nonsingular).
        backend: backend of the NTK operator (see :class:`ntkscale.NTKOperator`).
        tol: relative residual tolerance of CG (default that of :func:`ntkscale.solvers.solve`).
        max_iter: cap on CG iterations (default that of :func:`ntkscale.solvers.solve`).
        preconditioner: ``"nystrom"``, ``"pivchol"``, ``"jacobi"`` or ``None``.
        rank: rank of the low-rank preconditioners.
        params: the parameters stepped (names or tensors, as in :class:`ntkscale.NTKOperator`).
        chunk_size: samples per forward/VJP pass (default the operator's).
        **operator_kwargs: passed to :class:`ntkscale.NTKOperator` (e.g. ``memory_budget``).

    Returns:
        An :class:`NGDInfo`.

    Raises:
        ValueError: ``lr ≤ 0``, ``damping < 0``, ``y`` of the wrong shape or with NaN/inf.
    """
    start = time.perf_counter()
    lr = check_float(lr, "lr", positive=True)
    damping = check_float(damping, "damping", positive=False)
    if "dtype" in operator_kwargs:
        raise ValueError("ngd_step computes in the model's dtype; convert the model instead of passing dtype")
    names, _ = select_parameters(model, params)
    named = dict(model.named_parameters())
    theta = {n: named[n] for n in names}
    ref = next(iter(theta.values()))
    dtype, device = ref.dtype, ref.device
    X = X.detach()
    if X.is_floating_point():
        X = X.to(dtype)
    K = NTKOperator(model, X, backend=backend, chunk_size=chunk_size, params=params, **operator_kwargs)
    N, C = X.shape[0], K.num_outputs
    y = check_targets(y, N, C, dtype, device)
    chunk = K.chunk_size

    f = _forward(model, X, C, chunk)  # shape: (N, C)
    resid = f - y
    loss_before = resid.square().mean().item()
    v, info = solve(
        K, resid.reshape(-1), noise=damping, preconditioner=preconditioner, tol=tol, max_iter=max_iter, rank=rank
    )
    V = v.reshape(N, C).to(dtype)  # cotangent, shape: (N, C)

    # Jᵀ V, chunk by chunk: one VJP of the network's output with respect to the stepped parameters.
    # The parameters not stepped enter detached, so no graph reaches the user's module.
    others = {n: p.detach() for n, p in named.items() if n not in theta}
    primals = {n: p.detach() for n, p in theta.items()}
    grads = {n: torch.zeros_like(p) for n, p in primals.items()}
    for sl in chunks(N, chunk):
        xs = X[sl]

        def fn(p, xs=xs):
            return functional_call(model, {**others, **p}, (xs,)).reshape(xs.shape[0], C)

        _, pullback = vjp(fn, primals)
        (g,) = pullback(V[sl])
        for n in grads:
            grads[n].add_(g[n].detach())
    sq = sum(g.square().sum().item() for g in grads.values())
    with torch.no_grad():
        for n, p in theta.items():
            p.sub_(lr * grads[n])
    loss_after = (_forward(model, X, C, chunk) - y).square().mean().item()
    return NGDInfo(
        loss_before=loss_before,
        loss_after=loss_after,
        iterations=info.iterations,
        residual_norm=info.residual_norm.max().item(),
        converged=info.converged,
        step_norm=lr * math.sqrt(float(sq)),
        seconds=time.perf_counter() - start,
        solve_info=info,
    )


class FunctionSpaceNGD(torch.optim.Optimizer):
    """Function-space natural gradient descent on the MSE as a ``torch.optim.Optimizer``.

    ``opt.step(X, y)`` takes one :func:`ngd_step` on the batch and returns its :class:`NGDInfo`.
    ``lr`` and ``damping`` live in ``param_groups[0]``, so learning-rate schedulers work. The
    gradients in ``.grad`` are not used (the step computes its own).

    Args:
        model: the network (all its parameters that require grad are stepped, or ``params``).
        lr: step size ``η > 0``.
        damping: ``λ ≥ 0``.
        params: which parameters (names or tensors) the kernel and the step are taken over.
        **kwargs: passed to :func:`ngd_step` (``backend``, ``tol``, ``max_iter``,
            ``preconditioner``, ``rank``, ``chunk_size``, ...).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> opt = FunctionSpaceNGD(model, lr=0.5, damping=0.1)
        >>> X = torch.randn(8, 2)
        >>> y = torch.sin(X[:, :1])
        >>> losses = [opt.step(X, y).loss_after for _ in range(3)]
        >>> losses[-1] < losses[0]
        True
    """

    def __init__(self, model: nn.Module, lr: float = 1.0, damping: float = 1e-3, params=None, **kwargs):
        check_float(lr, "lr", positive=True)
        check_float(damping, "damping", positive=False)
        names, _ = select_parameters(model, params)
        named = dict(model.named_parameters())
        super().__init__([named[n] for n in names], {"lr": lr, "damping": damping})
        self.model = model
        self._params_arg = names
        self._kwargs = kwargs
        self.last_info: NGDInfo | None = None

    def step(self, X: Tensor, y: Tensor) -> NGDInfo:  # type: ignore[override]
        """One natural gradient step on the batch ``(X, y)``; returns its :class:`NGDInfo`."""
        group = self.param_groups[0]
        self.last_info = ngd_step(
            self.model, X, y, lr=group["lr"], damping=group["damping"], params=self._params_arg, **self._kwargs
        )
        return self.last_info


def _forward(model: nn.Module, X: Tensor, C: int, chunk: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(X[sl]).reshape(-1, C) for sl in chunks(X.shape[0], chunk)])
