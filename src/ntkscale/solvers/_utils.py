"""Checks and the one matrix-free product shared by the solvers."""

from __future__ import annotations

import math

import torch
from linear_operator import to_dense


def check_operator(K) -> int:
    """Return ``n`` for a square ``(n, n)`` operator, else raise ``ValueError``."""
    shape = getattr(K, "shape", None)
    if shape is None or not hasattr(K, "matmul"):
        raise ValueError(f"K must be a square linear_operator.LinearOperator, got {type(K).__name__}")
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"K must be a square (n, n) operator, got shape {tuple(shape)}")
    if shape[0] < 1:
        raise ValueError("K must have at least one row, got shape (0, 0)")
    return int(shape[0])


def check_noise(noise) -> float:
    """Return ``noise`` as a float, else raise ``ValueError`` if negative or not finite."""
    if torch.is_tensor(noise):
        if noise.numel() != 1:
            raise ValueError(f"noise must be a scalar >= 0, got a tensor of shape {tuple(noise.shape)}")
        noise = noise.item()
    noise = float(noise)
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite scalar >= 0, got {noise!r}")
    return noise


def shifted_matmul(K, V: torch.Tensor, noise: float) -> torch.Tensor:
    """``(K + noise I) V`` with one batched product; the result carries no autograd graph.

    Args:
        K: square operator.
        V: right-hand sides.  # shape: (n, k)

    Returns:
        The product.  # shape: (n, k)
    """
    V = V.contiguous()  # operators may view/reshape their right-hand side
    KV = K.matmul(V).detach()
    if noise:
        KV = KV + noise * V
    return KV


def rows(K, idx: torch.Tensor) -> torch.Tensor:
    """Dense rows ``K[idx, :]``.  # shape: (len(idx), n)"""
    return to_dense(K[idx.to(K.device), :]).detach()


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded generator on ``device`` (so random draws do not touch the global RNG)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen
