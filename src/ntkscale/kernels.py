"""Infinite-width NNGP and NTK of the NTK-parametrized MLP.

The limits of ``ntkscale.models.MLP(d, [w] * depth, 1, activation, W_std, b_std,
parametrization="ntk")`` as ``w → ∞`` — the conventions of neural-tangents'
``stax.serial(*[stax.Dense(w, W_std, b_std, parameterization="ntk"), act] * depth,
stax.Dense(1, W_std, b_std, parameterization="ntk"))``. With ``σ_w = W_std``, ``σ_b = b_std``:

    Σ⁰(x, x') = σ_w² x·x'/d + σ_b²,                       Θ⁰ = Σ⁰
    Σˡ = σ_w² E[φ(u) φ(v)] + σ_b²,                         (u, v) ~ N(0, Σˡ⁻¹ on {x, x'})
    Θˡ = Σˡ + σ_w² E[φ'(u) φ'(v)] Θˡ⁻¹,                   l = 1 … depth

and ``infinite_nngp = Σ^depth``, ``infinite_ntk = Θ^depth`` (the readout layer is the last step).
The expectations are closed forms for ``"relu"`` (arc-cosine kernels) and ``"erf"``, and 2-D
Gauss–Hermite quadrature of the bivariate normal for ``"tanh"`` and ``"gelu"``.

For ``C`` outputs the readout's rows are independent, so the limit is ``Θ ⊗ I_C``: entry
``((i, c), (j, c'))`` is ``Θ(x_i, x_j) δ_cc'``. :func:`multi_output` gives it in ntkscale's
row layout (row ``i·C + c``, as :class:`ntkscale.NTKOperator`) as a lazy Kronecker operator.

Kernels are computed tile by tile (``block_size`` entries at a time), so an ``N1 × N2`` kernel
needs its own memory plus a few tiles.

>>> import torch, ntkscale as nks
>>> X = torch.randn(4, 3, dtype=torch.float64)
>>> K = nks.kernels.infinite_ntk(X, depth=2)
>>> K.shape, bool(torch.allclose(K, K.T))
(torch.Size([4, 4]), True)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from linear_operator.operators import DenseLinearOperator, IdentityLinearOperator, KroneckerProductLinearOperator
from torch import Tensor

__all__ = ["infinite_ntk", "infinite_nngp", "multi_output", "CLOSED_FORM", "QUADRATURE"]

CLOSED_FORM = ("relu", "erf")
QUADRATURE = ("tanh", "gelu")
DEFAULT_BLOCK = 2**20  # kernel entries per tile (closed forms); quadrature tiles are smaller


def infinite_nngp(X1: Tensor, X2: Tensor | None = None, *, depth: int, activation: str = "relu",
                  W_std: float = 1.0, b_std: float = 0.0, block_size: int | None = None,
                  quadrature_degree: int = 64) -> Tensor:
    """Infinite-width NNGP kernel ``Σ^depth`` of the NTK-parametrized MLP (the prior covariance of
    its output at initialization).

    Args:
        X1: inputs.  # shape: (N1, d)
        X2: second inputs (default ``X1``).  # shape: (N2, d)
        depth: number of hidden layers (``len(widths)``), an int ≥ 0.
        activation: ``"relu"``, ``"erf"`` (closed forms), ``"tanh"`` or ``"gelu"`` (quadrature).
        W_std: ``σ_w > 0``.
        b_std: ``σ_b ≥ 0``.
        block_size: kernel entries computed per tile (default 2²⁰, divided by the number of
            quadrature nodes for tanh/gelu).
        quadrature_degree: Gauss–Hermite nodes per dimension for tanh/gelu. The error falls like
            ``exp(-c √degree)`` (tanh has poles near the real axis): at pre-activation variances
            around 2, degree 64 gives about 1e-3 relative error for tanh and 1e-6 for gelu,
            degree 150 about 1e-6 for tanh; the cost per entry is ``2 · degree²`` evaluations.

    Returns:
        The kernel in ``X1``'s dtype and device.  # shape: (N1, N2)
    """
    return _kernel(X1, X2, depth, activation, W_std, b_std, block_size, quadrature_degree, ntk=False)


def infinite_ntk(X1: Tensor, X2: Tensor | None = None, *, depth: int, activation: str = "relu",
                 W_std: float = 1.0, b_std: float = 0.0, block_size: int | None = None,
                 quadrature_degree: int = 64) -> Tensor:
    """Infinite-width NTK ``Θ^depth`` of the NTK-parametrized MLP (one output; see
    :func:`multi_output` for ``C``). Arguments as :func:`infinite_nngp`.

    Returns:
        The kernel in ``X1``'s dtype and device.  # shape: (N1, N2)
    """
    return _kernel(X1, X2, depth, activation, W_std, b_std, block_size, quadrature_degree, ntk=True)


def multi_output(K: Tensor, C: int) -> KroneckerProductLinearOperator:
    """The ``C``-output limit ``K ⊗ I_C`` in ntkscale's row layout (row ``i·C + c``).

    Args:
        K: a single-output kernel, e.g. from :func:`infinite_ntk`.  # shape: (N1, N2)
        C: number of outputs, ≥ 1.

    Returns:
        A lazy ``LinearOperator`` of shape ``(N1·C, N2·C)`` (``.to_dense()`` materializes it).
    """
    if not isinstance(K, Tensor) or K.dim() != 2:
        raise ValueError(f"K must be a 2-D tensor (N1, N2), got {type(K).__name__} of shape {getattr(K, 'shape', None)}")
    if not (isinstance(C, int) and not isinstance(C, bool) and C >= 1):
        raise ValueError(f"C must be an int >= 1, got {C!r}")
    return KroneckerProductLinearOperator(
        DenseLinearOperator(K), IdentityLinearOperator(C, dtype=K.dtype, device=K.device)
    )


# -- checks ------------------------------------------------------------------------------------
def _check(X1, X2, depth, activation, W_std, b_std, block_size, degree):
    if not isinstance(X1, Tensor) or X1.dim() != 2 or not X1.is_floating_point():
        raise ValueError(f"X1 must be a floating 2-D tensor (N1, d), got {type(X1).__name__} "
                         f"of shape {tuple(getattr(X1, 'shape', ()))}")
    if X2 is not None:
        if not isinstance(X2, Tensor) or X2.dim() != 2 or X2.shape[1] != X1.shape[1]:
            raise ValueError(f"X2 must be a 2-D tensor (N2, {X1.shape[1]}) like X1, got shape "
                             f"{tuple(getattr(X2, 'shape', ()))}")
        if X2.device != X1.device:
            raise ValueError(f"X1 and X2 must be on one device, got {X1.device} and {X2.device}")
    for name, X in (("X1", X1), ("X2", X2)):
        if X is not None and not torch.isfinite(X).all():
            raise ValueError(f"{name} contains NaN or Inf")
    if not (isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0):
        raise ValueError(f"depth must be an int >= 0 (the number of hidden layers), got {depth!r}")
    if activation not in CLOSED_FORM + QUADRATURE:
        raise ValueError(f"activation must be one of {CLOSED_FORM + QUADRATURE}, got {activation!r}")
    if not (isinstance(W_std, (int, float)) and math.isfinite(W_std) and W_std > 0):
        raise ValueError(f"W_std must be a finite number > 0, got {W_std!r}")
    if not (isinstance(b_std, (int, float)) and math.isfinite(b_std) and b_std >= 0):
        raise ValueError(f"b_std must be a finite number >= 0, got {b_std!r}")
    if block_size is not None and not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not (isinstance(degree, int) and degree >= 2):
        raise ValueError(f"quadrature_degree must be an int >= 2, got {degree!r}")


# -- expectations over (u, v) ~ N(0, [[a, c], [c, b]]) ---------------------------------------
def _relu(a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """(E[relu(u) relu(v)], E[relu'(u) relu'(v)]) — the arc-cosine kernels of order 1 and 0."""
    norm = (a * b).sqrt()
    cos = torch.where(norm > 0, c / norm.clamp_min(1e-300), torch.ones_like(c)).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = (1 - cos.square()).clamp_min(0).sqrt()
    e = norm * (sin + (math.pi - theta) * cos) / (2 * math.pi)
    de = (math.pi - theta) / (2 * math.pi)
    return e, de


def _erf(a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """(E[erf(u) erf(v)], E[erf'(u) erf'(v)]) in closed form."""
    den = (1 + 2 * a) * (1 + 2 * b)
    e = (2 / math.pi) * torch.arcsin((2 * c / den.sqrt()).clamp(-1.0, 1.0))
    de = (4 / math.pi) / (den - 4 * c.square()).clamp_min(1e-300).sqrt()
    return e, de


def _phi(name: str, x: Tensor) -> tuple[Tensor, Tensor]:
    if name == "tanh":
        t = torch.tanh(x)
        return t, 1 - t.square()
    # exact gelu: x Φ(x), derivative Φ(x) + x φ(x)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    pdf = torch.exp(-0.5 * x.square()) / math.sqrt(2 * math.pi)
    return x * cdf, cdf + x * pdf


def _quadrature(name: str, degree: int):
    z, w = np.polynomial.hermite_e.hermegauss(degree)  # probabilists' Hermite: weight e^{-z²/2}
    w = w / w.sum()

    def expect(a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        zt = torch.as_tensor(z, dtype=a.dtype, device=a.device)
        wt = torch.as_tensor(w, dtype=a.dtype, device=a.device)
        sa = a.sqrt()
        r = torch.where(sa > 0, c / sa.clamp_min(1e-300), torch.zeros_like(c))  # v = r z1 + s z2
        s = (b - r.square()).clamp_min(0).sqrt()
        u = sa[..., None] * zt  # (..., n)
        fu, dfu = _phi(name, u)
        v = r[..., None, None] * zt[:, None] + s[..., None, None] * zt  # (..., n1, n2)
        fv, dfv = _phi(name, v)
        ev = fv @ wt  # (..., n1): E over z2
        dev = dfv @ wt
        return (fu * ev) @ wt, (dfu * dev) @ wt

    return expect


def _kernel(X1, X2, depth, activation, W_std, b_std, block_size, degree, ntk):
    _check(X1, X2, depth, activation, W_std, b_std, block_size, degree)
    out_dtype, device = X1.dtype, X1.device
    dt = torch.float64 if out_dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) else out_dtype
    same = X2 is None
    X2 = X1 if same else X2
    d = X1.shape[1]
    w2, b2 = float(W_std) ** 2, float(b_std) ** 2
    if activation == "relu":
        expect = _relu
    elif activation == "erf":
        expect = _erf
    else:
        expect = _quadrature(activation, degree)
    per_entry = 1 if activation in CLOSED_FORM else 2 * degree**2
    entries = max(1, (block_size or DEFAULT_BLOCK) // (1 if block_size else per_entry))

    def diag_chain(X: Tensor) -> list[Tensor]:
        """Σˡ(x, x) for l = 0 … depth-1 (the variances the off-diagonal recursion needs)."""
        q = w2 * X.to(dt).square().sum(1) / d + b2
        out = [q]
        for _ in range(depth - 1):
            q = w2 * expect(q, q, q)[0] + b2
            out.append(q)
        return out

    q1 = diag_chain(X1)
    q2 = q1 if same else diag_chain(X2)
    N1, N2 = X1.shape[0], X2.shape[0]
    out = torch.empty(N1, N2, dtype=out_dtype, device=device)
    tc = min(N2, max(1, entries))
    tr = min(N1, max(1, entries // tc))
    X2d = X2.to(dt)
    for i0 in range(0, N1, tr):
        i1 = min(N1, i0 + tr)
        A = X1[i0:i1].to(dt)
        for j0 in range(0, N2, tc):
            j1 = min(N2, j0 + tc)
            K = w2 * (A @ X2d[j0:j1].T) / d + b2
            T = K if ntk else None
            for l in range(depth):
                a = q1[l][i0:i1, None].expand_as(K)
                b = q2[l][None, j0:j1].expand_as(K)
                e, de = expect(a, b, K)
                K = w2 * e + b2
                if ntk:
                    T = K + w2 * de * T
            out[i0:i1, j0:j1] = T if ntk else K
    return out
