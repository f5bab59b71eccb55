"""The matrix-free Jacobian difference against dense float64 Jacobians (``cases.reference_jacobian``)."""

from __future__ import annotations

import copy

import pytest
import torch

import ntkscale as nks
from ntkscale.models import CNN, MLP

from .cases import reference_jacobian


def _perturbed(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    p1 = {n: p + scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in p0.items()}
    return p1, p0


def _dense_delta(model, X, p1, p0):
    m1, m0 = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for m, ps in ((m1, p1), (m0, p0)):
            for n, p in m.named_parameters():
                p.copy_(ps[n])
    return reference_jacobian(m1, X) - reference_jacobian(m0, X)


@pytest.mark.parametrize(
    "make,in_shape",
    [
        (lambda: MLP(3, [7, 5], 2, activation="tanh", b_std=0.3), (3,)),
        (lambda: MLP(3, [6], 1, activation="relu", parametrization="standard", b_std=0.2), (3,)),
        (lambda: CNN(2, [3], 2, activation="erf", b_std=0.5), (2, 4, 4)),
    ],
)
def test_matches_dense_jacobian_difference(make, in_shape):
    torch.manual_seed(0)
    model = make().double()
    X = torch.randn(5, *in_shape, dtype=torch.float64)
    p1, p0 = _perturbed(model, 0.3, 1)
    D = _dense_delta(model, X, p1, p0)  # (N·C, P)
    op = nks.JacobianDifferenceOperator(model, X, p1, p0, chunk_size=2)
    assert op.shape == (D.shape[0], D.shape[0])
    assert torch.allclose(op.to_dense(), D @ D.T, rtol=1e-10, atol=1e-12)
    res = nks.jacobian_difference_norm(model, X, p1, p0, tol=1e-10)
    ref = torch.linalg.matrix_norm(D, ord=2).item()
    assert res.converged and abs(res.norm - ref) <= 1e-8 * ref
    dist = torch.cat([(p1[n] - p0[n]).reshape(-1) for n in p0]).norm().item()
    assert abs(res.param_distance - dist) <= 1e-12 * dist
    assert abs(res.ratio - ref / dist) <= 1e-8 * ref / dist


def test_module_arguments_and_zero_difference():
    torch.manual_seed(0)
    a, b = MLP(3, [5], 1).double(), MLP(3, [5], 1).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    D = _dense_delta(a, X, dict(b.named_parameters()), dict(a.named_parameters()))
    op = nks.JacobianDifferenceOperator(a, X, b, a)
    assert torch.allclose(op.to_dense(), D @ D.T, rtol=1e-10, atol=1e-12)
    assert op.to_dense().abs().max() > 0
    same = nks.JacobianDifferenceOperator(a, X, a, a)
    assert same.to_dense().abs().max() == 0


def test_bad_input():
    model = MLP(3, [5], 1).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    p = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"params0 lacks the model's parameters \['0.weight'\]"):
        nks.jacobian_difference_norm(model, X, p, {k: v for k, v in p.items() if k != "0.weight"})
    with pytest.raises(ValueError, match=r"params\['0.bias'\] must be a tensor of shape \(5,\)"):
        nks.jacobian_difference_norm(model, X, {**p, "0.bias": torch.zeros(3)}, p)
    with pytest.raises(TypeError, match="params must be a mapping name -> tensor or an nn.Module"):
        nks.JacobianDifferenceOperator(model, X, [1, 2], p)


@pytest.mark.parametrize("backend", ["autodiff", "structured", "dense"])
def test_operator_vjp_is_the_adjoint_of_its_jvp(backend):
    """``NTKOperator.vjp`` = ``J(X2)ᵀ V`` against the dense float64 Jacobian (also on a column slice),
    and ⟨J u, v⟩ = ⟨u, Jᵀ v⟩ with ``jvp``."""
    torch.manual_seed(0)
    model = MLP(3, [6], 2, activation="tanh", b_std=0.3).double()
    X, Xt = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    J, Jt = reference_jacobian(model, X), reference_jacobian(model, Xt)
    K = nks.NTKOperator(model, Xt, X, backend=backend)
    V = torch.randn(10, 3, dtype=torch.float64)
    torch.testing.assert_close(K.vjp(V), J.T @ V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K.vjp(V[:, 0]), J.T @ V[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K[:, 2:7].vjp(V[2:7]), J[2:7].T @ V[2:7], rtol=1e-12, atol=1e-12)
    u = torch.randn(J.shape[1], dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    assert float(K.jvp(u) @ w) == pytest.approx(float(u @ K.T.vjp(w)), rel=1e-12)
    torch.testing.assert_close(K.jvp(u), Jt @ u, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"cotangents must have shape \(10,\) or \(10, k\)"):
        K.vjp(torch.randn(8, dtype=torch.float64))
