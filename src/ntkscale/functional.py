"""A functional view of an ``nn.Module``: the module's structure plus explicit parameter tensors.

The NTK operator never calls the user's module with its own tensors and never moves it; it holds
snapshots of the parameters and buffers and evaluates the module with
:func:`torch.func.functional_call`. That keeps ``.to()``/``.double()`` on the operator from touching
the user's model, and makes the kernel the one at the weights the operator was built with.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["FunctionalModel", "select_parameters", "chunks", "evaluation_mode"]


@contextlib.contextmanager
def evaluation_mode() -> Iterator[None]:
    """How the operator evaluates a model: every op differentiable in both modes, under vmap.

    PyTorch's fused attention fast path (``nn.MultiheadAttention``/``nn.TransformerEncoderLayer``
    in eval mode, taken whenever no parameter requires grad — as under ``torch.func``) has no
    forward-mode derivative, and the flash/memory-efficient SDPA kernels have no forward-mode
    derivative either. Inside this context the fast path is off and scaled dot-product attention
    uses its plain ``math`` kernel; the user's global settings are restored on exit.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@dataclass(frozen=True)
class FunctionalModel:
    """A module's structure together with the names of its tensors.

    Attributes:
        module: the user's module; only its structure (``forward``) is used, never its tensors.
        names: names of the parameters the kernel is taken over (differentiated).
        fixed_names: names of the other parameters and of the buffers (held constant).
        num_outputs: C, the number of outputs per sample.
        scalar_output: whether the model returns shape ``(N,)`` rather than ``(N, C)``.
    """

    module: nn.Module
    names: tuple[str, ...]
    fixed_names: tuple[str, ...]
    num_outputs: int = 1
    scalar_output: bool = False

    def __call__(self, params: Sequence[Tensor], fixed: Sequence[Tensor], x: Tensor) -> Tensor:
        """Evaluate the network: ``x`` (n, *in_shape) -> (n, C)."""
        tensors = dict(zip(self.names, params))
        tensors.update(zip(self.fixed_names, fixed))
        with evaluation_mode():
            out = functional_call(self.module, tensors, (x,))
        return out.reshape(x.shape[0], self.num_outputs)

    def bind(self, fixed: Sequence[Tensor], x: Tensor) -> Callable[[tuple[Tensor, ...]], Tensor]:
        """``params -> f(params, x)`` for fixed data, the shape torch.func transforms want."""
        return lambda params: self(params, fixed, x)

    def per_sample_jacobian(
        self, params: Sequence[Tensor], fixed: Sequence[Tensor], x: Tensor
    ) -> tuple[Tensor, ...]:
        """Explicit Jacobian of a chunk, one tensor per parameter: shape ``(n, C, *p.shape)``.

        Built as a ``vmap`` over samples of ``jacrev`` (each sample's forward is independent, so
        this is the same as the Jacobian of the batch, without the batch's zero blocks).
        """

        def single(p, xi):
            return self(p, fixed, xi.unsqueeze(0))[0]

        return torch.func.vmap(torch.func.jacrev(single), in_dims=(None, 0))(tuple(params), x)


def select_parameters(
    module: nn.Module, params: str | Tensor | Iterable[str | Tensor] | None
) -> tuple[list[str], list[str]]:
    """Split a module's named parameters and buffers into (differentiated, fixed) names.

    Args:
        module: the network.
        params: ``None`` for every parameter that requires grad; otherwise names (exact parameter
            names such as ``"2.weight"``, or module prefixes such as ``"2"`` that select all of that
            submodule's parameters) or the parameter tensors themselves (matched by identity).

    Raises:
        ValueError: unknown names, tensors that are not parameters of the module, or an empty set.
    """
    named = dict(module.named_parameters())
    if params is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
        if not chosen:
            raise ValueError(
                "the model has no trainable parameters (none requires grad); pass params=... to "
                "name the parameters the kernel is taken over"
            )
    else:
        if isinstance(params, (str, Tensor)):
            params = [params]
        by_id = {id(p): n for n, p in named.items()}
        chosen_set: set[str] = set()
        for item in params:
            if isinstance(item, Tensor):
                if id(item) not in by_id:
                    raise ValueError(
                        f"params: a tensor of shape {tuple(item.shape)} is not a parameter of the model"
                    )
                chosen_set.add(by_id[id(item)])
            elif isinstance(item, str):
                hits = [n for n in named if n == item or n.startswith(item + ".")]
                if not hits:
                    raise ValueError(
                        f"params: no parameter named {item!r}; the model has {sorted(named)}"
                    )
                chosen_set.update(hits)
            else:
                raise TypeError(
                    f"params must be names or parameter tensors, got {type(item).__name__}"
                )
        chosen = [n for n in named if n in chosen_set]  # keep the module's order
        if not chosen:
            raise ValueError("params selects no parameters")
    fixed = [n for n in named if n not in chosen]
    fixed += [n for n, _ in module.named_buffers()]
    return chosen, fixed


def chunks(n: int, size: int) -> list[slice]:
    """Slices covering ``range(n)`` in pieces of at most ``size``."""
    size = max(1, int(size))
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def activation_bytes_per_sample(fm: FunctionalModel, params, fixed, x1: Tensor) -> int:
    """Bytes of intermediate activations one sample produces (summed over leaf module outputs).

    Used to pick a chunk size that bounds the memory of a forward/backward pass over a chunk.
    """
    total = [0]

    def hook(_m, _inp, out):
        if isinstance(out, Tensor):
            total[0] += out.numel() * out.element_size()
        elif isinstance(out, (tuple, list)):
            total[0] += sum(o.numel() * o.element_size() for o in out if isinstance(o, Tensor))

    handles = [m.register_forward_hook(hook) for m in fm.module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            fm(params, fixed, x1)
    finally:
        for h in handles:
            h.remove()
    per_sample = total[0] + x1[0].numel() * x1.element_size()
    return max(int(per_sample), 1)


def default_chunk_size(bytes_per_sample: int, budget: int, cap: int = 1024) -> int:
    """Largest chunk whose activations (with room for autodiff's copies) fit ``budget`` bytes."""
    # A VJP keeps the activations; a JVP carries a tangent beside each; several right-hand sides
    # add their own. A factor of 8 leaves room for that.
    return int(max(1, min(cap, math.floor(budget / (8 * bytes_per_sample)))))
