"""Argument checks of the GP layer, each written once."""

from __future__ import annotations

import math

from .._checks import check_targets  # noqa: F401 (re-exported)
from ..solvers._utils import check_float, check_positive_int  # noqa: F401 (re-exported)


def check_noise(noise) -> float:
    return check_float(noise, "noise (the likelihood variance σ²)", positive=False)


def check_prior_scale(prior_scale) -> float:
    return check_float(prior_scale, "prior_scale (the prior variance s² of the weights)", positive=True)


def check_tol(tol) -> float:
    return check_float(tol, "tol (the relative CG residual tolerance)", positive=True)


def check_range(rng, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in rng)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (lo, hi) with 0 < lo < hi < inf, got {rng!r}") from None
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"{name} must be (lo, hi) with 0 < lo < hi < inf, got {rng!r}")
    return lo, hi


def check_mode(mode: str) -> str:
    if mode not in ("exact", "fast", "sample"):
        raise ValueError(f"mode must be 'exact', 'fast' or 'sample', got {mode!r}")
    return mode


def key(lam: float) -> float:
    """Cache key of a shift: ``λ`` to 12 significant digits (``σ²/s²`` round-off is not a miss)."""
    return float(f"{float(lam):.12g}")
