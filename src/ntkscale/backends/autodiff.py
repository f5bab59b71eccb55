"""The autodiff matvec: ``Θ v = J (Jᵀ v)`` by reverse- and forward-mode derivatives, for any module.

One VJP pass over the data, chunk by chunk, accumulates the parameter-space vector ``u = Jᵀ v``;
one JVP pass applies ``J``. Two ways to run them, with identical results:

* **linearized** (when it fits ``memory_budget``): the first product over one of the operator's
  data sides records each chunk's forward and backward graphs once (:mod:`.linearization`);
  every product after that is backward passes only, about 1.2 training steps for an MLP instead
  of 2. Memory: up to about two copies of the activations of every sample, kept with the operator.
* **recomputed** (otherwise, for other inputs, and for operations without second derivatives):
  ``torch.func`` VJPs and JVPs that evaluate each chunk afresh; memory O(P·k + chunk·activations).
  Several right-hand sides share each chunk's forward: the pullback is ``vmap``-ed over the
  stacked cotangents, and the JVP over tangents with unbatched primals.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp
from torch.func import vmap

import logging

from ..functional import chunks
from .base import Backend, GradientSum, KernelData, ParamVec
from .linearization import Linearization, NotTwiceDifferentiable, linearization_bytes

__all__ = ["AutodiffBackend"]

log = logging.getLogger("ntkscale")

def _rows_per_chunk(data: KernelData, k: int) -> int:
    """Samples per pass with k right-hand sides: the budgeted chunk holds up to four of them;
    beyond that the chunk shrinks so the k-fold tangents and cotangents stay within budget."""
    return max(1, data.chunk_size * 4 // max(k, 4))


class AutodiffBackend(Backend):
    """Matrix-free NTK products by reverse- then forward-mode automatic differentiation."""

    name = "autodiff"

    # -- the linearized path ---------------------------------------------------------------------
    @staticmethod
    def _slot(data: KernelData, X: Tensor) -> str | None:
        """Cache name of X's linearization: only the operator's own data sides are kept."""
        if X is data.X1:
            return "autodiff-linearization-X1"
        if X is data.X2:
            return "autodiff-linearization-X2"
        return None

    def factor_bytes(self, data: KernelData, X: Tensor) -> int:
        """Estimated bytes of the linearization of ``X`` kept between products (from one sample)."""
        return linearization_bytes(data, X)

    def _linearization(self, data: KernelData, X: Tensor, V: Tensor | None) -> Linearization | None:
        """X's cached linearization; built from the cotangent V when given and it fits the budget.
        None: recompute (no slot, no budget, not twice differentiable, or a graph to keep)."""
        slot = self._slot(data, X)
        if slot is None or (V is not None and V.requires_grad):
            return None
        key = data.signature(X)
        hit = data.cache.get(slot)
        if hit is not None and hit[0] == key:
            return hit[1] or None
        if V is None:
            return None
        value: Linearization | bool = False
        need, budget = linearization_bytes(data, X), data.memory_budget
        if need <= budget:
            try:
                value = Linearization(data, X, V[..., 0])
                log.info("ntkscale: linearized the network over %d samples: about %.1f MiB",
                         X.shape[0], need / 2**20)
            except NotTwiceDifferentiable as err:
                log.info("ntkscale: products recompute the forward passes (%s)", err)
        else:
            log.info("ntkscale: products recompute the forward passes: a linearization needs "
                     "%.1f MiB, over memory_budget (%.1f MiB)", need / 2**20, budget / 2**20)
        data.cache[slot] = (key, value)
        return value or None

    # -- primitives ------------------------------------------------------------------------------
    def vjp(self, data: KernelData, X: Tensor, V: Tensor) -> ParamVec:
        # V: shape (n, C, k)
        k = V.shape[-1]
        lin = self._linearization(data, X, V)
        if lin is not None:
            first = lin.take_first()  # Jᵀ V[..., 0] from the pass that built the linearization
            if first is None:
                return lin.vjp(V)
            if k == 1:
                return first
            rest = lin.vjp(V[..., 1:])
            return tuple(torch.cat([a, b], dim=0) for a, b in zip(first, rest))
        return self._vjp_recomputed(data, X, V)

    def jvp(self, data: KernelData, X: Tensor, U: ParamVec) -> Tensor:
        lin = self._linearization(data, X, None)
        if lin is not None and not any(u.requires_grad for u in U):
            if lin.verified:
                return lin.jvp(U)
            try:  # the first JVP differentiates the recorded backward: it may not be differentiable
                out = lin.jvp(U)
                problem = self._disagreement(data, X, lin, U, out)
            except RuntimeError as err:
                problem = str(err)
            if problem is None:
                lin.verified = True
                return out
            log.info("ntkscale: products recompute the forward passes (%s)", problem)
            data.cache[self._slot(data, X)] = (data.signature(X), False)
        return self._jvp_recomputed(data, X, U)

    def _disagreement(self, data: KernelData, X: Tensor, lin: Linearization, U: ParamVec,
                      out: Tensor) -> str | None:
        """Check the first linearized JVP on one chunk and one column against forward mode.

        An operation whose backward is not differentiable (``once_differentiable``, a backward
        computed outside autograd) can cut the recorded backward from the cotangent without an
        error; the check costs one chunk's recomputed JVP, once per operator."""
        sl = lin.slices[0]
        ref = self._jvp_recomputed(data, X[sl], tuple(u[:1] for u in U))[..., 0]
        got = out[sl, :, 0]
        tol = torch.finfo(ref.dtype).eps ** 0.5
        if torch.allclose(got, ref, rtol=tol, atol=tol * float(ref.abs().max())):
            return None
        err = float((got - ref).abs().max())
        return f"the recorded backward is not differentiable: check off by {err:.3g}"

    # -- the recomputed path ---------------------------------------------------------------------
    def _vjp_recomputed(self, data: KernelData, X: Tensor, V: Tensor) -> ParamVec:
        k = V.shape[-1]
        acc = GradientSum()
        for sl in chunks(X.shape[0], _rows_per_chunk(data, k)):
            _, pullback = _vjp(data.fm.bind(data.fixed, X[sl]), data.params)
            if k == 1:
                grads = tuple(g.unsqueeze(0) for g in pullback(V[sl, :, 0])[0])
            else:
                grads = vmap(pullback)(V[sl].movedim(-1, 0).contiguous())[0]
            acc.add(grads)
        return tuple(acc.result())

    def _jvp_recomputed(self, data: KernelData, X: Tensor, U: ParamVec) -> Tensor:
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
