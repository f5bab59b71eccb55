"""The Jacobian difference ``ΔJ = J(θ) − J(θ₀)`` of a network on data, matrix-free.

``J(θ)`` is the (N·C, P) Jacobian of the outputs on ``X`` (rows ``i·C + c``, as
:class:`ntkscale.NTKOperator`). :class:`JacobianDifferenceOperator` is the symmetric PSD
``ΔJ ΔJᵀ`` (N·C, N·C) as a lazy ``LinearOperator`` over the NTK operators at the two parameter
settings: a product is one VJP and one JVP at each of them, never a Jacobian. :func:`jacobian_difference_norm` gives the spectral
norm ``‖ΔJ‖₂ = √λ_max(ΔJ ΔJᵀ)`` by Lanczos, and ``‖ΔJ‖₂ / ‖θ − θ₀‖``, the quantity behind the
Jacobian stability constant of lazy-training analyses.

>>> import torch, ntkscale as nks
>>> from ntkscale.models import MLP
>>> _ = torch.manual_seed(0)
>>> net = MLP(3, [8], 1).double()
>>> p0 = {n: p.detach().clone() for n, p in net.named_parameters()}
>>> p1 = {n: p + 0.1 * torch.randn_like(p) for n, p in p0.items()}
>>> r = nks.jacobian_difference_norm(net, torch.randn(5, 3, dtype=torch.float64), p1, p0)
>>> r.norm > 0 and r.param_distance > 0
True
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Mapping

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from .operator import NTKOperator
from .solvers import eigvalsh_extremes

__all__ = ["JacobianDifferenceOperator", "JacobianDifference", "jacobian_difference_norm"]


def _as_params(model: nn.Module, names: list[str], params, what: str) -> tuple[Tensor, ...]:
    if isinstance(params, nn.Module):
        params = dict(params.named_parameters())
    if not isinstance(params, Mapping):
        raise TypeError(f"{what} must be a mapping name -> tensor or an nn.Module, got {type(params).__name__}")
    ref = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"{what} lacks the model's parameters {missing[:5]}{' …' if len(missing) > 5 else ''}")
    out = []
    for n in names:
        t = params[n]
        if not isinstance(t, Tensor) or t.shape != ref[n].shape:
            raise ValueError(f"{what}[{n!r}] must be a tensor of shape {tuple(ref[n].shape)}, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
        out.append(t.detach())
    return tuple(out)


def _at(model: nn.Module, names: list[str], values: tuple[Tensor, ...]) -> nn.Module:
    """A copy of ``model`` with the parameters ``names`` set to ``values``."""
    copy_ = copy.deepcopy(model)
    own = dict(copy_.named_parameters())
    with torch.no_grad():
        for n, v in zip(names, values):
            own[n].copy_(v)
    return copy_


class JacobianDifferenceOperator(LinearOperator):
    """``ΔJ ΔJᵀ`` with ``ΔJ = J(θ) − J(θ₀)``, the Jacobians of ``model`` on ``X``.

    Built on the NTK operators ``Θ(θ) = J(θ) J(θ)ᵀ`` and ``Θ(θ₀)`` of the network at the two
    settings (their chunking within ``memory_budget``, their backends and caches): a product is
    ``ΔJ (J(θ)ᵀ V − J(θ₀)ᵀ V)``, one VJP and one JVP at each setting, never a Jacobian.

    Args:
        model: an ``nn.Module`` mapping ``X`` (N, *in_shape) to (N, C) or (N,); only its structure
            and buffers are used.
        X: data.  # shape: (N, *in_shape)
        params: ``θ``: name -> tensor for every parameter of ``model`` that requires grad, or a
            module of the same structure.
        params0: ``θ₀``, the same way.
        chunk_size: samples per VJP/JVP (default: from ``memory_budget``, as
            :class:`ntkscale.NTKOperator`).
        backend, memory_budget: passed to both :class:`ntkscale.NTKOperator`.
    """

    def __init__(self, model, X: Tensor | None = None, params=None, params0=None, *,
                 chunk_size: int | None = None, backend: str = "auto", memory_budget: int | None = None):
        if isinstance(model, NTKOperator):  # rebuilt by linear_operator from (K, K0)
            K, K0 = model, X
        else:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
            if not isinstance(X, Tensor) or X.dim() < 1 or X.shape[0] == 0:
                raise ValueError(f"X must be a non-empty tensor (N, *in_shape), got {getattr(X, 'shape', type(X).__name__)}")
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            if not names:
                raise ValueError("model has no parameters that require grad")
            th = _as_params(model, names, params, "params")
            th0 = _as_params(model, names, params0, "params0")
            kw = dict(backend=backend, chunk_size=chunk_size, memory_budget=memory_budget)
            K = NTKOperator(_at(model, names, th), X, **kw)
            K0 = NTKOperator(_at(model, names, th0), X, **{**kw, "chunk_size": K.chunk_size})
        super().__init__(K, K0)
        self.K, self.K0 = K, K0
        self.X = K.X1
        self.theta, self.theta0 = K.params, K0.params

    @property
    def num_outputs(self) -> int:
        return self.K.num_outputs

    def _size(self) -> torch.Size:
        return self.K.shape

    def _transpose_nonbatch(self) -> "JacobianDifferenceOperator":
        return self

    def vjp(self, V: Tensor) -> Tensor:
        """``ΔJᵀ V``, rows in the order of the parameters flattened.  # V: (N·C, k) -> (P, k)"""
        return self.K.vjp(V) - self.K0.vjp(V)

    def jvp(self, U: Tensor) -> Tensor:
        """``ΔJ U``.  # U: (P, k) -> (N·C, k)"""
        return self.K.jvp(U) - self.K0.jvp(U)

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.jvp(self.vjp(rhs))


@dataclass(frozen=True)
class JacobianDifference:
    """Spectral norm of ``ΔJ = J(θ) − J(θ₀)``.

    Attributes:
        norm: ``‖ΔJ‖₂`` (the square root of the largest Ritz value of ``ΔJ ΔJᵀ``, a lower bound
            that is exact to ``error_bound``).
        param_distance: ``‖θ − θ₀‖`` (Euclidean, over all differentiated parameters).
        ratio: ``norm / param_distance`` (``nan`` when the distance is 0).
        error_bound: the Lanczos residual bound on ``norm²``.
        iterations: Lanczos iterations.
        converged: whether the bound met the tolerance.
    """

    norm: float
    param_distance: float
    ratio: float
    error_bound: float
    iterations: int
    converged: bool


def jacobian_difference_norm(model: nn.Module, X: Tensor, params, params0, *, num_iter: int | None = None,
                             tol: float = 1e-6, seed: int = 0, chunk_size: int | None = None) -> JacobianDifference:
    """``‖J(θ) − J(θ₀)‖₂`` on ``X`` by Lanczos on ``ΔJ ΔJᵀ``, matrix-free.

    Args:
        model, X, params, params0, chunk_size: as :class:`JacobianDifferenceOperator`.
        num_iter: cap on Lanczos iterations (default ``min(N·C, 1000)``).
        tol: relative accuracy of the largest eigenvalue (see :func:`ntkscale.eigvalsh_extremes`).
        seed: seed of the Lanczos start vector.

    Returns:
        :class:`JacobianDifference`.
    """
    op = JacobianDifferenceOperator(model, X, params, params0, chunk_size=chunk_size)
    dist = math.sqrt(sum(float((a - b).double().square().sum()) for a, b in zip(op.theta, op.theta0)))
    res = eigvalsh_extremes(op, k=1, num_iter=num_iter, tol=tol, seed=seed)
    lam = max(float(res.largest[0]), 0.0)
    norm = math.sqrt(lam)
    return JacobianDifference(
        norm=norm,
        param_distance=dist,
        ratio=norm / dist if dist > 0 else math.nan,
        error_bound=float(res.largest_error_bounds[0]),
        iterations=res.iterations,
        converged=res.converged,
    )
