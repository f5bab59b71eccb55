"""Infinite-width kernels against an independent numerical quadrature of the layer recursion, and
the empirical NTK of wide NTK-parametrized MLPs against them.

The reference here never uses the closed forms: each expectation ``E[f(u) g(v)]`` over a
bivariate normal is integrated numerically — for ReLU in polar coordinates (the radial integral
by Gauss–Laguerre, the angle by Gauss–Legendre on the pieces between the kinks, so the
integrand is smooth on each piece), for erf/tanh/gelu by a 2-D Gauss–Hermite rule — and the
recursion is run pair by pair in numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import erf as np_erf

import ntkscale as nks
from ntkscale.models import MLP

# -- the reference -----------------------------------------------------------------------------
_LAG_S, _LAG_W = np.polynomial.laguerre.laggauss(40)
_LEG_X, _LEG_W = np.polynomial.legendre.leggauss(40)


def _cov_factor(a, b, c):
    """(u, v) = (√a z1, r z1 + s z2) for z ~ N(0, I₂)."""
    sa = math.sqrt(a)
    r = c / sa if sa > 0 else 0.0
    s = math.sqrt(max(b - r * r, 0.0))
    return sa, r, s


def _relu_expect(a, b, c, deriv):
    """E[relu(u) relu(v)] (deriv=False) or E[step(u) step(v)] (deriv=True), in polar coordinates."""
    sa, r, s = _cov_factor(a, b, c)
    p = 0 if deriv else 2  # homogeneity of the integrand in the radius
    radial = float(np.sum(_LAG_W * (2 * _LAG_S) ** (p / 2)))  # ∫ ρ^p e^{-ρ²/2} ρ dρ
    kinks = [math.pi / 2, 3 * math.pi / 2, (math.atan2(-r, s) % math.pi), (math.atan2(-r, s) % math.pi) + math.pi]
    edges = sorted({0.0, 2 * math.pi, *[k % (2 * math.pi) for k in kinks]})
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        al = 0.5 * (hi - lo) * _LEG_X + 0.5 * (hi + lo)
        u, v = sa * np.cos(al), r * np.cos(al) + s * np.sin(al)
        h = (u > 0) * (v > 0) * (1.0 if deriv else u * v)
        total += 0.5 * (hi - lo) * float(np.sum(_LEG_W * h))
    return radial * total / (2 * math.pi)


_HZ, _HW = np.polynomial.hermite_e.hermegauss(200)
_HW = _HW / _HW.sum()


def _phi(name, x, deriv):
    if name == "erf":
        return 2 / math.sqrt(math.pi) * np.exp(-x * x) if deriv else np_erf(x)
    if name == "tanh":
        return 1 - np.tanh(x) ** 2 if deriv else np.tanh(x)
    cdf = 0.5 * (1 + np_erf(x / math.sqrt(2)))
    return cdf + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi) if deriv else x * cdf


def _gh_expect(name, a, b, c, deriv):
    sa, r, s = _cov_factor(a, b, c)
    z1, z2 = _HZ[:, None], _HZ[None, :]
    vals = _phi(name, sa * z1, deriv) * _phi(name, r * z1 + s * z2, deriv)
    return float(_HW @ vals @ _HW)


def _expect(name, a, b, c, deriv):
    return _relu_expect(a, b, c, deriv) if name == "relu" else _gh_expect(name, a, b, c, deriv)


def reference(x1, x2, depth, name, W, b):
    """(NNGP, NTK) of one pair by the layer recursion with numerical expectations."""
    d = x1.size
    k11, k22, k12 = (W * W * float(p @ q) / d + b * b for p, q in ((x1, x1), (x2, x2), (x1, x2)))
    t12 = k12
    for _ in range(depth):
        e12, de12 = _expect(name, k11, k22, k12, False), _expect(name, k11, k22, k12, True)
        n11 = W * W * _expect(name, k11, k11, k11, False) + b * b
        n22 = W * W * _expect(name, k22, k22, k22, False) + b * b
        k12 = W * W * e12 + b * b
        t12 = k12 + W * W * de12 * t12
        k11, k22 = n11, n22
    return k12, t12


def reference_kernels(X1, X2, depth, name, W, b):
    A, B = X1.numpy(), X2.numpy()
    out = np.array([[reference(p, q, depth, name, W, b) for q in B] for p in A])
    return torch.from_numpy(out[..., 0]), torch.from_numpy(out[..., 1])


def _data(n, m, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)


# -- closed forms against quadrature ---------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "erf"])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("W_std,b_std", [(1.0, 0.0), (1.5, 0.3), (0.8, 1.0)])
def test_closed_forms_match_quadrature(activation, depth, W_std, b_std):
    X1, X2 = _data(3, 2)
    X2 = torch.cat([X2, X1[:1]])  # a coincident pair: correlation exactly 1
    nngp_ref, ntk_ref = reference_kernels(X1, X2, depth, activation, W_std, b_std)
    kw = dict(depth=depth, activation=activation, W_std=W_std, b_std=b_std)
    nngp = nks.kernels.infinite_nngp(X1, X2, **kw)
    ntk = nks.kernels.infinite_ntk(X1, X2, **kw)
    assert nngp.shape == ntk.shape == (3, 3) and ntk.dtype == torch.float64
    assert (nngp - nngp_ref).abs().max() <= 1e-8 * max(1.0, nngp_ref.abs().max().item())
    assert (ntk - ntk_ref).abs().max() <= 1e-8 * max(1.0, ntk_ref.abs().max().item())


@pytest.mark.parametrize("activation,degree,tol", [("gelu", 64, 1e-6), ("tanh", 160, 1e-5)])
def test_quadrature_activations_match_reference(activation, degree, tol):
    X1, X2 = _data(3, 2, seed=1)
    nngp_ref, ntk_ref = reference_kernels(X1, X2, 2, activation, 1.3, 0.2)
    kw = dict(depth=2, activation=activation, W_std=1.3, b_std=0.2, quadrature_degree=degree)
    assert (nks.kernels.infinite_nngp(X1, X2, **kw) - nngp_ref).abs().max() <= tol * nngp_ref.abs().max()
    assert (nks.kernels.infinite_ntk(X1, X2, **kw) - ntk_ref).abs().max() <= tol * ntk_ref.abs().max()


@pytest.mark.parametrize("activation", ["relu", "erf", "gelu"])
def test_tiling_dtype_and_symmetry(activation):
    X1, X2 = _data(7, 5)
    full = nks.kernels.infinite_ntk(X1, X2, depth=2, activation=activation, b_std=0.5)
    tiled = nks.kernels.infinite_ntk(X1, X2, depth=2, activation=activation, b_std=0.5, block_size=3)
    assert torch.allclose(full, tiled, rtol=1e-13, atol=1e-13)
    K = nks.kernels.infinite_nngp(X1.float(), depth=2, activation=activation, b_std=0.5)
    assert K.dtype == torch.float32 and K.shape == (7, 7)
    assert torch.allclose(K, K.T) and torch.linalg.eigvalsh(K.double()).min() > -1e-5


def test_multi_output_layout_matches_the_operator_rows():
    X = _data(4, 1)[0]
    K = nks.kernels.infinite_ntk(X, depth=1)
    M = nks.kernels.multi_output(K, 3)
    assert M.shape == (12, 12)
    assert torch.equal(M.to_dense(), torch.kron(K, torch.eye(3, dtype=K.dtype)))
    # a wide 3-output MLP's NTK is close to it in the same (sample, output) layout
    torch.manual_seed(0)
    net = MLP(4, [2048], 3)
    Ke = nks.NTKOperator(net, X, backend="structured", dtype=torch.float64).to_dense()
    assert (Ke - M.to_dense()).norm() / M.to_dense().norm() < 0.15


# -- finite width converges to the limit -----------------------------------------------------
def test_empirical_ntk_converges_like_inverse_sqrt_width():
    X = _data(6, 1, d=3)[0]
    kw = dict(activation="relu", W_std=1.4, b_std=0.3)
    Ki = nks.kernels.infinite_ntk(X, depth=2, **kw)
    widths = [32, 128, 512, 2048]
    errs = []
    for w in widths:
        e = []
        for seed in range(3):
            torch.manual_seed(seed)
            net = MLP(3, [w, w], 1, **kw).double()
            Ke = nks.NTKOperator(net, X, backend="structured").to_dense()
            e.append(((Ke - Ki).norm() / Ki.norm()).item())
        errs.append(float(np.mean(e)))
    slope = np.polyfit(np.log(widths), np.log(errs), 1)[0]
    assert -0.8 < slope < -0.3, (errs, slope)
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.06, errs


# -- parametrizations ------------------------------------------------------------------------
def test_standard_and_ntk_parametrization_same_function_different_ntk():
    X = _data(5, 1, d=3)[0]
    kw = dict(activation="erf", W_std=1.7, b_std=0.5)
    torch.manual_seed(3)
    ntk = MLP(3, [512, 512], 1, parametrization="ntk", **kw).double()
    torch.manual_seed(3)
    std = MLP(3, [512, 512], 1, parametrization="standard", **kw).double()
    assert torch.allclose(ntk(X), std(X), rtol=1e-6, atol=1e-6)  # one function (float32 draws)
    # same activations and output gradients, so each parameter's NTK block differs exactly by the
    # layer's multiplier: Θ_standard = Θ_ntk / weight_scale² (weights), / bias_scale² (biases)
    for name, scale in [("0.weight", 1.7 / math.sqrt(3)), ("2.weight", 1.7 / math.sqrt(512)),
                        ("4.weight", 1.7 / math.sqrt(512)), ("2.bias", 0.5), ("4.bias", 0.5)]:
        Kn = nks.NTKOperator(ntk, X, backend="structured", params=[name]).to_dense()
        Ks = nks.NTKOperator(std, X, backend="structured", params=[name]).to_dense()
        assert torch.allclose(Ks * scale**2, Kn, rtol=1e-5, atol=1e-8 * Kn.abs().max().item()), name
    # so the standard-parametrized NTK is dominated by the hidden layers, ~ width / W_std² larger
    ratio = nks.NTKOperator(std, X).diagonal() / nks.NTKOperator(ntk, X).diagonal()
    assert (ratio > 20).all(), ratio


@pytest.mark.parametrize("parametrization", ["ntk", "standard"])
def test_initial_output_variance_is_the_nngp_diagonal(parametrization):
    X = _data(4, 1, d=3)[0]
    kw = dict(activation="relu", W_std=1.3, b_std=0.4)
    torch.manual_seed(0)
    # 4000 outputs are independent given the hidden layers: their variance estimates the kernel
    net = MLP(3, [1024, 1024], 4000, parametrization=parametrization, **kw).double()
    with torch.no_grad():
        var = net(X).square().mean(1)
    nngp = nks.kernels.infinite_nngp(X, depth=2, **kw).diagonal()
    assert ((var - nngp).abs() / nngp).max() < 0.12, (var, nngp)


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(activation="sigmoid"), "activation must be one of"),
        (dict(depth=-1), "depth must be an int >= 0"),
        (dict(depth=1.5), "depth must be an int >= 0"),
        (dict(W_std=0.0), "W_std must be a finite number > 0"),
        (dict(b_std=-1.0), "b_std must be a finite number >= 0"),
        (dict(block_size=0), "block_size must be an int >= 1"),
        (dict(quadrature_degree=1), "quadrature_degree must be an int >= 2"),
    ],
)
def test_kernel_bad_arguments(kwargs, match):
    X = _data(3, 1)[0]
    with pytest.raises(ValueError, match=match):
        nks.kernels.infinite_ntk(X, **{"depth": 1, **kwargs})


def test_kernel_bad_data():
    X, Y = _data(3, 2)
    with pytest.raises(ValueError, match=r"X1 must be a floating 2-D tensor"):
        nks.kernels.infinite_ntk(X[0], depth=1)
    with pytest.raises(ValueError, match=r"X2 must be a 2-D tensor \(N2, 4\)"):
        nks.kernels.infinite_nngp(X, Y[:, :2], depth=1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nks.kernels.infinite_ntk(torch.full((2, 4), float("nan")), depth=1)
    with pytest.raises(ValueError, match="C must be an int >= 1"):
        nks.kernels.multi_output(torch.eye(2), 0)
