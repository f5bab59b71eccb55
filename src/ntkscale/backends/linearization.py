"""A network linearized once over a data side: NTK products without any forward pass.

A matvec ``Θ v = J (Jᵀ v)`` by plain VJP and JVP passes evaluates the network twice per product
(once for the pullback, once under the tangents): about 2 training steps, of which the second
forward alone is a third. Everything those forwards compute is the same for every product of one
operator (the weights and the data are fixed), so :class:`Linearization` keeps it:

* the forward graph of each chunk (the activations reverse mode needs), so ``Jᵀ V`` is one
  backward pass per chunk; and
* the backward graph of each chunk, recorded once with ``create_graph=True`` from a cotangent
  leaf ``w``: ``g(w) = Jᵀ w`` is linear in ``w``, so differentiating it again gives
  ``∂⟨g(w), u⟩/∂w = J u`` — the JVP as a backward pass through the recorded backward, which
  touches only the saved activations and never re-runs the network.

A product then costs one backward and one tangent pass (about 1.2 training steps for an MLP by
operation count), the first one a forward more. The kept graphs hold what the forward saves for
its backward and the backward's cotangents: at most about two copies of the activations of every
sample, so the autodiff backend keeps them only within ``memory_budget`` and falls back to
recomputation otherwise (or when some operation has no second derivative).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..functional import activation_bytes_per_sample, chunks
from .base import GradientSum, KernelData, ParamVec

__all__ = ["Linearization", "linearization_bytes", "NotTwiceDifferentiable"]

log = logging.getLogger("ntkscale")

# activations kept per sample: the forward's saved tensors and the backward's cotangents, each at
# most about one copy of the layer outputs (measured: 16 KiB per sample for MLP 784-1024²-10,
# whose layer outputs and input take 19 KiB)
_ACTIVATION_COPIES = 2

# right-hand sides per (vmap-ed) backward pass of a small chunk in Jᵀ V: the default chunk leaves
# room for eight activation copies (see functional.default_chunk_size)
COLUMNS_PER_PASS = 8

# Several right-hand sides go through a chunk's kept backward together (``is_grads_batched``) only
# while the chunk's activations stay below this: the batched backward copies the stacked cotangents
# around every weight gradient, which costs more than the saved calls once the products are large.
# Jᵀ V with 8 columns, batched vs one column at a time: 2x faster batched on MLP 20-64²-10 (300
# samples, 0.4 MiB of activations), 1.2-2x faster one by one on MLP 64-256²-1, MLP 784-1024²-10,
# a 3-layer CNN on 32x32 images and a transformer encoder layer (4 MiB or more per chunk); within
# 8 % either way on MLP 784-512²-10.
BATCHED_COLUMNS_MAX_BYTES = 2 * 2**20


class NotTwiceDifferentiable(RuntimeError):
    """The network uses an operation whose backward cannot be differentiated again."""


def _activation_bytes(data: KernelData) -> int:
    """Bytes of one sample's layer outputs (measured once per operator)."""
    return data.cached(
        "autodiff-activation-bytes",
        (),
        lambda: activation_bytes_per_sample(data.fm, data.params, data.fixed, data.X1[:1]),
    )


def linearization_bytes(data: KernelData, X: Tensor) -> int:
    """Estimated bytes of a :class:`Linearization` of ``X`` (activations measured on one sample)."""
    param_bytes = data.num_params * data.params[0].element_size()
    return _ACTIVATION_COPIES * _activation_bytes(data) * X.shape[0] + param_bytes


class Linearization:
    """The forward and backward graphs of a network over the samples of ``X``, chunk by chunk.

    Built from the first cotangent ``W0`` (n, C), whose ``Jᵀ W0`` the building pass yields for free
    (:attr:`first`). Then :meth:`vjp` and :meth:`jvp` run backward passes only.

    Raises:
        NotTwiceDifferentiable: the recorded backward does not depend on the cotangent for some
            parameter (an operation with a ``once_differentiable`` backward) or cannot be built.
    """

    def __init__(self, data: KernelData, X: Tensor, W0: Tensor):
        self.slices = chunks(X.shape[0], data.chunk_size)
        # right-hand sides per backward pass in vjp: batched only in small chunks
        chunk_bytes = _activation_bytes(data) * min(X.shape[0], data.chunk_size)
        self.columns_per_pass = COLUMNS_PER_PASS if chunk_bytes <= BATCHED_COLUMNS_MAX_BYTES else 1
        leaves = tuple(p.detach().requires_grad_() for p in data.params)
        self.outs: list[Tensor] = []
        self.cotangents: list[Tensor] = []
        root: list[Tensor | None] = [None] * len(leaves)
        used = [False] * len(leaves)
        with torch.enable_grad():
            for sl in self.slices:
                out = data.fm(leaves, data.fixed, X[sl])
                w = W0[sl].detach().clone().requires_grad_()
                try:
                    g = torch.autograd.grad(out, leaves, w, create_graph=True, allow_unused=True)
                except RuntimeError as err:  # e.g. a backward that is not differentiable
                    raise NotTwiceDifferentiable(str(err)) from err
                for i, gi in enumerate(g):
                    if gi is None:
                        continue
                    if not gi.requires_grad:
                        raise NotTwiceDifferentiable(
                            f"the backward of parameter {data.fm.names[i]!r} is not differentiable"
                        )
                    used[i] = True
                    root[i] = gi if root[i] is None else root[i] + gi
                self.outs.append(out)
                self.cotangents.append(w)
        self.used = [i for i, u in enumerate(used) if u]
        if not self.used:
            raise NotTwiceDifferentiable("no differentiated parameter reaches the output")
        self.leaves = tuple(leaves[i] for i in self.used)
        self.root = tuple(root[i] for i in self.used)  # Jᵀ W0, linear in the cotangent leaves
        self.shapes = [p.shape for p in data.params]
        self.verified = False  # set once a JVP through the recorded backward has succeeded
        self.first: ParamVec | None = self._full([r.detach().clone().unsqueeze(0) for r in self.root], 1)

    def _full(self, grads: list[Tensor], k: int) -> ParamVec:
        """Gradients of the used parameters -> one (k, *p.shape) tensor per parameter."""
        out = [None] * len(self.shapes)
        for i, g in zip(self.used, grads):
            out[i] = g
        dtype, device = grads[0].dtype, grads[0].device
        return tuple(
            o if o is not None else torch.zeros(k, *s, dtype=dtype, device=device)
            for o, s in zip(out, self.shapes)
        )

    def take_first(self) -> ParamVec | None:
        """``Jᵀ W0`` from the building pass, once (None afterwards)."""
        first, self.first = self.first, None
        return first

    def vjp(self, V: Tensor) -> ParamVec:
        """``Jᵀ V`` for V (n, C, k): one backward pass per chunk and :attr:`columns_per_pass`
        columns (several in small chunks, see :data:`BATCHED_COLUMNS_MAX_BYTES`; else one)."""
        k = V.shape[-1]
        acc = GradientSum()
        for out, sl in zip(self.outs, self.slices):
            parts = []
            for c in chunks(k, self.columns_per_pass):
                cot = V[sl, :, c].movedim(-1, 0)
                if cot.shape[0] == 1:
                    g = torch.autograd.grad(out, self.leaves, cot[0], retain_graph=True)
                    g = [gi.unsqueeze(0) for gi in g]
                else:
                    g = torch.autograd.grad(
                        out, self.leaves, cot.contiguous(), retain_graph=True, is_grads_batched=True
                    )
                parts.append(g)
            grads = [torch.cat(p, dim=0) if len(p) > 1 else p[0] for p in zip(*parts)]
            acc.add(grads)
        return self._full(acc.result(), k)

    def jvp(self, U: ParamVec) -> Tensor:
        """``J U`` for a parameter-space U with k columns, as (n, C, k): differentiating the
        recorded ``Jᵀ w`` with respect to every chunk's cotangent leaf ``w`` in one backward pass
        per column (the recorded graph is walked once per column, not once per chunk and column;
        ``vmap`` over this second backward, ``is_grads_batched``, measured 2.3x slower than the
        loop on an MLP)."""
        k = U[0].shape[0]
        n = self.slices[-1].stop
        C = self.outs[0].shape[-1]
        out = torch.empty(n, C, k, dtype=U[0].dtype, device=U[0].device)
        Uu = [U[i] for i in self.used]
        for r in range(k):
            ts = torch.autograd.grad(
                self.root, self.cotangents, [u[r] for u in Uu], retain_graph=True, allow_unused=True
            )
            for t, sl in zip(ts, self.slices):
                out[sl, :, r] = 0.0 if t is None else t
        return out
