"""The kernel-only GP layer, pathwise samples and the Laplace evidence against dense references.

References are independent of the library: explicit kernels and Jacobians
(``tests.cases.reference_jacobian``), ``torch.linalg`` solves, eigendecompositions and
log-determinants, all in float64.

Tolerances:
* the kernel layer on an explicit kernel: 1e-8 relative (CG at tol 1e-12; exact SLQ probes);
* samples: S = 4,000. The sample mean is within 4 Monte Carlo standard errors
  ``sqrt(var / S)`` of the exact mean per entry; the median relative error of the sampled
  variances is below ``3 · √(2/S)`` (its expectation is ``0.67 · √(2/S)``); the sampled
  covariance of two test points is within 4 standard errors ``sqrt((v₁ v₂ + c²) / S)`` of the
  exact one;
* the Laplace evidence with exact probes: 1e-8 relative to the dense formula;
* fitted hyperparameters against a dense grid optimum (steps of 2% in log): within a factor
  1.25, so a 3x error in the fitted prior scale fails.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from linear_operator.operators import DenseLinearOperator
from torch import nn

from ntkscale.gp import NTKGP, HyperparameterWarning, KernelGP
from ntkscale.solvers import LanczosBasis, StochasticLogdet

from .cases import reference_jacobian

DT = torch.float64


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def dense():
    """An explicit kernel from random features: K = ΦΦᵀ (n = 50), a cross-kernel (m = 9)."""
    g = torch.Generator().manual_seed(0)
    Phi = torch.randn(50, 30, dtype=DT, generator=g) * torch.logspace(0, -2, 30, dtype=DT)
    Phis = torch.randn(9, 30, dtype=DT, generator=g) * torch.logspace(0, -2, 30, dtype=DT)
    r = torch.randn(50, dtype=DT, generator=g)
    return {"K": Phi @ Phi.T, "Ks": Phis @ Phi.T, "kss": (Phis * Phis).sum(1), "r": r, "W": 7.5}


def _dense_reference(d, noise, s2):
    n = d["K"].shape[0]
    lam = noise / s2
    A = d["K"] + lam * torch.eye(n, dtype=DT)
    mean = d["Ks"] @ torch.linalg.solve(A, d["r"])
    var = s2 * (d["kss"] - (d["Ks"] * torch.linalg.solve(A, d["Ks"].T).T).sum(1))
    cov = s2 * d["K"] + noise * torch.eye(n, dtype=DT)
    lml_gp = (-0.5 * d["r"] @ torch.linalg.solve(cov, d["r"]) - 0.5 * torch.logdet(cov)
              - 0.5 * n * math.log(2 * math.pi)).item()
    loglik = -0.5 * d["r"].square().sum() / noise - 0.5 * n * math.log(2 * math.pi * noise)
    ratio = torch.logdet(torch.eye(n, dtype=DT) + d["K"] * s2 / noise)
    lml_laplace = (loglik - 0.5 * (ratio + d["W"] / s2)).item()
    return mean, var, lml_gp, lml_laplace


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_kernel_gp_on_an_explicit_kernel_equals_linalg(dense, solver):
    noise, s2 = 0.02, 1.5
    post = KernelGP(DenseLinearOperator(dense["K"]), dense["r"], noise, s2, tol=1e-12, num_probes=50,
                    num_iter=50, weight_norm_sq=dense["W"], exact_solver=solver, rank=10)
    Ksx = DenseLinearOperator(dense["Ks"])
    mean, var, lml_gp, lml_laplace = _dense_reference(dense, noise, s2)
    assert _rel(post.mean(Ksx), mean) < 1e-8
    assert _rel(post.variance(Ksx, dense["kss"]), var) < 1e-8
    # full-rank Lanczos factor: exact
    assert _rel(post.variance(Ksx, dense["kss"], mode="fast", fast_rank=50), var) < 1e-8
    assert abs(post.log_marginal_likelihood(kind="gp") - lml_gp) < 1e-8 * abs(lml_gp)
    assert abs(post.log_marginal_likelihood() - lml_laplace) < 1e-8 * abs(lml_laplace)
    # other hyperparameters from the same Lanczos runs
    _, _, g2, l2 = _dense_reference(dense, 0.3, 0.2)
    assert abs(post.log_marginal_likelihood(0.3, 0.2, kind="gp") - g2) < 1e-8 * abs(g2)
    assert abs(post.log_marginal_likelihood(0.3, 0.2, kind="laplace") - l2) < 1e-8 * abs(l2)


def test_kernel_gp_pathwise_update_equals_conditioning(dense):
    """Matheron's rule with given prior draws: f* − K*X (K + λI)⁻¹ (f_X + ε), against linalg."""
    post = KernelGP(dense["K"], dense["r"], 0.05, 2.0, tol=1e-12)
    g = torch.Generator().manual_seed(1)
    fx, fs, eps = (torch.randn(k, 5, dtype=DT, generator=g) for k in (50, 9, 50))
    out = post.pathwise_update(DenseLinearOperator(dense["Ks"]), fx, fs, eps)
    A = dense["K"] + 0.025 * torch.eye(50, dtype=DT)
    assert _rel(out, fs - dense["Ks"] @ torch.linalg.solve(A, fx + eps)) < 1e-9
    with pytest.raises(ValueError, match=r"prior_test must have shape \(m, S\) = \(9, 5\)"):
        post.pathwise_update(DenseLinearOperator(dense["Ks"]), fx, fs[:, :4], eps)


def test_shift_invariant_krylov_objects(dense):
    K = DenseLinearOperator(dense["K"])
    basis = LanczosBasis(K, num_iter=50)
    for lam in (1e-3, 0.1, 3.0):
        R = basis.inverse_root(lam)
        ref = torch.linalg.inv(dense["K"] + lam * torch.eye(50, dtype=DT))
        assert _rel(R @ R.T, ref) < 1e-8
    assert basis.inverse_root(0.1, rank=20).shape == (50, 20)
    with pytest.raises(ValueError, match="exceeds the 50 Lanczos steps"):
        basis.inverse_root(0.1, rank=60)
    slq = StochasticLogdet(K, num_probes=50)
    for lam in (1e-3, 0.1):
        est = slq(lam)
        assert est.exact and est.stderr == 0.0
        ref = torch.logdet(dense["K"] + lam * torch.eye(50, dtype=DT)).item()
        assert abs(est.value - ref) < 1e-8 * abs(ref)


def test_float32_lanczos_basis_reaches_the_rank_asked():
    """A float32 kernel whose spectrum spans 8 decades, λ = 1e-6 · λ_max: the basis is float64
    and keeps every Ritz value (a float32 basis dropped those below m · eps32 · λ_max ≈ 2e-5)."""
    g = torch.Generator().manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=DT, generator=g))
    K64 = (Q * torch.logspace(0, -8, 300, dtype=DT)) @ Q.T
    K32 = DenseLinearOperator(K64.float())
    basis = LanczosBasis(K32, num_iter=150)
    assert basis.dtype == torch.float64 and basis.steps == 150
    R = basis.inverse_root(1e-6, 150)
    assert R.shape == (300, 150)
    # the factor acts like (K + λI)⁻¹ on K's range: the projection R Rᵀ (K + λI) Q_r ≈ Q_r
    post = KernelGP(K32, torch.ones(300), 1e-6, 1.0, fast_rank=150)
    Ksx = DenseLinearOperator(K64[:20].float())
    post.variance(Ksx, K64.diagonal()[:20].float(), mode="fast")
    R2 = post.fast_factor()
    assert R2.shape[1] == 150


# -- pathwise samples of NTKGP ---------------------------------------------------------------------


def _mlp(d_in, width, C):
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, C)).to(DT)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = _mlp(4, 24, 2)
    X = torch.randn(30, 4, dtype=DT)
    Xt = torch.randn(7, 4, dtype=DT)
    y = torch.stack([torch.sin(X[:, 0]), torch.cos(X[:, 1]) * X[:, 2]], dim=1) + 0.1 * torch.randn(30, 2, dtype=DT)
    J, Js = reference_jacobian(model, X), reference_jacobian(model, Xt)
    with torch.no_grad():
        f, fs = model(X), model(Xt)
    return {"model": model, "X": X, "Xt": Xt, "y": y, "J": J, "Js": Js, "f": f, "fs": fs}


def test_samples_match_the_exact_posterior(small):
    noise, s2, S = 0.05, 2.0, 4000
    gp = NTKGP(small["model"], small["X"], small["y"], noise=noise, prior_scale=s2, backend="structured",
               tol=1e-12, block_size=1000, exact_solver="cg")
    samples = gp.sample(small["Xt"], num_samples=S, seed=0)
    assert samples.shape == (S, 7, 2)
    info = gp.info
    assert info.num_samples == S and info.variance_relative_error == pytest.approx(math.sqrt(2 / S))
    assert info.solver == "cg" and info.converged and len(info.solve_iterations) == 1  # one batched solve
    # the same draws conditioned through the Cholesky factor (what "auto" picks at this size)
    gp.exact_solver = "auto"
    direct = gp.sample(small["Xt"], num_samples=50, seed=0)
    assert gp.info.solver == "cholesky"
    gp.exact_solver = "cg"
    assert _rel(gp.sample(small["Xt"], num_samples=50, seed=0), direct) < 1e-8
    # dense reference posterior (explicit Jacobians)
    J, Js = small["J"], small["Js"]
    A = J @ J.T + noise / s2 * torch.eye(60, dtype=DT)
    r = (small["y"] - small["f"]).reshape(-1)
    mean = small["fs"].reshape(-1) + Js @ J.T @ torch.linalg.solve(A, r)
    cov = s2 * (Js @ Js.T - Js @ J.T @ torch.linalg.solve(A, J @ Js.T))
    var = cov.diagonal()
    flat = samples.reshape(S, -1)
    assert bool(((flat.mean(0) - mean).abs() <= 4 * (var / S).sqrt()).all())
    svar = (flat - flat.mean(0)).square().sum(0) / (S - 1)
    assert ((svar - var).abs() / var).median().item() < 3 * math.sqrt(2 / S)
    # joint: covariance of output 0 at test points 0 and 1 (rows 0 and 2)
    c = ((flat[:, 0] - flat[:, 0].mean()) * (flat[:, 2] - flat[:, 2].mean())).sum().item() / (S - 1)
    sd = math.sqrt((var[0] * var[2] + cov[0, 2] ** 2).item() / S)
    assert abs(c - cov[0, 2].item()) < 4 * sd, (c, cov[0, 2].item(), sd)
    # predict(mode="sample"): the exact mean, variances from the samples
    m2, v2 = gp.predict(small["Xt"], mode="sample", num_samples=S, seed=0)
    assert _rel(m2.reshape(-1), mean) < 1e-8
    assert ((v2.reshape(-1) - var).abs() / var).median().item() < 3 * math.sqrt(2 / S)
    # seeds: reproducible, and fresh draws without one
    assert torch.equal(gp.sample(small["Xt"], 5, seed=3), gp.sample(small["Xt"], 5, seed=3))
    assert not torch.equal(gp.sample(small["Xt"], 5), gp.sample(small["Xt"], 5))


def test_with_data_for_a_growing_data_set(small):
    gp = NTKGP(small["model"], small["X"][:20], small["y"][:20], noise=0.05, backend="structured", tol=1e-12)
    grown = gp.with_data(small["X"], small["y"])
    ref = NTKGP(small["model"], small["X"], small["y"], noise=0.05, backend="structured", tol=1e-12)
    assert grown.num_train == 30 and grown.noise == gp.noise
    assert _rel(grown.predict(small["Xt"])[1], ref.predict(small["Xt"])[1]) < 1e-10
    assert grown.sample(small["Xt"], 3, seed=1).shape == (3, 7, 2)


def test_with_data_rebuilds_a_preconditioner_object_for_the_new_data(small):
    """A ready preconditioner belongs to the old kernel: the grown GP builds its kind anew."""
    from ntkscale.solvers import build_preconditioner

    gp = NTKGP(small["model"], small["X"][:20], small["y"][:20], noise=0.05, backend="structured", tol=1e-12)
    P = build_preconditioner(gp.K, "nystrom", noise=0.05, rank=8)
    gp = NTKGP(small["model"], small["X"][:20], small["y"][:20], noise=0.05, backend="structured", tol=1e-12,
               preconditioner=P)
    grown = gp.with_data(small["X"], small["y"])
    ref = NTKGP(small["model"], small["X"], small["y"], noise=0.05, backend="structured", tol=1e-12)
    assert _rel(grown.predict(small["Xt"])[1], ref.predict(small["Xt"])[1]) < 1e-10

    class Custom:  # an object with .apply: nothing to rebuild it from
        def apply(self, R):
            return R

    custom = NTKGP(small["model"], small["X"][:20], small["y"][:20], noise=0.05, backend="structured",
                   preconditioner=Custom())
    with pytest.raises(ValueError, match="cannot rebuild the preconditioner object Custom"):
        custom.with_data(small["X"], small["y"])


# -- the Laplace evidence ---------------------------------------------------------------------------


def test_laplace_evidence_matches_the_dense_formula(small):
    """log N(r; 0, σ²I) − ½ [log det(I_P + (s²/σ²) JᵀJ) + ‖θ*‖²/s²], with the log-det taken in
    parameter space (Sylvester's identity is what the library relies on, not the reference)."""
    gp = NTKGP(small["model"], small["X"], small["y"], noise=0.1, backend="structured", num_probes=60, num_iter=60)
    J = small["J"]
    P = J.shape[1]
    r = (small["y"] - small["f"]).reshape(-1)
    W = sum(p.detach().square().sum() for p in small["model"].parameters()).item()
    assert gp.weight_norm_sq == pytest.approx(W, rel=1e-12)
    for noise, s2 in [(0.1, 1.0), (0.01, 0.05), (1.0, 10.0)]:
        loglik = -0.5 * r.square().sum() / noise - 0.5 * 60 * math.log(2 * math.pi * noise)
        ratio = torch.logdet(torch.eye(P, dtype=DT) + s2 / noise * J.T @ J)
        ref = (loglik - 0.5 * (ratio + W / s2)).item()
        value, info = gp.log_marginal_likelihood(noise, s2, return_info=True)
        assert info.kind == "laplace" and info.logdet_stderr == 0.0
        assert abs(value - ref) < 1e-8 * abs(ref), (noise, s2, value, ref)
        assert info["scatter"] == pytest.approx(W / s2)


def _dense_grid_optimum(ev, J, r, W, kind):
    """The maximizer of the dense evidence on a log grid with 2% steps (eigendecomposition once)."""
    e, U = torch.linalg.eigh(J @ J.T)
    e = e.clamp_min(0)
    z2 = (U.T @ r).square()
    n = r.numel()
    ls2 = torch.arange(-12.0, 6.0, 0.02, dtype=DT)
    lsig = torch.arange(-14.0, 4.0, 0.02, dtype=DT)
    s2, sig = ls2.exp()[:, None, None], lsig.exp()[None, :, None]
    if kind == "gp":
        d = s2 * e + sig
        val = -0.5 * (z2 / d).sum(-1) - 0.5 * torch.log(d).sum(-1)
    else:
        val = (-0.5 * r.square().sum() / sig[..., 0] - 0.5 * n * torch.log(sig[..., 0])
               - 0.5 * torch.log1p(s2 * e / sig).sum(-1) - 0.5 * W / s2[..., 0])
    i = int(val.argmax())
    return lsig[i % lsig.numel()].exp().item(), ls2[i // lsig.numel()].exp().item()


@pytest.mark.parametrize("kind", ["laplace", "gp"])
def test_fitted_hyperparameters_are_the_dense_optimum(small, kind):
    gp = NTKGP(small["model"], small["X"], small["y"], noise=0.5, prior_scale=0.3, backend="structured",
               tol=1e-12, num_probes=60, num_iter=60)
    noise, s2 = gp.fit_hyperparameters(kind=kind)
    r = (small["y"] - small["f"]).reshape(-1)
    ref_noise, ref_s2 = _dense_grid_optimum(None, small["J"], r, gp.weight_norm_sq, kind)
    assert gp.fit_info.kind == kind and not gp.fit_info.on_boundary
    assert 1 / 1.25 < s2 / ref_s2 < 1.25, (s2, ref_s2)
    assert 1 / 1.25 < noise / ref_noise < 1.25, (noise, ref_noise)


def test_fit_warns_on_the_boundary(small):
    gp = NTKGP(small["model"], small["X"], small["y"], noise=0.5, backend="structured", num_probes=60, num_iter=60)
    with pytest.warns(HyperparameterWarning, match="boundary of the search range for prior_scale"):
        gp.fit_hyperparameters(prior_scale_range=(1e-3, 1e-2))
    assert gp.fit_info.on_boundary == ["prior_scale"]


def test_laplace_fit_keeps_uncertainty_between_clusters():
    """sin(3x) on 64 points in two clusters, MLP 1-256-256-1 trained with Adam: the GP evidence
    drives the prior scale to its floor and flattens the variance; the Laplace evidence keeps
    the standard deviation in the gap well above its value at the data."""
    torch.manual_seed(0)
    X = torch.cat([torch.rand(32, 1) * 0.8 - 1.5, torch.rand(32, 1) * 0.8 + 0.7]).to(DT)
    y = torch.sin(3 * X) + 0.05 * torch.randn(64, 1, dtype=DT)
    model = nn.Sequential(nn.Linear(1, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1)).to(DT)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(1500):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        opt.step()
    gp = NTKGP(model, X, y, noise=1e-2, backend="structured", num_probes=64, num_iter=64, tol=1e-10)
    gp.fit_hyperparameters()
    at_data = gp.predict(X)[1].sqrt().median().item()
    gap = gp.predict(torch.linspace(-0.5, 0.5, 11, dtype=DT)[:, None])[1].sqrt().min().item()
    assert gap > 5 * at_data, (gap, at_data, gp.noise, gp.prior_scale)


# -- fixes -------------------------------------------------------------------------------------------


def test_one_predict_computes_the_training_factors_once(small, caplog):
    """Slicing the cross-kernel into blocks of test columns shares its training-side factors."""
    gp = NTKGP(small["model"], small["X"], small["y"], noise=0.05, backend="structured", block_size=2,
               exact_solver="cg", tol=1e-10)
    with caplog.at_level(logging.INFO, logger="ntkscale"):
        gp.predict(small["Xt"])  # 7 blocks of 2 test columns
    train = [r for r in caplog.records if "factors of 30 samples" in r.getMessage()]
    # the training operator's and the cross-kernel's, once each (not once per block)
    assert len(train) <= 2, [r.getMessage() for r in train]


def test_exact_cost_estimate_after_a_fit_uses_a_cold_solve(small):
    gp = NTKGP(small["model"], small["X"], small["y"], noise=0.05, backend="structured", tol=1e-10)
    gp.representer_weights()
    cold = gp.solve_info.iterations
    gp.fit_hyperparameters(kind="gp")  # warm-started solves: not a cost estimate
    assert cold > 0 and gp.posterior.iterations_estimate() >= cold


@pytest.mark.parametrize("backend", ["autodiff", "structured", "dense"])
def test_operator_jvp_equals_the_jacobian(small, backend):
    import ntkscale as nks

    K = nks.NTKOperator(small["model"], small["Xt"], backend=backend)
    U = torch.randn(small["Js"].shape[1], 3, dtype=DT)
    assert _rel(K.jvp(U), small["Js"] @ U) < 1e-10
    assert _rel(K.jvp(U[:, 0]), small["Js"] @ U[:, 0]) < 1e-10
    with pytest.raises(ValueError, match=r"tangents must have shape \(\d+,\) or \(\d+, k\)"):
        K.jvp(U[:-1])
