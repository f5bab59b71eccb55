"""NTKGP (NTK-GP / linearized-Laplace regression) and the GGN kernel against dense references.

References are independent of the library: the Jacobian is built one (sample, output) row at a
time with ``torch.autograd.grad`` (``tests.cases.reference_jacobian``), the kernel is ``J Jᵀ`` and
every solve is a dense Cholesky, all in float64.

Tolerances:
* posterior mean/variance and the log marginal likelihood with exact SLQ probes: 1e-6 relative
  (CG at tol 1e-12; with ``num_probes ≥ N C`` the probes are the unit vectors and ``N C``
  Lanczos steps make the quadrature exact, so only round-off remains);
* the log marginal likelihood with 30 Rademacher probes: within 4 standard errors of the SLQ
  estimate (the error is the Hutchinson estimator's, which the reported standard error measures);
* kernel regression equivalence: 1e-6 relative — momentum GD is run until its iterates stop
  moving (the error left is ~1e-10), and the ridge 1e-8 shifts the interpolant by
  ~1e-8 / λ_min(Θ) ≈ 1e-8 here;
* fast (Lanczos / LOVE) variances: median relative error < 1e-2 at rank 50 of N C = 60 with
  λ = σ²/s² ≈ 5% of mean(diag Θ) (measured 3.3e-3). The error is set by how many eigenvalues of
  Θ above ≈ λ the rank misses (on this small problem the spectrum is flat: 1e-2 needs rank ≈ 45,
  and at rank 20 the median error is 0.18), so the bound is specific to this problem. The fast
  variances must never be below the exact ones, and are exact at full rank.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp

import ntkscale.gp.inference as inference
import ntkscale.solvers.krylov as krylov
from ntkscale.gp import NTKGP, NegativeVarianceWarning, ggn_kernel
from ntkscale.solvers import build_preconditioner

from .cases import reference_jacobian

DT = torch.float64


def _mlp(d_in: int, width: int, C: int, act=nn.Tanh, scalar: bool = False) -> nn.Module:
    layers = [nn.Linear(d_in, width), act(), nn.Linear(width, width), act(), nn.Linear(width, C)]
    if scalar:
        layers.append(_Squeeze())
    return nn.Sequential(*layers).to(DT)


class _Squeeze(nn.Module):
    def forward(self, x):
        return x.squeeze(-1)


def _train(model: nn.Module, X, y, steps: int = 30, lr: float = 1e-2) -> nn.Module:
    """A few Adam steps, so that the GP is built around trained (not initial) weights."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        out = model(X).reshape(y.shape)
        ((out - y) ** 2).mean().backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def problem():
    """C = 2 outputs, N = 30 training points (N C = 60), M = 7 test points, dense references."""
    torch.manual_seed(0)
    model = _mlp(4, 24, 2)
    X = torch.randn(30, 4, dtype=DT)
    Xt = torch.randn(7, 4, dtype=DT)
    y = torch.stack([torch.sin(X[:, 0]), torch.cos(X[:, 1]) * X[:, 2]], dim=1) + 0.1 * torch.randn(30, 2, dtype=DT)
    _train(model, X, y)
    J = reference_jacobian(model, X)  # (60, P)
    Js = reference_jacobian(model, Xt)  # (14, P)
    with torch.no_grad():
        f, fs = model(X), model(Xt)
    return {"model": model, "X": X, "Xt": Xt, "y": y, "K": J @ J.T, "Ks": Js @ J.T, "Kss": Js @ Js.T, "f": f, "fs": fs}


def _dense_posterior(p, noise, s2):
    """Dense Cholesky reference: mean, variance (M, C) and log marginal likelihood."""
    n = p["K"].shape[0]
    M, C = p["fs"].shape
    lam = noise / s2
    L = torch.linalg.cholesky(p["K"] + lam * torch.eye(n, dtype=DT))
    r = (p["y"] - p["f"]).reshape(-1, 1)
    alpha = torch.cholesky_solve(r, L)
    mean = p["fs"] + (p["Ks"] @ alpha).reshape(M, C)
    V = torch.cholesky_solve(p["Ks"].T, L)  # (n, M C)
    var = s2 * (p["Kss"].diagonal() - (p["Ks"] * V.T).sum(1))
    cov = s2 * p["K"] + noise * torch.eye(n, dtype=DT)
    Lc = torch.linalg.cholesky(cov)
    quad = (torch.cholesky_solve(r, Lc) * r).sum()
    lml = -0.5 * quad - torch.log(Lc.diagonal()).sum() - 0.5 * n * math.log(2 * math.pi)
    return mean, var.reshape(M, C), lml.item()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# -- posterior and marginal likelihood against dense Cholesky -------------------------------------


@pytest.mark.parametrize("exact_solver", ["cg", "cholesky"])
@pytest.mark.parametrize("backend", ["dense", "structured"])
def test_posterior_matches_dense_cholesky(problem, backend, exact_solver):
    noise, s2 = 0.05, 2.0
    gp = NTKGP(problem["model"], problem["X"], problem["y"], noise=noise, prior_scale=s2, backend=backend,
               tol=1e-12, rank=20, exact_solver=exact_solver)
    mean, var = gp.predict(problem["Xt"])
    assert gp.info.solver == exact_solver
    ref_mean, ref_var, _ = _dense_posterior(problem, noise, s2)
    assert mean.shape == var.shape == (7, 2)
    assert _rel(mean, ref_mean) < 1e-6
    assert _rel(var, ref_var) < 1e-6
    # the training solve is the kernel-regression solve
    r = (problem["y"] - problem["f"]).reshape(-1)
    alpha = torch.linalg.solve(problem["K"] + noise / s2 * torch.eye(60, dtype=DT), r)
    assert _rel(gp.representer_weights().reshape(-1), alpha) < 1e-6
    if exact_solver == "cg":
        assert gp.solve_info.converged and gp.info.converged
    else:  # the factor solved the training system too: no CG ran
        assert gp.solve_info is None and gp.info.factor.n == 60


def test_log_marginal_likelihood_matches_dense_with_exact_probes(problem):
    noise, s2 = 0.05, 2.0
    gp = NTKGP(problem["model"], problem["X"], problem["y"], noise=noise, prior_scale=s2, backend="dense",
               tol=1e-12, num_probes=60, num_iter=60)
    _, _, ref = _dense_posterior(problem, noise, s2)
    value, info = gp.log_marginal_likelihood(kind="gp", return_info=True)
    assert info["logdet_stderr"] == 0.0
    assert abs(value - ref) / abs(ref) < 1e-6
    # other hyperparameters reuse the one Lanczos run (shift invariance) and still match
    _, _, ref2 = _dense_posterior(problem, 0.3, 0.5)
    assert abs(gp.log_marginal_likelihood(noise=0.3, prior_scale=0.5, kind="gp") - ref2) / abs(ref2) < 1e-6


def test_log_marginal_likelihood_slq_within_standard_error(problem):
    noise, s2 = 0.05, 2.0
    gp = NTKGP(problem["model"], problem["X"], problem["y"], noise=noise, prior_scale=s2, backend="dense",
               tol=1e-12, num_probes=30)
    _, _, ref = _dense_posterior(problem, noise, s2)
    value, info = gp.log_marginal_likelihood(kind="gp", return_info=True)
    # LML = -logdet/2 + exact terms: its error is half the SLQ log-det error
    assert info["logdet_stderr"] > 0
    assert abs(value - ref) <= 0.5 * 4 * info["logdet_stderr"]


def test_scalar_output_model():
    torch.manual_seed(1)
    model = _mlp(3, 16, 1, scalar=True)
    X, Xt = torch.randn(20, 3, dtype=DT), torch.randn(5, 3, dtype=DT)
    y = torch.sin(X[:, 0])  # (N,) for C = 1
    noise = 0.1
    gp = NTKGP(model, X, y, noise=noise, backend="dense", tol=1e-12)
    mean, var = gp.predict(Xt)
    assert mean.shape == var.shape == (5, 1)
    J, Js = reference_jacobian(model, X), reference_jacobian(model, Xt)
    A = J @ J.T + noise * torch.eye(20, dtype=DT)
    with torch.no_grad():
        ref_mean = model(Xt) + Js @ J.T @ torch.linalg.solve(A, y - model(X))
    ref_var = (Js * Js).sum(1) - ((Js @ J.T) * torch.linalg.solve(A, J @ Js.T).T).sum(1)
    assert _rel(mean[:, 0], ref_mean) < 1e-6
    assert _rel(var[:, 0], ref_var) < 1e-6
    assert gp.predict(Xt, return_var=False).shape == (5, 1)


# -- kernel regression equivalence --------------------------------------------------------------


def test_linearized_network_trained_by_gd_predicts_the_gp_mean():
    """GD (heavy-ball momentum) on the MSE of f_lin(θ) = f(θ*) + J(θ*)(θ − θ*) from θ = θ*
    converges to the minimum-norm interpolant, whose predictions are the NTK-GP mean at
    noise → 0."""
    torch.manual_seed(2)
    model = _mlp(16, 48, 1, act=nn.GELU)
    X = torch.randn(20, 16, dtype=DT)
    Xt = torch.randn(6, 16, dtype=DT)
    y = torch.tanh(X[:, :1] + X[:, 1:2] * X[:, 2:3])
    _train(model, X, y)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def f(params, x):
        return functional_call(model, params, (x,))

    with torch.no_grad():
        f0, f0t = f(theta, X), f(theta, Xt)

    def f_lin(delta, x, fx):
        return fx + jvp(lambda p: f(p, x), (theta,), (delta,))[1]

    def loss(delta):
        return 0.5 * (f_lin(delta, X, f0) - y).square().sum()

    # step sizes from the spectrum of Θ = JJᵀ (the Hessian of the loss on J's row space)
    J = reference_jacobian(model, X)
    ev = torch.linalg.eigvalsh(J @ J.T)
    L, mu = ev[-1].item(), ev[0].item()
    step = 4 / (math.sqrt(L) + math.sqrt(mu)) ** 2
    beta = ((math.sqrt(L) - math.sqrt(mu)) / (math.sqrt(L) + math.sqrt(mu))) ** 2
    g = grad(loss)
    delta = {n: torch.zeros_like(p) for n, p in theta.items()}
    prev = {n: v.clone() for n, v in delta.items()}
    for it in range(3000):
        gr = g(delta)
        delta, prev = {n: delta[n] - step * gr[n] + beta * (delta[n] - prev[n]) for n in delta}, delta
        if it % 50 == 0 and loss(delta).item() < 1e-24:
            break
    assert loss(delta).item() < 1e-18, f"GD on the linearized network did not converge (κ = {L / mu:.0f})"
    pred_gd = f_lin(delta, Xt, f0t)

    gp = NTKGP(model, X, y, noise=1e-8, backend="structured", tol=1e-12)
    pred_gp = gp.predict(Xt, return_var=False)
    assert _rel(pred_gp, pred_gd) < 1e-6


# -- fast variances, clamping ------------------------------------------------------------------


def test_fast_variances_close_to_exact(problem):
    gp = NTKGP(problem["model"], problem["X"], problem["y"], noise=0.5, backend="dense", tol=1e-12, fast_rank=50)
    err = gp.variance_error(problem["Xt"])
    assert err["fast_rank"] == 50
    assert err["median_relative_error"] < 1e-2, err["median_relative_error"]
    # a Krylov projection only loses part of the subtracted term: never below the exact variances
    scale = err["exact"].abs().max()
    assert bool((err["fast"] >= err["exact"] - 1e-10 * scale).all())
    # and at full rank the Lanczos cache is exact
    full = gp.variance_error(problem["Xt"], fast_rank=60)
    assert full["max_relative_error"] < 1e-6


def test_fast_variances_explicit_cross_blocks_equal_products(problem):
    """With the factor backends the fast path may densify row blocks of Θ*X instead of taking
    one product per column of the Lanczos cache: both give the same variances."""
    gp = NTKGP(problem["model"], problem["X"], problem["y"], noise=0.5, backend="structured", fast_rank=40,
               memory_budget=2000 * 8)  # row blocks of 2000 * 8 / (2 * 60 * 8) -> 16 rows: several blocks
    post = gp.posterior
    Ksx = gp.kernel(problem["Xt"], problem["X"])
    R = post.fast_factor(rank=40)
    out = {route: post.fast_quadratic(Ksx, R, route=route) for route in ("blocks", "products")}
    assert _rel(out["blocks"], out["products"]) < 1e-10
    # the estimate: 40 columns through P ≈ 1,400 parameters vs a 14 x 60 cross-kernel
    assert post.explicit_blocks_cheaper(Ksx, 40)
    # (with one column the choice rests on the per-product overhead, which dominates this tiny
    # kernel; the estimate is monotone in the number of columns)
    assert post.explicit_blocks_cheaper(Ksx, 1) <= post.explicit_blocks_cheaper(Ksx, 40)


def test_fast_cache_serves_every_noise_level_and_lower_rank(problem, monkeypatch):
    """One Lanczos basis of Θ (shift-invariant, prefix-consistent) gives the cache of any (λ, r ≤ m)."""
    calls = []
    real = krylov.LanczosBasis.__init__
    monkeypatch.setattr(krylov.LanczosBasis, "__init__",
                        lambda self, *a, **k: calls.append(k["num_iter"]) or real(self, *a, **k))
    gp = NTKGP(problem["model"], problem["X"], problem["y"], noise=0.5, backend="dense", fast_rank=40)
    gp.predict(problem["Xt"], mode="fast")
    gp.noise = 0.05
    gp.fast_rank = 20
    _, var = gp.predict(problem["Xt"], mode="fast")
    assert calls == [40]
    fresh = NTKGP(problem["model"], problem["X"], problem["y"], noise=0.05, backend="dense", fast_rank=20)
    assert _rel(var, fresh.predict(problem["Xt"], mode="fast")[1]) < 1e-8


def test_negative_variances_are_clamped_with_a_warning(problem, monkeypatch):
    gp = NTKGP(problem["model"], problem["X"], problem["y"], noise=0.05, backend="dense", tol=1e-12,
               exact_solver="cg")
    exact = gp.posterior.exact_quadratic
    # round-off pushed 3 of the 14 subtracted terms above the prior variance
    def perturbed(Ksx, lam, info):
        q = exact(Ksx, lam, info)
        prior = gp.kernel(Ksx.X1).diagonal()
        q[:3] = prior[:3] * (1 + torch.tensor([1e-9, 1e-8, 1e-7], dtype=DT))
        return q

    monkeypatch.setattr(gp.posterior, "exact_quadratic", perturbed)
    msg = r"3 of 14 posterior variances came out negative \(most negative -"
    with pytest.warns(NegativeVarianceWarning, match=msg):
        _, var = gp.predict(problem["Xt"])
    assert bool((var >= 0).all())
    assert (var.reshape(-1)[:3] == 0).all()
    assert gp.info.clamped == 3 and gp.info.most_negative < 0


# -- hyperparameters -------------------------------------------------------------------------------


def test_fit_hyperparameters_recovers_the_noise_level():
    torch.manual_seed(3)
    model = _mlp(5, 32, 2)
    X = torch.randn(80, 5, dtype=DT)  # N C = 160
    J = reference_jacobian(model, X)
    K = J @ J.T
    n = K.shape[0]
    true_s2, true_noise = 1.0, 0.1 * K.diagonal().mean().item()
    cov = true_s2 * K + true_noise * torch.eye(n, dtype=DT)
    r = torch.linalg.cholesky(cov) @ torch.randn(n, dtype=DT)  # y − f(X) drawn from the prior
    with torch.no_grad():
        y = model(X) + r.reshape(80, 2)
    # y − f(X) is drawn from the GP prior centred at the network: the GP evidence is the model
    gp = NTKGP(model, X, y, noise=100 * true_noise, prior_scale=0.01, backend="dense", tol=1e-10)
    before = gp.log_marginal_likelihood(kind="gp")
    noise, s2 = gp.fit_hyperparameters(kind="gp")
    after = gp.log_marginal_likelihood(kind="gp")
    assert (gp.noise, gp.prior_scale) == (noise, s2)
    assert after > before + 1.0
    assert gp.fit_info["result"]["lml"] == pytest.approx(after)
    assert true_noise / 10 < noise < true_noise * 10, (noise, true_noise)
    assert true_s2 / 10 < s2 < true_s2 * 10, (s2, true_s2)
    # fitting only the noise with the prior scale fixed at its true value
    gp2 = NTKGP(model, X, y, noise=true_noise / 100, prior_scale=true_s2, backend="dense", tol=1e-10)
    noise2, s2b = gp2.fit_hyperparameters(optimize="noise", kind="gp")
    assert s2b == true_s2 and true_noise / 10 < noise2 < true_noise * 10


# -- bad inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise": -1.0}, r"noise .* must be a finite float >= 0, got -1.0"),
        ({"prior_scale": 0.0}, r"prior_scale .* must be a finite float > 0, got 0.0"),
        ({"prior_scale": -2.0}, r"prior_scale .* must be a finite float > 0, got -2.0"),
        ({"tol": 0.0}, r"tol .* must be a finite float > 0, got 0.0"),
        ({"tol": -1e-3}, r"tol .* must be a finite float > 0"),
        ({"y": "short"}, r"y must have shape \(30, 2\) \(N samples x C model outputs\), got \(29, 2\)"),
        ({"y": "flat"}, r"y must have shape \(30, 2\) .*got \(60,\)"),
        ({"y": "nan"}, r"y contains NaN or inf \(2 entries, first in sample 3\)"),
        ({"fast_rank": 0}, r"fast_rank must be an integer >= 1, got 0"),
    ],
)
def test_bad_inputs(problem, kwargs, match):
    args = {"noise": 0.1, "prior_scale": 1.0, "backend": "dense"}
    y = problem["y"]
    what = kwargs.pop("y", None)
    if what == "short":
        y = y[:-1]
    elif what == "flat":
        y = y.reshape(-1)
    elif what == "nan":
        y = y.clone()
        y[3, 0] = float("nan")
        y[5, 1] = float("inf")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        NTKGP(problem["model"], problem["X"], y, **args)


def test_bad_predict_and_fit_arguments(problem):
    gp = NTKGP(problem["model"], problem["X"], problem["y"], noise=0.1, backend="dense")
    with pytest.raises(ValueError, match="mode must be 'exact', 'fast' or 'sample', got 'approx'"):
        gp.predict(problem["Xt"], mode="approx")
    with pytest.raises(ValueError, match="noise .* got -0.5"):
        gp.log_marginal_likelihood(noise=-0.5)
    with pytest.raises(ValueError, match="optimize must name"):
        gp.fit_hyperparameters(optimize=("lengthscale",))
    with pytest.raises(ValueError, match="prior_scale"):
        gp.prior_scale = 0.0


# -- the iterative path, preconditioning, caching -------------------------------------------------


def test_iterative_path_runs_with_one_preconditioner(problem, monkeypatch):
    calls, built = [], []
    real_solve, real_build = inference.solve, inference.build_preconditioner

    def counting_solve(K, rhs, **kw):
        calls.append((rhs.shape, kw["preconditioner"]))
        return real_solve(K, rhs, **kw)

    def counting_build(*args, **kw):
        built.append(args[1])
        return real_build(*args, **kw)

    monkeypatch.setattr(inference, "solve", counting_solve)
    monkeypatch.setattr(inference, "build_preconditioner", counting_build)
    gp = NTKGP(problem["model"], problem["X"], problem["y"], noise=0.05, backend="dense", tol=1e-8,
               rank=10, block_size=4, exact_solver="cg")
    gp.predict(problem["Xt"])  # 7 test points x 2 outputs, 2 points per block: 4 blocks
    assert built == ["nystrom"]
    assert [c[0] for c in calls] == [torch.Size([60]), *[torch.Size([60, 4])] * 3, torch.Size([60, 2])]
    assert len({id(c[1]) for c in calls}) == 1  # the same preconditioner object everywhere
    gp.predict(problem["Xt"], return_var=False)  # the training solve is cached
    assert len(calls) == 5
    # ...per λ: a new noise level re-shifts the preconditioner instead of rebuilding it
    gp.noise = 0.5
    gp.predict(problem["Xt"], return_var=False)
    assert len(calls) == 6 and built == ["nystrom"]


def test_preconditioner_reduces_iterations():
    """N C = 200, σ² = 1e-3 · mean(diag Θ): plain CG needs 184 iterations to 1e-8, Nyström and
    pivoted Cholesky of rank 30 about 50 and 34 (measured); asserted: at least 3x fewer."""
    torch.manual_seed(4)
    model = _mlp(3, 32, 2)
    X = torch.randn(100, 3, dtype=DT)
    y = torch.randn(100, 2, dtype=DT)
    its = {}
    for pre in [None, "nystrom", "pivchol"]:
        gp = NTKGP(model, X, y, noise=1.0, backend="dense", preconditioner=pre, rank=30, tol=1e-8, max_iter=1000)
        gp.noise = 1e-3 * gp.K.diagonal().mean().item()
        gp.representer_weights()
        its[pre] = gp.solve_info.iterations
        assert gp.solve_info.converged
    assert its["nystrom"] * 3 <= its[None], its
    assert its["pivchol"] * 3 <= its[None], its


@pytest.mark.parametrize("name", ["nystrom", "pivchol"])
def test_reshifted_preconditioner_equals_a_rebuilt_one(problem, name):
    gp = NTKGP(problem["model"], problem["X"], problem["y"], noise=0.05, backend="dense", preconditioner=name, rank=15)
    P1 = gp.preconditioner(0.3)  # the first build: noise 0.3
    P2 = gp.preconditioner(2e-3)  # re-shifted
    ref = build_preconditioner(gp.K, name, noise=2e-3, rank=15)
    R = torch.randn(60, 3, dtype=DT)
    assert P2 is not P1
    assert torch.allclose(P2.apply(R), ref.apply(R), rtol=1e-9, atol=1e-12)


def test_default_preconditioner_rank_is_the_adaptive_one(problem):
    """Without ``rank`` the GP's Nyström preconditioner is the solver's adaptive one (the same
    sketch, the same rank as ``build_preconditioner(..., rank=None)``), reported in the info; an
    explicit rank is kept."""
    gp = NTKGP(problem["model"], problem["X"], problem["y"], noise=0.5, backend="dense", tol=1e-12, exact_solver="cg")
    assert gp.rank is None and gp.preconditioner_rank is None  # nothing built yet
    gp.predict(problem["Xt"])
    ref = build_preconditioner(gp.K, "nystrom", noise=gp.ridge, rank=None)
    assert ref.adaptive and gp.preconditioner_rank == ref.rank == gp.info.preconditioner_rank
    assert gp.preconditioner().stages == ref.stages
    fixed = NTKGP(problem["model"], problem["X"], problem["y"], noise=0.5, backend="dense", rank=7, exact_solver="cg")
    fixed.predict(problem["Xt"], return_var=False)
    assert fixed.preconditioner_rank == fixed.info.preconditioner_rank == 7
    assert fixed.with_data(problem["X"][:20], problem["y"][:20]).rank == 7


def test_gp_is_frozen_at_construction(problem):
    model = _mlp(4, 24, 2)
    model.load_state_dict(problem["model"].state_dict())
    gp = NTKGP(model, problem["X"], problem["y"], noise=0.05, backend="dense", tol=1e-12)
    mean1 = gp.predict(problem["Xt"], return_var=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    gp2 = NTKGP(problem["model"], problem["X"], problem["y"], noise=0.05, backend="dense", tol=1e-12)
    assert torch.allclose(gp.predict(problem["Xt"], return_var=False), mean1)
    assert torch.allclose(gp2.predict(problem["Xt"], return_var=False), mean1)


# -- GGN kernel ----------------------------------------------------------------------------------


def _sqrt_psd(A):
    """Symmetric PSD square root (unique: checked below by squaring it back)."""
    w, V = torch.linalg.eigh(A)
    return V @ torch.diag(w.clamp_min(0).sqrt()) @ V.T


def test_ggn_kernel_matches_dense(problem):
    import ntkscale as nks

    torch.manual_seed(5)
    probs = torch.softmax(torch.randn(30, 2, dtype=DT) * 2, dim=-1)
    K = nks.NTKOperator(problem["model"], problem["X"], backend="structured")
    G = ggn_kernel(K, probs)
    # dense reference: blockdiag(Λ_i^{1/2}) K blockdiag(Λ_i^{1/2})
    S = torch.zeros(60, 60, dtype=DT)
    for i, p in enumerate(probs):
        Lam = torch.diag(p) - torch.outer(p, p)
        Si = _sqrt_psd(Lam)
        assert torch.allclose(Si @ Si, Lam, atol=1e-12)
        S[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = Si
    ref = S @ problem["K"] @ S
    V = torch.randn(60, 3, dtype=DT)
    assert _rel(G @ V, ref @ V) < 1e-10
    assert _rel(G.to_dense(), ref) < 1e-10
    assert _rel(G.diagonal(), ref.diagonal()) < 1e-10
    idx = torch.tensor([3, 17, 40])
    assert _rel(G[idx, :].to_dense(), ref[idx, :]) < 1e-10
    # C = 3 with a plain dense kernel, diagonal over several chunks
    J = torch.randn(12, 5, dtype=DT)
    p3 = torch.softmax(torch.randn(4, 3, dtype=DT), dim=-1)
    G3 = ggn_kernel(J @ J.T, p3)
    G3.diag_chunk = 3
    S3 = torch.block_diag(*[_sqrt_psd(torch.diag(p) - torch.outer(p, p)) for p in p3])
    assert _rel(G3.diagonal(), (S3 @ J @ J.T @ S3).diagonal()) < 1e-10
    # the GGN kernel solves like any PSD operator
    x, info = nks.solvers.solve(G, torch.ones(60, dtype=DT), noise=1e-2, tol=1e-10)
    assert info.converged
    assert _rel(x, torch.linalg.solve(ref + 1e-2 * torch.eye(60, dtype=DT), torch.ones(60, dtype=DT))) < 1e-7


def test_ggn_kernel_bad_probs(problem):
    K = torch.eye(6, dtype=DT)
    with pytest.raises(ValueError, match=r"K must be square of size N\*C = 2\*2 = 4"):
        ggn_kernel(K, torch.full((2, 2), 0.5, dtype=DT))
    with pytest.raises(ValueError, match="rows summing to 1"):
        ggn_kernel(K, torch.full((2, 3), 0.5, dtype=DT))


def test_column_blocked_operator(problem):
    import ntkscale as nks
    from ntkscale.gp import ColumnBlockedOperator

    K = nks.NTKOperator(problem["model"], problem["X"], backend="dense")
    Kb = ColumnBlockedOperator(K, block=4)
    V = torch.randn(60, 10, dtype=DT)
    with nks.count_products() as seen:
        assert _rel(Kb @ V, problem["K"] @ V) < 1e-12
    assert seen.widths == [4, 4, 2]
    assert _rel(Kb.diagonal(), problem["K"].diagonal()) < 1e-12
    idx = torch.tensor([0, 7, 59])
    assert _rel(Kb[idx, :].to_dense(), problem["K"][idx, :]) < 1e-12
    x, info = nks.solvers.solve(Kb, torch.ones(60, 3, dtype=DT), noise=0.1, preconditioner="pivchol", rank=8, tol=1e-10)
    ref = torch.linalg.solve(problem["K"] + 0.1 * torch.eye(60, dtype=DT), torch.ones(60, 3, dtype=DT))
    assert info.converged and _rel(x, ref) < 1e-8
