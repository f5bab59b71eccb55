r"""Kernel-space NTK product as a pykeops ``LazyTensor`` reduction (CPU and GPU).

pykeops is optional (``pip install 'ntkscale[keops]'``): it is imported when a function here is
first called, never at import of ntkscale, and nothing is compiled before then. KeOps compiles
each new formula (per dtype, device and set of widths) on first use into its build folder;
set ``NTKSCALE_KEOPS_DIR`` to choose that folder (:func:`pykeops.set_build_folder`).

KeOps evaluates, for every row ``i``, every layer ``l`` and without an ``N1 × N2`` matrix,

.. math::

    Z_l[i] = \sum_j (A_1[l]_i · A_2[l]_j)\, W_l[j], \qquad
    W_l[j] = \sum_{c'} G_2[l]_{j,c'} ⊗ V_{j,c'} \ \ (\text{flattened } o_l k),

as one reduction ``Concat_l((a_i | a_j) * w_j).sum(dim=1)`` (one compiled formula per set of
widths, ``k``, dtype and device); then ``out[i] = Σ_l G_1[l]_i Z_l[i]`` is a batched GEMM
in torch. Summing over ``j`` before contracting with ``G1`` costs ``N1 N2 (d + o k)`` multiply-adds
per layer instead of ``N1 N2 (d + C o k)``. The formula holds ``o k`` accumulators per row ``i``,
so KeOps (made for low-dimensional points) slows down, and compiles for longer, as layers widen.

Differentiable with respect to ``V`` only: the backward pass is the same reduction with the
two sides swapped (the same compiled formula), and the factors get ``None``.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["keops_kernel_space_matmul", "keops_available", "keops_reduce"]

_MISSING = "backend 'keops' needs pykeops: pip install 'ntkscale[keops]' (or pip install pykeops)"
_build_folder_set: str | None = None


def keops_available() -> bool:
    """Whether pykeops can be imported (imports it; compiles nothing)."""
    try:
        import pykeops  # noqa: F401
    except ImportError:
        return False
    return True


def _lazy_tensor():
    """Import pykeops on first use; apply ``NTKSCALE_KEOPS_DIR``; return ``LazyTensor``."""
    global _build_folder_set
    try:
        import pykeops
        from pykeops.torch import LazyTensor
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_MISSING) from err
    folder = os.environ.get("NTKSCALE_KEOPS_DIR")
    if folder and folder != _build_folder_set:
        os.makedirs(folder, exist_ok=True)
        pykeops.set_build_folder(folder)
        _build_folder_set = folder
    return LazyTensor


def keops_reduce(A1: Sequence[Tensor], G1: Sequence[Tensor], A2: Sequence[Tensor],
                 G2: Sequence[Tensor], V: Tensor) -> Tensor:
    """The unchecked KeOps reduction over ``j`` (validated inputs; see :mod:`.function`)."""
    from .core import contract_g, w_factors

    LazyTensor = _lazy_tensor()
    N1, C, k = A1[0].shape[0], G1[0].shape[1], V.shape[2]
    out = V.new_zeros((N1, C, k))
    if N1 == 0 or A2[0].shape[0] == 0 or k == 0:
        return out
    terms = None
    widths = []
    for a1, a2, g2 in zip(A1, A2, G2):
        o = g2.shape[2]
        widths.append(o * k)
        W = w_factors([g2], V)[0].reshape(a2.shape[0], o * k)  # (N2, o*k)
        a_i = LazyTensor(a1.contiguous()[:, None, :])  # (N1, 1, d)
        a_j = LazyTensor(a2.contiguous()[None, :, :])  # (1, N2, d)
        w_j = LazyTensor(W.contiguous()[None, :, :])   # (1, N2, o*k)
        term = (a_i | a_j) * w_j
        terms = term if terms is None else terms.concat(term)
    Z = terms.sum(dim=1)  # (N1, sum_l o_l k): one reduction over j for all layers
    for g1, Zl in zip(G1, torch.split(Z, widths, dim=1)):
        out = out + contract_g(g1, Zl.reshape(N1, g1.shape[2], k))  # (N1, C, k)
    return out


def keops_kernel_space_matmul(
    A1: Sequence[Tensor],
    G1: Sequence[Tensor],
    A2: Sequence[Tensor],
    G2: Sequence[Tensor],
    V: Tensor,
) -> Tensor:
    """Kernel-space NTK product by a KeOps reduction over ``j``: ``kernel_space_matmul(...,
    impl="keops")``, under the name it had before the reductions had their own package.

    ``out[i,c,r] = Σ_l Σ_j (A1[l][i]·A2[l][j]) Σ_c' (G1[l][i,c]·G2[l][j,c']) V[j,c',r]``.
    Inputs are validated by :func:`ntkscale.reductions.core.check_factors` and
    :func:`~ntkscale.reductions.core.check_fast_inputs`.

    Args:
        A1: per layer, shape ``(N1, d_l)``.
        G1: per layer, shape ``(N1, C, o_l)``.
        A2: per layer, shape ``(N2, d_l)``.
        G2: per layer, shape ``(N2, C, o_l)``.
        V: shape ``(N2, C, k)``; float32 or float64.

    Returns:
        Tensor of shape ``(N1, C, k)``, differentiable with respect to ``V`` only.

    Raises:
        ImportError: pykeops is not installed.
    """
    from .core import kernel_space_matmul

    return kernel_space_matmul(A1, G1, A2, G2, V, impl="keops")
