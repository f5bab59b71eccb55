"""Matvec engines for the NTK operator, by name.

``"autodiff"`` (torch.func, any module), ``"structured"`` (per-layer factors), ``"keops"``
(KeOps kernel-space reduction), ``"cuda"`` (the csrc fused kernel), ``"dense"`` (explicit
Jacobian, the reference), and ``"auto"``, which a cost model resolves to one of them.
"""

from __future__ import annotations

from importlib import import_module

from .base import Backend, KernelData

__all__ = ["Backend", "KernelData", "get_backend", "BACKENDS"]

# name -> (module, class); imported on first use so optional parts cost nothing at import time
_REGISTRY = {
    "autodiff": ("autodiff", "AutodiffBackend"),
    "dense": ("dense", "DenseBackend"),
    "structured": ("structured", "StructuredBackend"),
    "keops": ("structured", "KeOpsBackend"),
    "cuda": ("structured", "CudaBackend"),
}
BACKENDS = (*_REGISTRY, "auto")


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (not ``"auto"``; see :func:`ntkscale.backends.cost.choose`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    module, cls = _REGISTRY[name]
    return getattr(import_module(f"{__name__}.{module}"), cls)()
