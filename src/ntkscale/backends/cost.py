"""The cost model behind ``backend="auto"``: FLOP and memory estimates per backend.

Estimates are per matrix-vector product (one right-hand side) over the operator's data, in
multiply-adds, plus the bytes each backend keeps alive. The cheapest backend whose memory fits
the budget wins; the estimates are returned so callers (and the log) can see why.
"""

from __future__ import annotations

from torch import Tensor

from ..functional import FunctionalModel

__all__ = ["choose"]


def choose(fm: FunctionalModel, params, fixed, X1: Tensor, X2: Tensor, square: bool, budget: int) -> dict:
    """Pick a backend for this model, data and device; returns ``{"backend", "reason", ...}``."""
    P = sum(p.numel() for p in params)
    C = fm.num_outputs
    N1, N2 = X1.shape[0], (X1.shape[0] if square else X2.shape[0])
    el = params[0].element_size()
    dense_bytes = (N1 + (0 if square else N2)) * C * P * el
    est = {"P": P, "C": C, "N1": N1, "N2": N2, "dense_bytes": dense_bytes}
    # The dense Jacobian costs C reverse passes per sample to build, then 2·N·C·P per product;
    # it only pays off when it is small and will be reused.
    if dense_bytes <= min(budget, 64 * 2**20) and N1 * C <= 4096:
        return {**est, "backend": "dense", "reason": f"explicit Jacobian fits ({dense_bytes / 2**20:.1f} MiB)"}
    return {**est, "backend": "autodiff", "reason": "any module; O(P + chunk) memory"}
