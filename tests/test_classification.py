"""``NTKClassifierGP`` (GGN linearized Laplace) against a dense weight-space computation.

The reference is built without the library: the explicit Jacobian (one ``torch.autograd.grad``
per (sample, output) row, ``tests.cases.reference_jacobian``), the explicit
``Λ_i = diag(p_i) − p_i p_iᵀ`` and the weight-space posterior
``Σ = (Σ_i J_iᵀ Λ_i J_i + I/s²)⁻¹`` by ``torch.linalg.inv``, all in float64; the logit
covariance of a test point is ``J*_i Σ J*_iᵀ``.

Tolerances:
* covariances: 1e-8 relative to the largest entry (PCG at tol 1e-12 on a system with condition
  number ≲ 1e4: the solve error is ~1e-9 relative; the reference inverse adds ~1e-12);
* probit vs Monte Carlo: different approximations of one integral; at small logit variances
  they agree within 5 MC standard errors plus 0.1 · (largest logit variance), the probit
  approximation's own error;
* MC vs a reference MC with the same samples drawn from the dense covariance: within its
  Monte Carlo error (the two roots differ, so the samples do).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ntkscale as nks
from ntkscale.gp.classification import probabilities

from .cases import reference_jacobian

DT = torch.float64


def _problem(C: int = 3, N: int = 30, d: int = 2, width: int = 24, seed: int = 0, train_steps: int = 40):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, C)).to(DT)
    X = torch.randn(N, d, generator=g, dtype=DT)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    y = y.clamp_max(C - 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(train_steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
    Xt = torch.randn(9, d, generator=g, dtype=DT) * 2
    return net, X, y, Xt


def _dense_reference(net, X, Xt, s2):
    J = reference_jacobian(net, X)  # shape: (N*C, P)
    Jt = reference_jacobian(net, Xt)  # shape: (M*C, P)
    with torch.no_grad():
        p = torch.softmax(net(X), -1)
        mean = net(Xt)
    N, C = p.shape
    Lam = torch.block_diag(*[torch.diag(p[i]) - torch.outer(p[i], p[i]) for i in range(N)])  # (NC, NC)
    P = J.shape[1]
    Sigma = torch.linalg.inv(J.T @ Lam @ J + torch.eye(P, dtype=DT) / s2)
    full = Jt @ Sigma @ Jt.T
    M = Xt.shape[0]
    cov = torch.stack([full[i * C : (i + 1) * C, i * C : (i + 1) * C] for i in range(M)])
    return mean, cov


@pytest.mark.parametrize(
    "C, s2, solver", [(3, 1.0, "cg"), (3, 0.05, "cg"), (2, 10.0, "cg"), (4, 0.5, "cg"), (3, 1.0, "cholesky")]
)
def test_covariance_matches_dense_weight_space(C, s2, solver):
    net, X, y, Xt = _problem(C=C)
    clf = nks.NTKClassifierGP(net, X, y, prior_scale=s2, tol=1e-12, rank=20, test_block=4, exact_solver=solver)
    mean, cov = clf.predict_logits(Xt)
    mean_ref, cov_ref = _dense_reference(net, X, Xt, s2)
    assert mean.shape == (9, C) and cov.shape == (9, C, C)
    assert torch.allclose(mean, mean_ref, rtol=1e-12, atol=1e-12)
    scale = cov_ref.abs().max()
    assert (cov - cov_ref).abs().max() <= 1e-8 * scale
    # the covariance is below the prior's (data only shrinks it) and PSD
    assert bool((torch.linalg.eigvalsh(cov) > -1e-10 * scale).all())


def test_prior_scale_can_change_after_construction():
    net, X, y, Xt = _problem()
    clf = nks.NTKClassifierGP(net, X, y, prior_scale=1.0, tol=1e-12)
    clf.predict_logits(Xt)
    clf.prior_scale = 0.2
    _, cov = clf.predict_logits(Xt)
    _, cov_ref = _dense_reference(net, X, Xt, 0.2)
    assert (cov - cov_ref).abs().max() <= 1e-8 * cov_ref.abs().max()


def test_probit_is_laplace_torch_formula_and_mc_agrees():
    net, X, y, Xt = _problem()
    clf = nks.NTKClassifierGP(net, X, y, prior_scale=2.0, tol=1e-10)
    mean, cov = clf.predict_logits(Xt)
    probit = clf.predict(Xt, link="probit")
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    expected = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)  # laplace-torch's probit
    assert torch.allclose(probit, expected, rtol=1e-12, atol=1e-14)

    S = 20_000
    mc = clf.predict(Xt, link="mc", num_samples=S, seed=1)
    assert torch.allclose(mc.sum(-1), torch.ones(9, dtype=DT))
    # independent MC from the dense reference covariance (Cholesky root, other samples)
    _, cov_ref = _dense_reference(net, X, Xt, 2.0)
    g = torch.Generator().manual_seed(7)
    L = torch.linalg.cholesky(cov_ref + 1e-12 * torch.eye(mean.shape[1], dtype=DT))
    f = mean + torch.einsum("mcd,smd->smc", L, torch.randn(S, *mean.shape, generator=g, dtype=DT))
    soft = torch.softmax(f, -1)
    ref = soft.mean(0)
    se = soft.std(0) / math.sqrt(S)
    assert bool(((mc - ref).abs() <= 5 * math.sqrt(2) * se + 1e-12).all())
    # both are less confident than the MAP network where the logits are uncertain
    map_conf = clf.predict_map(Xt).max(-1).values
    assert bool((mc.max(-1).values <= map_conf + 5 * se.max()).all())


def test_probit_and_mc_agree_at_small_logit_variance():
    """The probit link approximates the MC integral; with small logit variances (max ≈ 0.06
    here) the two agree within the MC error plus the approximation's own error (measured 5e-3,
    bounded by 0.1 · max variance). At large variances they part: per-class probit scaling
    ignores that variance along the all-ones direction (Λ's null space, untouched by the data)
    does not change the softmax (at s² = 2 here the gap is ≈ 0.13)."""
    net, X, y, Xt = _problem()
    clf = nks.NTKClassifierGP(net, X, y, prior_scale=1e-3, tol=1e-10)
    _, cov = clf.predict_logits(Xt)
    vmax = torch.diagonal(cov, dim1=-2, dim2=-1).max().item()
    S = 20_000
    probit = clf.predict(Xt, link="probit")
    mc = clf.predict(Xt, link="mc", num_samples=S, seed=3)
    se = 0.5 / math.sqrt(S)  # a probability's sample mean has standard error <= 0.5/sqrt(S)
    assert 0.01 < vmax < 0.2
    assert (probit - mc).abs().max().item() <= 5 * se + 0.1 * vmax


def test_probabilities_zero_covariance_is_softmax():
    mean = torch.randn(5, 4, dtype=DT)
    cov = torch.zeros(5, 4, 4, dtype=DT)
    for link in ("probit", "mc"):
        assert torch.allclose(probabilities(mean, cov, link=link, num_samples=10), torch.softmax(mean, -1))


def test_mc_with_a_singular_covariance():
    """Each Λ_i has rank C − 1; a covariance along the all-ones direction only does not change
    the softmax, and the sampler must accept a singular covariance."""
    mean = torch.randn(3, 3, dtype=DT)
    ones = torch.ones(3, 3, dtype=DT)
    cov = ones.expand(3, 3, 3) * 4.0  # rank one, along (1, 1, 1)
    mc = probabilities(mean, cov, link="mc", num_samples=100, seed=0)
    assert torch.allclose(mc, torch.softmax(mean, -1), atol=1e-12)


def test_bad_labels_and_models():
    net, X, y, Xt = _problem(C=3)
    with pytest.raises(ValueError, match=r"labels in \[0, 3\).*got 3"):
        nks.NTKClassifierGP(net, X, torch.where(y == 0, 3, y), prior_scale=1.0)
    with pytest.raises(ValueError, match=r"labels in \[0, 3\).*got -1"):
        nks.NTKClassifierGP(net, X, y - 1, prior_scale=1.0)
    with pytest.raises(ValueError, match="non-integer"):
        nks.NTKClassifierGP(net, X, y.double() + 0.5, prior_scale=1.0)
    with pytest.raises(ValueError, match="one-hot"):
        nks.NTKClassifierGP(net, X, nn.functional.one_hot(y, 3), prior_scale=1.0)
    with pytest.raises(ValueError, match=r"shape \(30,\)"):
        nks.NTKClassifierGP(net, X, y[:10], prior_scale=1.0)
    with pytest.raises(ValueError, match="num_classes=5 but the model outputs 3 logits"):
        nks.NTKClassifierGP(net, X, y, prior_scale=1.0, num_classes=5)
    scalar = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1), nn.Flatten(0)).to(DT)
    with pytest.raises(ValueError, match="logits of shape \\(N, C\\) with C >= 2"):
        nks.NTKClassifierGP(scalar, X, torch.zeros(30, dtype=torch.long), prior_scale=1.0)
    one = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    with pytest.raises(ValueError, match="C >= 2"):
        nks.NTKClassifierGP(one, X, torch.zeros(30, dtype=torch.long), prior_scale=1.0)
    with pytest.raises(ValueError, match="prior_scale"):
        nks.NTKClassifierGP(net, X, y, prior_scale=0.0)
    clf = nks.NTKClassifierGP(net, X, y.double(), prior_scale=1.0)  # integral floats are labels
    with pytest.raises(ValueError, match="link"):
        clf.predict(Xt, link="logit")
    with pytest.raises(ValueError, match="per-sample shape"):
        clf.predict_logits(torch.randn(4, 3, dtype=DT))
