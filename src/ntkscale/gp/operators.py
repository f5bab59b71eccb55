"""Operator helpers of the GP layer: column-blocked products and what products cost.

The GP layer asks a kernel operator two cost questions, and nothing about what the operator is:

* :func:`product_cost` — multiply-adds of ``K @ V`` with ``k`` columns; an operator that knows
  better answers through a ``product_macs(k)`` method (:class:`ntkscale.NTKOperator` does, from
  its backend's cost model), otherwise ``rows × cols × k`` (a dense product);
* :func:`block_cost` — multiply-adds of an explicit block ``K[rows, cols]``; an operator answers
  through ``block_macs(rows, cols)`` (``inf`` when explicit blocks are no cheaper than products),
  otherwise ``rows × cols`` (reading a stored matrix).
"""

from __future__ import annotations

import torch
from linear_operator import to_dense
from linear_operator.operators import LinearOperator
from torch import Tensor

from ..functional import chunks

__all__ = ["ColumnBlockedOperator", "block_cost", "product_cost"]

DEFAULT_BLOCK = 32  # right-hand-side columns per batched product / PCG block


def _base(K):
    while isinstance(K, ColumnBlockedOperator):
        K = K.base
    return K


def product_cost(K, k: int = 1) -> float:
    """Multiply-adds of ``K @ V`` for ``V`` with ``k`` columns."""
    base = _base(K)
    fn = getattr(base, "product_macs", None)
    if callable(fn):
        return float(fn(k))
    m, n = base.shape[-2:]
    return float(m) * float(n) * k


def block_cost(K, rows: int, cols: int) -> float:
    """Multiply-adds of the explicit block ``K[rows, cols]`` (``inf``: use products instead)."""
    base = _base(K)
    fn = getattr(base, "block_macs", None)
    if callable(fn):
        return float(fn(rows, cols))
    return float(rows) * float(cols)


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
