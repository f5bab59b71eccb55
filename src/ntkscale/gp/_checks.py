"""Argument checks of the GP layer, each written once."""

from __future__ import annotations

import math

import torch
from torch import Tensor


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


def check_noise(noise) -> float:
    if torch.is_tensor(noise):
        noise = noise.item()
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise (the likelihood variance σ²) must be a finite float >= 0, got {noise!r}")
    return float(noise)


def check_prior_scale(prior_scale) -> float:
    if torch.is_tensor(prior_scale):
        prior_scale = prior_scale.item()
    if (
        isinstance(prior_scale, bool)
        or not isinstance(prior_scale, (int, float))
        or not math.isfinite(prior_scale)
        or prior_scale <= 0
    ):
        raise ValueError(
            f"prior_scale (the prior variance s² of the weights) must be a finite float > 0, got {prior_scale!r}"
        )
    return float(prior_scale)


def check_tol(tol) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol (the relative CG residual tolerance) must be a finite float > 0, got {tol!r}")
    return float(tol)


def check_positive_int(value, name: str, default):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


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
