"""Sums over the rows of vectors: the one place the solvers learn whether rows are sharded.

A solver works with vectors of shape ``(n_local, k)``: all of the rows of ``K`` in one process,
or, for an operator whose rows are sharded over a ``torch.distributed`` process group (such as
:class:`ntkscale.distributed.NTKOperator`), this rank's contiguous block of them. Every inner
product, norm, Gram matrix, orthonormalization and random draw over rows goes through the
:class:`Reductions` that :func:`reductions` returns for ``K``; everything else (tridiagonal
matrices, CG coefficients, convergence flags) is then the same on every rank.

An operator is sharded when it (or a ``LinearOperator`` it is built from, e.g. ``K * 2``) has
a ``process_group`` attribute that is not ``None``, with ``global_size`` (rows over all ranks)
and ``row_offset`` (the first global row this rank holds).

Random draws (sketches, start vectors, probes) are this rank's rows of one draw over all ``n``
rows from the solver's seed: the same vectors whatever the number of ranks, at the price of
drawing (not keeping) ``n·k`` numbers on every rank.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator

__all__ = ["GroupReductions", "Reductions", "reductions"]


class Reductions:
    """Row reductions for vectors held whole by one process (plain torch operations).

    Attributes:
        n: rows of the whole operator (over all ranks).
        n_local: rows held here.
        offset: the first global row held here.
    """

    group = None

    def __init__(self, n: int):
        self.n = self.n_local = int(n)
        self.offset = 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of per-rank partial sums ``t`` (any shape); identity in one process."""
        return t

    def dot(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Column-wise inner products.  # A, B: (n_local, k) -> (k,)"""
        return self.sum((A * B).sum(0))

    def norm(self, A: torch.Tensor) -> torch.Tensor:
        """Column-wise Euclidean norms.  # A: (n_local, k) -> (k,)"""
        return torch.linalg.vector_norm(A, dim=0)

    def frobenius(self, A: torch.Tensor) -> float:
        """``‖A‖_F`` over all rows."""
        return torch.linalg.norm(A).item()

    def gram(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``Aᵀ B`` over all rows.  # A: (n_local, a), B: (n_local, b) -> (a, b)"""
        return self.sum(A.mT @ B)

    def orthonormal(self, A: torch.Tensor) -> torch.Tensor:
        """An orthonormal basis of the columns of a full-rank tall ``A`` (the Q of its QR)."""
        return torch.linalg.qr(A).Q

    def thin_svd(self, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``A = U diag(S) Vh`` with ``U`` (n_local, k) this rank's rows of the left vectors."""
        return torch.linalg.svd(A, full_matrices=False)

    def randn(self, k: int, generator: torch.Generator, dtype, device) -> torch.Tensor:
        """This rank's rows of a seeded Gaussian (n, k) draw: the same global draw on every
        number of ranks, so the sketch or start vector is that of the whole operator."""
        G = torch.randn(self.n, k, dtype=dtype, device=device, generator=generator)
        return G[self.offset : self.offset + self.n_local]

    def rademacher(self, k: int, generator: torch.Generator, dtype, device) -> torch.Tensor:
        """This rank's rows of a seeded ±1 (n, k) draw (see :meth:`randn`)."""
        Z = torch.randint(0, 2, (self.n, k), generator=generator, device=device)
        return Z[self.offset : self.offset + self.n_local].to(dtype) * 2 - 1


class GroupReductions(Reductions):
    """Row reductions over the ranks of a process group, each holding a contiguous block of rows.

    Results of every method are identical on all ranks (all-reduced, or computed from
    all-gathered data in the same way), so the solvers take the same decisions everywhere.
    """

    def __init__(self, group, n_local: int, n: int, offset: int):
        self.group, self.n_local, self.n, self.offset = group, int(n_local), int(n), int(offset)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        from .._comm import all_reduce_sum

        return all_reduce_sum(t, self.group, "an inner product of the solver")

    def norm(self, A: torch.Tensor) -> torch.Tensor:
        return self.sum(A.square().sum(0)).sqrt()

    def frobenius(self, A: torch.Tensor) -> float:
        return self.sum(A.square().sum().reshape(1)).sqrt().item()

    def _tsqr(self, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tall-skinny QR over the ranks: local QR, all-gather the k×k factors, QR of their stack."""
        from .._comm import all_gather

        n_local, k = A.shape
        padded = A if n_local >= k else torch.cat([A, A.new_zeros(k - n_local, k)])
        Q1, R1 = torch.linalg.qr(padded)  # shape: (max(n_local, k), k), (k, k)
        Rs = torch.cat(all_gather(R1, self.group, "the QR factorization of the solver"))
        Q2, R = torch.linalg.qr(Rs)  # shape: (world * k, k), (k, k); the same on every rank
        rank = torch.distributed.get_rank(self.group)
        return Q1[:n_local] @ Q2[rank * k : (rank + 1) * k], R

    def orthonormal(self, A: torch.Tensor) -> torch.Tensor:
        return self._tsqr(A)[0]

    def thin_svd(self, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        Q, R = self._tsqr(A)
        Ur, S, Vh = torch.linalg.svd(R)
        return Q @ Ur, S, Vh


def reductions(K) -> Reductions:
    """The row reductions for vectors multiplied by ``K``: plain ones, or over ``K``'s process
    group when ``K`` (or an operator inside it) is sharded over ranks.

    Example:
        >>> import torch
        >>> from linear_operator.operators import DenseLinearOperator
        >>> red = reductions(DenseLinearOperator(torch.eye(3)))
        >>> red.n, red.dot(torch.ones(3, 2), torch.ones(3, 2)).tolist()
        (3, [3.0, 3.0])
    """
    sharded = _find_sharded(K, depth=0)
    n_local = int(K.shape[-1])
    if sharded is None:
        return Reductions(n_local)
    n = int(sharded.global_size)
    if n_local != sharded.shape[-1]:
        raise ValueError(
            f"K has {n_local} local rows but the sharded operator inside it has {sharded.shape[-1]}"
        )
    return GroupReductions(sharded.process_group, n_local, n, int(sharded.row_offset))


def _find_sharded(K, depth: int):
    if getattr(K, "process_group", None) is not None:
        return K
    if depth > 8 or not isinstance(K, LinearOperator):
        return None
    for arg in K._args:
        if isinstance(arg, LinearOperator):
            found = _find_sharded(arg, depth + 1)
            if found is not None:
                return found
    return None
