"""The generalized Gauss–Newton kernel ``Λ^{1/2} Θ Λ^{1/2}`` of a softmax likelihood, lazily."""

from __future__ import annotations

import torch
from linear_operator import to_dense
from linear_operator.operators import LinearOperator
from torch import Tensor

from ..functional import chunks

__all__ = ["GGNKernel", "ggn_kernel"]


class GGNKernel(LinearOperator):
    """``Λ^{1/2} Θ Λ^{1/2}`` for a block-diagonal ``Λ^{1/2}`` with C×C blocks, lazily.

    Built by :func:`ggn_kernel`. Products are three steps (block multiply, ``Θ @``, block
    multiply); the diagonal is exact, from the C×C diagonal blocks of ``Θ`` taken a chunk of
    samples at a time (``Θ[s:e, s:e]`` for contiguous row ranges); rows (``[idx, :]``) are
    products with unit vectors.

    Args:
        K: the square kernel ``Θ``, rows ordered (sample, output).  # shape: (N*C, N*C)
        sqrt_lambda: the symmetric square roots ``Λ_i^{1/2}``.  # shape: (N, C, C)
    """

    def __init__(self, K, sqrt_lambda: Tensor, diag_chunk: int = 256):
        super().__init__(K, sqrt_lambda, diag_chunk=diag_chunk)
        self.K, self.S, self.diag_chunk = K, sqrt_lambda, diag_chunk

    def _size(self) -> torch.Size:
        return self.K.shape

    def _transpose_nonbatch(self) -> "GGNKernel":
        return self

    def _block(self, V: Tensor) -> Tensor:
        """Block-diagonal product ``Λ^{1/2} V``.  # V shape: (N*C, k)"""
        N, C, _ = self.S.shape
        return torch.bmm(self.S, V.reshape(N, C, -1)).reshape(N * C, -1)

    def _matmul(self, rhs: Tensor) -> Tensor:
        vec = rhs.dim() == 1
        V = rhs.unsqueeze(-1) if vec else rhs
        out = self._block(self.K.matmul(self._block(V)))
        return out.squeeze(-1) if vec else out

    def _diagonal(self) -> Tensor:
        N, C, _ = self.S.shape
        out = []
        for sl in chunks(N, self.diag_chunk):
            s, e = sl.start, sl.stop
            Kb = to_dense(self.K[s * C : e * C, s * C : e * C]).reshape(e - s, C, e - s, C)
            idx = torch.arange(e - s, device=Kb.device)
            B = Kb[idx, :, idx, :]  # shape: (b, C, C), the diagonal blocks
            S = self.S[sl]
            out.append(torch.einsum("bij,bjk,bik->bi", S, B, S))  # diag(S B S)
        return torch.cat(out).reshape(-1)

    def _rows(self, idx: Tensor) -> Tensor:
        """Dense rows ``self[idx, :]``: products with unit vectors (the operator is symmetric)."""
        n = self.shape[-1]
        E = torch.zeros(n, idx.numel(), dtype=self.S.dtype, device=self.S.device)
        E[idx.to(E.device), torch.arange(idx.numel(), device=E.device)] = 1.0
        return self._matmul(E).mT

    def _getitem(self, row_index, col_index, *batch_indices):
        from linear_operator.operators import DenseLinearOperator

        rows = torch.arange(self.shape[0])[row_index].reshape(-1)
        cols = torch.arange(self.shape[1])[col_index].reshape(-1)
        return DenseLinearOperator(self._explicit(rows, cols))

    def _explicit(self, rows: Tensor, cols: Tensor) -> Tensor:
        """``self[rows, cols]`` from the explicit block of ``Θ`` on the samples the indices touch:
        ``S_I Θ[I, J] S_J`` (the block-diagonal roots mix only the C outputs of one sample), so
        its cost is that of ``Θ``'s block, not of products with unit vectors."""
        N, C, _ = self.S.shape
        I, r_inv = torch.unique(torch.div(rows, C, rounding_mode="floor"), return_inverse=True)
        J, c_inv = torch.unique(torch.div(cols, C, rounding_mode="floor"), return_inverse=True)
        out_c = torch.arange(C)
        Ri = (I.unsqueeze(-1) * C + out_c).reshape(-1)
        Cj = (J.unsqueeze(-1) * C + out_c).reshape(-1)
        if Ri.numel() == self.shape[0] and Cj.numel() == self.shape[1]:
            block = to_dense(self.K)
        elif torch.equal(Ri, torch.arange(int(Ri[0]), int(Ri[-1]) + 1)) and torch.equal(
            Cj, torch.arange(int(Cj[0]), int(Cj[-1]) + 1)
        ):  # contiguous samples: a slice (what tiled factorizations ask for)
            block = to_dense(self.K[int(Ri[0]) : int(Ri[-1]) + 1, int(Cj[0]) : int(Cj[-1]) + 1])
        else:
            block = to_dense(self.K[Ri, :][:, Cj])
        dev = self.S.device
        block = block.to(dev).reshape(I.numel(), C, J.numel(), C)
        block = torch.einsum("iac,icjd,jbd->iajb", self.S[I.to(dev)], block, self.S[J.to(dev)])
        block = block.reshape(I.numel() * C, J.numel() * C)
        return block[(r_inv * C + rows % C).to(dev)][:, (c_inv * C + cols % C).to(dev)]

    def product_macs(self, k: int = 1) -> float:
        """Multiply-adds of ``self @ V`` with ``k`` columns: ``Θ``'s product and two block products."""
        from .operators import product_cost

        N, C, _ = self.S.shape
        return product_cost(self.K, k) + 2.0 * N * C * C * k

    def block_macs(self, rows: int, cols: int) -> float:
        """Multiply-adds of an explicit block: ``Θ``'s block and the roots on both sides."""
        from .operators import block_cost

        C = self.S.shape[-1]
        return block_cost(self.K, rows, cols) + 2.0 * rows * cols * C

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        row_index, col_index = torch.broadcast_tensors(row_index, col_index)
        r_u, r_inv = torch.unique(row_index.reshape(-1).cpu(), return_inverse=True)
        block = self._rows(r_u)  # shape: (u, n)
        return block[r_inv.to(block.device), col_index.reshape(-1).to(block.device)].reshape(row_index.shape)

    def to_dense(self) -> Tensor:
        """The explicit matrix (N*C, N*C): one product with the identity."""
        n = self.shape[-1]
        return self._matmul(torch.eye(n, dtype=self.S.dtype, device=self.S.device))


def ggn_kernel(K, probs: Tensor) -> GGNKernel:
    """The generalized Gauss–Newton kernel ``Λ^{1/2} Θ Λ^{1/2}`` of a softmax likelihood.

    ``Λ = blockdiag(Λ_1, …, Λ_N)`` with ``Λ_i = diag(p_i) − p_i p_iᵀ``, the Hessian of the
    cross-entropy with respect to the logits of sample i. Its symmetric square root is taken per
    block by ``eigh`` (eigenvalues clamped at 0: ``Λ_i`` is PSD with one zero eigenvalue along
    the all-ones vector).

    Args:
        K: the NTK ``Θ`` (or any symmetric ``LinearOperator``), rows ordered (sample, output).
            # shape: (N*C, N*C)
        probs: softmax probabilities, rows summing to 1.  # shape: (N, C)

    Returns:
        A :class:`GGNKernel` of shape (N*C, N*C).

    Raises:
        ValueError: ``probs`` is not (N, C) matching ``K``, has NaN/inf, negative entries, or
            rows not summing to 1 (to 1e-4).

    Example:
        >>> import torch
        >>> from linear_operator.operators import DenseLinearOperator
        >>> J = torch.randn(6, 10, dtype=torch.float64)
        >>> p = torch.softmax(torch.randn(2, 3, dtype=torch.float64), -1)
        >>> G = ggn_kernel(DenseLinearOperator(J @ J.T), p)
        >>> G.shape, bool(torch.allclose(G.diagonal(), G.to_dense().diagonal()))
        (torch.Size([6, 6]), True)
    """
    if not torch.is_tensor(probs) or probs.dim() != 2:
        shape = tuple(probs.shape) if torch.is_tensor(probs) else type(probs).__name__
        raise ValueError(f"probs must be a tensor of shape (N, C), got {shape}")
    N, C = probs.shape
    if torch.is_tensor(K):
        from linear_operator.operators import DenseLinearOperator

        K = DenseLinearOperator(K)
    n = K.shape[-1]
    if len(K.shape) != 2 or K.shape[0] != n or n != N * C:
        raise ValueError(
            f"K must be square of size N*C = {N}*{C} = {N * C} to match probs of shape {(N, C)}, "
            f"got shape {tuple(K.shape)}"
        )
    probs = probs.detach().to(dtype=K.dtype, device=K.device)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("probs contains NaN or inf")
    if bool((probs < 0).any()) or not torch.allclose(probs.sum(-1), torch.ones_like(probs[:, 0]), atol=1e-4):
        raise ValueError("probs must be probabilities: entries >= 0 and rows summing to 1 (softmax outputs)")
    Lam = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)  # shape: (N, C, C)
    evals, evecs = torch.linalg.eigh(Lam)
    S = (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ evecs.mT  # shape: (N, C, C)
    return GGNKernel(K, 0.5 * (S + S.mT))
