"""The interface every matvec engine implements, and the data it works on.

Shapes used throughout: a data side holds ``X`` (n, *in_shape); the network has C outputs; a
parameter-space vector is a tuple with one tensor per differentiated parameter, each with a
leading axis of k right-hand sides: ``(k, *p.shape)``. Kernel-space vectors are ``(n, C, k)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..functional import FunctionalModel, chunks

__all__ = ["KernelData", "Backend", "ParamVec", "DEFAULT_FACTOR_BUDGET", "GradientSum", "flatten", "unflatten"]

DEFAULT_FACTOR_BUDGET = 4 * 2**30  # bytes of cached factors before falling back to recomputation

ParamVec = tuple[Tensor, ...]  # one (k, *p.shape) tensor per differentiated parameter


class GradientSum:
    """The sum of per-chunk parameter gradients, without writing into autograd's outputs.

    Gradients returned by one backward pass may share memory with one another (a broadcast over
    a batch of one sample hands the same buffer to two parameters, and a ``cat``'s backward hands
    out views of it), so the first chunk's tensors are never added to in place: the sum is formed
    out of place at the second chunk and in place after that.
    """

    def __init__(self) -> None:
        self._parts: list[Tensor] | None = None
        self._owned = False

    def add(self, grads) -> None:
        if self._parts is None:
            self._parts = list(grads)
        elif not self._owned:
            self._parts = [a + g for a, g in zip(self._parts, grads)]
            self._owned = True
        else:
            for a, g in zip(self._parts, grads):
                a.add_(g)

    def result(self) -> list[Tensor]:
        if self._parts is None:
            raise ValueError("no gradients were added (an empty data side)")
        return self._parts


@dataclass(eq=False)
class KernelData:
    """Everything a backend needs to evaluate ``Θ(X1, X2) = J(X1) J(X2)ᵀ``.

    Attributes:
        fm: the functional model.
        params: differentiated parameter tensors (snapshots).
        fixed: the other parameters and the buffers (snapshots).
        X1, X2: the two data sides; ``X2 is X1`` semantics when ``square``.
        square: whether the kernel is the symmetric ``Θ(X1, X1)``.
        chunk_size: samples per forward/backward pass.
        memory_budget: bytes a backend may spend on temporary buffers (Jacobian chunks, factors)
            and on the autodiff backend's linearization.
        cache: a dict shared by every rebuilt copy of one operator (see :meth:`cached`).
        factor_budget: bytes of cached per-layer factors (structured backends); None: default.
    """

    fm: FunctionalModel
    params: tuple[Tensor, ...]
    fixed: tuple[Tensor, ...]
    X1: Tensor
    X2: Tensor
    square: bool
    chunk_size: int
    memory_budget: int
    cache: dict = field(default_factory=dict)
    factor_budget: int | None = None

    @property
    def num_outputs(self) -> int:
        return self.fm.num_outputs

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def signature(self, *tensors: Tensor) -> tuple:
        """A key that changes when any of ``tensors`` (or the parameters) is replaced or modified."""
        return tuple(
            (t.data_ptr(), t.dtype, t.device, tuple(t.shape), t._version)
            for t in (*tensors, *self.params, *self.fixed)
        )

    def cached(self, name: str, tensors: tuple[Tensor, ...], build: Callable[[], Any]) -> Any:
        """Memoize ``build()`` under ``name`` for these exact tensors (one entry per name)."""
        key = self.signature(*tensors)
        hit = self.cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        self.cache[name] = (key, value)
        return value

    def jac_chunk_size(self) -> int:
        """Samples per explicit-Jacobian chunk, so that ``chunk·C·P`` numbers fit the budget."""
        per_sample = self.num_outputs * self.num_params * self.params[0].element_size() * 2
        return max(1, min(self.chunk_size, self.memory_budget // max(per_sample, 1)))


class Backend:
    """A way to multiply with the NTK. Subclasses override what they do faster.

    The defaults express everything through three primitives — ``vjp`` (``J(X)ᵀ V``), ``jvp``
    (``J(X) U``) and ``jacobian`` (explicit ``J(X)`` by chunks) — which :class:`AutodiffBackend`
    implements with ``torch.func``.
    """

    name = "base"

    # -- primitives ---------------------------------------------------------------------------
    def vjp(self, data: KernelData, X: Tensor, V: Tensor) -> ParamVec:
        """``J(X)ᵀ V`` for ``V`` of shape (n, C, k); returns one (k, *p.shape) tensor per param."""
        raise NotImplementedError

    def jvp(self, data: KernelData, X: Tensor, U: ParamVec) -> Tensor:
        """``J(X) U`` for a parameter-space ``U`` with k columns; returns (n, C, k)."""
        raise NotImplementedError

    def jacobian(self, data: KernelData, X: Tensor) -> Tensor:
        """Explicit Jacobian of ``X``, flattened: shape (n, C, P). Memory n·C·P: small n only."""
        fm = data.fm
        blocks = []
        for sl in chunks(X.shape[0], data.jac_chunk_size()):
            jac = fm.per_sample_jacobian(data.params, data.fixed, X[sl])
            n = X[sl].shape[0]
            blocks.append(torch.cat([j.reshape(n, fm.num_outputs, -1) for j in jac], dim=-1))
        return torch.cat(blocks, dim=0)

    # -- kernel operations --------------------------------------------------------------------
    def matmul(self, data: KernelData, V: Tensor) -> Tensor:
        """``Θ(X1, X2) V`` for V (N2, C, k); returns (N1, C, k)."""
        return self.jvp(data, data.X1, self.vjp(data, data.X2, V))

    def diagonal(self, data: KernelData) -> Tensor:
        """Exact diagonal of the square kernel: ``‖∂f_c(x_i)/∂θ‖²``, shape (N1, C)."""
        out = []
        fm = data.fm
        for sl in chunks(data.X1.shape[0], data.jac_chunk_size()):
            jac = fm.per_sample_jacobian(data.params, data.fixed, data.X1[sl])
            out.append(sum(j.square().flatten(start_dim=2).sum(-1) for j in jac))
        return torch.cat(out, dim=0)

    def gram(self, data: KernelData, X1: Tensor, X2: Tensor, rows: Tensor | None = None) -> Tensor:
        """Explicit block ``Θ(X1, X2)``, shape (n1·C, n2·C), or only its rows ``rows`` (flat
        ``(sample, output)`` ids into X1), shape (len(rows), n2·C).

        Explicit Jacobian rows of X1 (in memory-bounded blocks of samples), then one JVP pass over
        X2 with them as tangents: only the requested rows become tangents, so a few rows of a
        large kernel (pivoted Cholesky) cost a few tangents, not C per touched sample.
        """
        C = data.num_outputs
        n1, n2 = X1.shape[0], X2.shape[0]
        if rows is None and n1 > n2:  # fewer tangents the other way round; Θ(X1, X2) = Θ(X2, X1)ᵀ
            return Backend.gram(self, data, X2, X1).T
        ids = torch.arange(n1 * C) if rows is None else rows.cpu()
        samples = torch.div(ids, C, rounding_mode="floor")
        out = torch.empty(ids.numel(), n2 * C, dtype=data.dtype, device=X1.device)
        # samples per Jacobian block: at most 64 tangents per JVP pass (each costs an activation copy)
        block = max(1, min(data.jac_chunk_size(), 64 // C or 1))
        for sl in chunks(n1, block):
            sel = ((samples >= sl.start) & (samples < sl.stop)).nonzero().flatten()
            if sel.numel() == 0:
                continue
            J = self.jacobian(data, X1[sl]).flatten(0, 1)  # (b*C, P)
            J = J[(ids[sel] - sl.start * C).to(J.device)]  # only the requested rows
            res = self.jvp(data, X2, unflatten(J, data.params))  # (n2, C, m)
            out[sel.to(out.device)] = res.reshape(n2 * C, -1).T
        return out


def unflatten(flat: Tensor, params: tuple[Tensor, ...]) -> ParamVec:
    """(k, P) -> one (k, *p.shape) tensor per parameter."""
    out, start = [], 0
    for p in params:
        out.append(flat[:, start : start + p.numel()].reshape(flat.shape[0], *p.shape))
        start += p.numel()
    return tuple(out)


def flatten(U: ParamVec) -> Tensor:
    """One (k, *p.shape) tensor per parameter -> (k, P)."""
    return torch.cat([u.reshape(u.shape[0], -1) for u in U], dim=1)
