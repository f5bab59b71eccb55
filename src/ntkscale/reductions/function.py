"""The one autograd Function behind the fast kernel-space reductions (KeOps and compiled).

A kernel-space product ``out = Θ(1, 2) V`` is linear in ``V`` with the transpose ``Θ(2, 1)``, so
its backward is the same reduction with the roles of sides 1 and 2 swapped:
``grad_V = Θ(2, 1) grad_out``. Gradients with respect to the factors ``A1, G1, A2, G2`` are not
computed (``None``; a warning says so when one of them requires grad); ``impl="torch"`` gives
those.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["KernelSpaceProduct", "Reduction", "apply_reduction"]

#: ``reduce(A1, G1, A2, G2, V) -> out``: an unchecked reduction over ``j`` on contiguous inputs.
Reduction = Callable[[Sequence[Tensor], Sequence[Tensor], Sequence[Tensor], Sequence[Tensor], Tensor], Tensor]


def _split(factors: Sequence[Tensor], L: int):
    return tuple(tuple(factors[q * L:(q + 1) * L]) for q in range(4))


class KernelSpaceProduct(torch.autograd.Function):
    """``Θ(1, 2) V`` through a fast reduction, differentiable with respect to ``V`` only.

    Call as ``KernelSpaceProduct.apply(V, reduce, impl, L, *A1, *G1, *A2, *G2)``; prefer
    :func:`apply_reduction`.
    """

    @staticmethod
    def forward(ctx, V: Tensor, reduce: Reduction, impl: str, L: int, *factors: Tensor) -> Tensor:
        """``Θ(1, 2) V`` by ``reduce``; the factors are saved for the backward pass."""
        ctx.reduce, ctx.impl, ctx.L = reduce, impl, L
        ctx.save_for_backward(*factors)
        A1, G1, A2, G2 = _split(factors, L)
        return reduce(A1, G1, A2, G2, V)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        """Gradient with respect to ``V``: the same reduction with the two sides swapped."""
        factors = ctx.saved_tensors
        A1, G1, A2, G2 = _split(factors, ctx.L)
        if any(ctx.needs_input_grad[4:]):
            warnings.warn(
                f"impl={ctx.impl!r} differentiates with respect to V only; the gradients with "
                "respect to the factors A1, G1, A2, G2 are left None (use impl='torch' for those)",
                stacklevel=2,
            )
        grad_V = None
        if ctx.needs_input_grad[0]:
            grad_V = ctx.reduce(A2, G2, A1, G1, grad_out.contiguous())
        return (grad_V, None, None, None) + (None,) * len(factors)


def apply_reduction(reduce: Reduction, impl: str, A1, G1, A2, G2, V: Tensor) -> Tensor:
    """``Θ(1, 2) V`` by ``reduce`` (inputs already validated), differentiable w.r.t. ``V``."""
    return KernelSpaceProduct.apply(V, reduce, impl, len(A1), *A1, *G1, *A2, *G2)
