"""The Jacobian difference ``ΔJ = J(θ) − J(θ₀)`` of a network on data, matrix-free.

``J(θ)`` is the (N·C, P) Jacobian of the outputs on ``X`` (rows ``i·C + c``, as
:class:`ntkscale.NTKOperator`). :class:`JacobianDifferenceOperator` is the symmetric PSD
``ΔJ ΔJᵀ`` (N·C, N·C) as a lazy ``LinearOperator``: a product is one VJP and one JVP at each of the
two parameter settings, never a Jacobian. :func:`jacobian_difference_norm` gives the spectral
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

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn
from torch.func import functional_call

from .solvers import eigvalsh_extremes

__all__ = ["JacobianDifferenceOperator", "JacobianDifference", "jacobian_difference_norm"]


@dataclass(frozen=True)
class _State:
    model: nn.Module
    names: tuple[str, ...]
    fixed_names: tuple[str, ...]
    num_outputs: int
    chunk_size: int


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


class JacobianDifferenceOperator(LinearOperator):
    """``ΔJ ΔJᵀ`` with ``ΔJ = J(θ) − J(θ₀)``, the Jacobians of ``model`` on ``X``.

    Args:
        model: an ``nn.Module`` mapping ``X`` (N, *in_shape) to (N, C) or (N,); only its structure
            and buffers are used.
        X: data.  # shape: (N, *in_shape)
        params: ``θ``: name -> tensor for every parameter of ``model`` that requires grad, or a
            module of the same structure.
        params0: ``θ₀``, the same way.
        chunk_size: samples per VJP/JVP (default all).
    """

    def __init__(self, model: nn.Module, X: Tensor, params=None, params0=None, *tensors: Tensor,
                 chunk_size: int | None = None, _state: _State | None = None):
        if _state is None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
            if not isinstance(X, Tensor) or X.dim() < 1 or X.shape[0] == 0:
                raise ValueError(f"X must be a non-empty tensor (N, *in_shape), got {getattr(X, 'shape', type(X).__name__)}")
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            if not names:
                raise ValueError("model has no parameters that require grad")
            th = _as_params(model, names, params, "params")
            th0 = _as_params(model, names, params0, "params0")
            fixed_names = [n for n, p in model.named_parameters() if not p.requires_grad]
            fixed_names += [n for n, _ in model.named_buffers()]
            tensors_ = dict(model.named_parameters()) | dict(model.named_buffers())
            fixed = tuple(tensors_[n].detach() for n in fixed_names)
            if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
                raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
            with torch.no_grad():
                probe = functional_call(model, dict(zip(names, th)) | dict(zip(fixed_names, fixed)), (X[:1],))
            C = probe[0].numel() if probe.dim() > 1 else 1
            _state = _State(model, tuple(names), tuple(fixed_names), C, chunk_size or X.shape[0])
            args = (X, *th, *th0, *fixed)
        else:
            args = (model, X, params, params0, *tensors)  # rebuilt: (X, *θ, *θ₀, *fixed)
        super().__init__(*args, _state=_state)
        self._st = _state
        n = len(_state.names)
        self.X = args[0]
        self.theta = tuple(args[1 : 1 + n])
        self.theta0 = tuple(args[1 + n : 1 + 2 * n])
        self.fixed = tuple(args[1 + 2 * n :])

    @property
    def num_outputs(self) -> int:
        return self._st.num_outputs

    def _f(self, params, x):
        st = self._st
        t = dict(zip(st.names, params)) | dict(zip(st.fixed_names, self.fixed))
        return functional_call(st.model, t, (x,)).reshape(x.shape[0], st.num_outputs)

    def _size(self) -> torch.Size:
        n = self.X.shape[0] * self._st.num_outputs
        return torch.Size((n, n))

    def _transpose_nonbatch(self) -> "JacobianDifferenceOperator":
        return self

    def vjp(self, V: Tensor) -> tuple[Tensor, ...]:
        """``ΔJᵀ V`` per parameter, shape ``(k, *p.shape)``, for ``V`` (N·C, k)."""
        st, k = self._st, V.shape[-1]
        Vr = V.reshape(self.X.shape[0], st.num_outputs, k).permute(2, 0, 1)
        out = None
        for s in range(0, self.X.shape[0], st.chunk_size):
            x, v = self.X[s : s + st.chunk_size], Vr[:, s : s + st.chunk_size]
            parts = []
            for th in (self.theta, self.theta0):
                _, fn = torch.func.vjp(lambda p: self._f(p, x), th)
                parts.append(torch.func.vmap(fn)(v.contiguous())[0])
            diff = tuple(a - b for a, b in zip(*parts))
            out = diff if out is None else tuple(o + d for o, d in zip(out, diff))
        return out

    def jvp(self, U: tuple[Tensor, ...]) -> Tensor:
        """``ΔJ U`` for ``U`` per parameter with a leading ``k``: shape (N·C, k)."""
        st = self._st
        rows = []
        for s in range(0, self.X.shape[0], st.chunk_size):
            x = self.X[s : s + st.chunk_size]
            parts = []
            for th in (self.theta, self.theta0):
                def one(u, th=th):
                    return torch.func.jvp(lambda p: self._f(p, x), (th,), (u,))[1]

                parts.append(torch.func.vmap(one)(U))  # (k, n, C)
            rows.append((parts[0] - parts[1]).permute(1, 2, 0))
        out = torch.cat(rows)
        return out.reshape(-1, out.shape[-1])

    def _matmul(self, rhs: Tensor) -> Tensor:
        squeeze = rhs.dim() == 1
        R = rhs.unsqueeze(-1) if squeeze else rhs
        out = self.jvp(self.vjp(R))
        return out.squeeze(-1) if squeeze else out


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
