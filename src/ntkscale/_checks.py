"""Input checks, written once: finiteness of data and vectors in bounded chunks, regression
targets (scalar arguments: :mod:`ntkscale.solvers._utils`).

``torch.isfinite(X).all()`` on a whole tensor allocates temporaries the size of ``X`` (its
absolute value and two boolean masks): for a data set that is most of the memory the operator
needs. Here the check walks the tensor in slices of at most ``CHUNK_BYTES``, accumulates one flag
on the tensor's device and reads it once, so the peak beyond the data is one slice and a GPU is
synchronized once per check, not once per slice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .settings import debug

__all__ = ["CHUNK_BYTES", "all_finite", "nonfinite_samples", "check_vector_finite", "check_targets"]

CHUNK_BYTES = 16 * 2**20  # bytes of the checked tensor per slice


def _slices(t: Tensor, chunk_bytes: int):
    """Views of ``t`` along its first axis (or flat, for 0-d/1-d), at most ``chunk_bytes`` each."""
    flat = t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(-1, 1)
    row = max(1, flat.shape[1] * t.element_size())
    rows = max(1, chunk_bytes // row)
    for s in range(0, flat.shape[0], rows):
        yield s, flat[s : s + rows]


def all_finite(t: Tensor, chunk_bytes: int = CHUNK_BYTES) -> bool:
    """Whether every entry of ``t`` is finite (integer tensors always are). One device read."""
    if not t.is_floating_point() and not t.is_complex():
        return True
    if t.numel() == 0:
        return True
    bad = torch.zeros((), dtype=torch.bool, device=t.device)
    for _, piece in _slices(t, chunk_bytes):
        bad |= ~torch.isfinite(piece).all()
    return not bool(bad)


def nonfinite_samples(t: Tensor, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """Indices (along the first axis) of the samples holding NaN or inf, as a CPU LongTensor."""
    found = []
    for s, piece in _slices(t, chunk_bytes):
        rows = (~torch.isfinite(piece)).any(1).nonzero().flatten()
        if rows.numel():
            found.append(rows.cpu() + s)
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)


def check_vector_finite(v: Tensor, what: str = "the right-hand side") -> None:
    """Refuse NaN/inf in a product's vector: always on the CPU, under :class:`debug` elsewhere.

    On a GPU the check's answer has to be read back, a device synchronization per product that
    the solvers' pipelines would otherwise not need; it runs there only under ``debug(True)``.
    """
    if v.device.type != "cpu" and not debug.on():
        return
    if not all_finite(v):
        raise ValueError(f"{what} contains NaN or inf")


def check_targets(y, N: int, C: int, dtype: torch.dtype, device) -> Tensor:
    """``y`` as an (N, C) tensor of ``dtype`` on ``device``, else a ``ValueError`` saying why."""
    if not torch.is_tensor(y):
        raise ValueError(f"y must be a torch.Tensor of shape ({N}, {C}), got {type(y).__name__}")
    expected = f"({N}, {C})" + (f" or ({N},)" if C == 1 else "")
    if y.dim() == 1 and C == 1 and y.shape[0] == N:
        y = y.unsqueeze(-1)
    if tuple(y.shape) != (N, C):
        raise ValueError(f"y must have shape {expected} (N samples x C model outputs), got {tuple(y.shape)}")
    if y.is_complex() or not (y.is_floating_point() or y.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"y must be real-valued, got dtype {y.dtype}")
    y = y.detach().to(dtype=dtype, device=device)
    bad = ~torch.isfinite(y)
    if bool(bad.any()):
        first = int(bad.any(-1).nonzero()[0])
        raise ValueError(f"y contains NaN or inf ({int(bad.sum())} entries, first in sample {first})")
    return y
