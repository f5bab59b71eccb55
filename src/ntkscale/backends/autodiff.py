"""The autodiff matvec: ``Θ v = J (Jᵀ v)`` with ``torch.func`` VJPs and JVPs, for any module.

One VJP pass over the data, chunk by chunk, accumulates the parameter-space vector ``u = Jᵀ v``;
one JVP pass applies ``J``. Memory is O(P·k + chunk·activations): never O(N·P) nor O(N²).
Several right-hand sides share each chunk's forward pass: the VJP's pullback is ``vmap``-ed over
the stacked cotangents, and the JVP is ``vmap``-ed over tangents with unbatched primals, so the
primal computation runs once per chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp
from torch.func import vmap

from ..functional import chunks
from .base import Backend, KernelData, ParamVec

__all__ = ["AutodiffBackend"]


def _rows_per_chunk(data: KernelData, k: int) -> int:
    """Samples per pass with k right-hand sides: the budgeted chunk holds up to four of them;
    beyond that the chunk shrinks so the k-fold tangents and cotangents stay within budget."""
    return max(1, data.chunk_size * 4 // max(k, 4))


class AutodiffBackend(Backend):
    """Matrix-free NTK products by reverse- then forward-mode automatic differentiation."""

    name = "autodiff"

    def vjp(self, data: KernelData, X: Tensor, V: Tensor) -> ParamVec:
        # V: shape (n, C, k)
        k = V.shape[-1]
        acc: list[Tensor] | None = None
        for sl in chunks(X.shape[0], _rows_per_chunk(data, k)):
            _, pullback = _vjp(data.fm.bind(data.fixed, X[sl]), data.params)
            if k == 1:
                grads = tuple(g.unsqueeze(0) for g in pullback(V[sl, :, 0])[0])
            else:
                grads = vmap(pullback)(V[sl].movedim(-1, 0).contiguous())[0]
            if acc is None:
                acc = list(grads)
            else:
                for a, g in zip(acc, grads):
                    a.add_(g)
        assert acc is not None
        return tuple(acc)

    def jvp(self, data: KernelData, X: Tensor, U: ParamVec) -> Tensor:
        k = U[0].shape[0]
        n, C = X.shape[0], data.num_outputs
        out = torch.empty(n, C, k, dtype=data.dtype, device=X.device)
        for sl in chunks(n, _rows_per_chunk(data, k)):
            f = data.fm.bind(data.fixed, X[sl])
            if k == 1:
                _, t = _jvp(f, (data.params,), (tuple(u[0] for u in U),))
                out[sl, :, 0] = t
            else:
                t = vmap(lambda u: _jvp(f, (data.params,), (u,))[1])(U)  # (k, n_chunk, C)
                out[sl] = t.permute(1, 2, 0)
        return out
