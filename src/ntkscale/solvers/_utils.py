"""Checks (of operators and scalar arguments, for the whole package) and the one matrix-free
product shared by the solvers."""

from __future__ import annotations

import hashlib
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


def check_float(value, name: str, positive: bool) -> float:
    """``value`` as a float, else a ``ValueError``: finite, and ``> 0`` (``positive``) or ``>= 0``."""
    if torch.is_tensor(value):
        value = value.item()
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"{name} must be a finite float {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def check_positive_int(value, name: str, default=None):
    """``value`` (``default`` for None), else a ``ValueError`` unless an integer ``>= 1``."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


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


def operator_fingerprint(K) -> str:
    """A digest (hex SHA-256) of what defines the entries of ``K``, for keying caches on disk.

    * An object with a ``fingerprint()`` method (e.g. :class:`ntkscale.NTKOperator`, which digests
      its network, parameters, data, parameter selection, backend and dtype): that string.
    * A tensor: its shape, dtype and every byte of its values.
    * A ``linear_operator.LinearOperator``: its class, and recursively its representation
      (``_args`` tensors and operators, ``_kwargs``), so equal digests mean equal operators for
      every operator whose class is defined by its representation.
    """
    h = hashlib.sha256()
    _digest(h, K)
    return h.hexdigest()


def _digest(h, obj) -> None:
    fingerprint = getattr(obj, "fingerprint", None)
    if callable(fingerprint):
        h.update(b"F" + str(fingerprint()).encode())
    elif torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(b"T" + repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif hasattr(obj, "_args") and hasattr(obj, "_kwargs"):  # a LinearOperator
        h.update(b"L" + f"{type(obj).__module__}.{type(obj).__qualname__}".encode())
        for arg in obj._args:
            _digest(h, arg)
        for name in sorted(obj._kwargs):
            h.update(b"K" + name.encode())
            _digest(h, obj._kwargs[name])
    elif isinstance(obj, (list, tuple)):
        h.update(b"(")
        for item in obj:
            _digest(h, item)
        h.update(b")")
    else:
        h.update(b"R" + repr(obj).encode())
