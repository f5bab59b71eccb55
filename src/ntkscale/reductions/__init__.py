"""Kernel-space NTK reductions from per-layer factors (what the structured backends multiply with).

* :mod:`.core` -- :func:`kernel_space_matmul` (the dispatcher over ``impl``), the torch
  reference, explicit Gram blocks and diagonals, and all input validation.
* :mod:`.function` -- the one autograd Function the fast impls share.
* :mod:`.keops` -- the pykeops reduction (optional).
* :mod:`.compiled` -- the C++/CUDA extension in ``csrc/``, compiled on first use.

These modules were ``ntkscale.backends.kernel_space``, ``.keops`` and ``._ext``; those names
still import (they are these modules).
"""

from .core import (
    IMPLS,
    check_factors,
    check_fast_inputs,
    gram_block,
    gram_diagonal,
    kernel_space_matmul,
    kernel_space_matmul_reference,
)
from .keops import keops_available

__all__ = [
    "IMPLS",
    "kernel_space_matmul",
    "kernel_space_matmul_reference",
    "gram_block",
    "gram_diagonal",
    "check_factors",
    "check_fast_inputs",
    "keops_available",
]
