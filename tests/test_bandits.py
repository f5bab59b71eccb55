"""The bandit study: environment and regret, the disjoint encoding, the linearized-Laplace
posterior against dense float64 Jacobians, the online evidence fit, and the study's sweep."""

from __future__ import annotations

import io
import math

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from ntkscale import NTKGP  # noqa: E402
from ntkscale.experiments import run_study  # noqa: E402
from ntkscale.experiments.bandits import (  # noqa: E402
    METHODS,
    STUDY,
    BanditEnvironment,
    NeuralBandit,
    OraclePolicy,
    QUICK,
    UniformPolicy,
    disjoint_encoding,
    fit_laplace_evidence,
    laplace_evidence,
    load_bandit_data,
    neuralucb_gamma,
    run_policy,
)


def _balanced(K=4, per_class=50, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat_interleave(per_class)
    return torch.randn(K * per_class, d, generator=gen), labels


# -- environment ------------------------------------------------------------------------------------
def test_oracle_has_zero_regret():
    X, y = load_bandit_data("wine")
    env = BanditEnvironment(X, y, 300, seed=1)  # longer than the data: the order cycles
    run = run_policy(env, OraclePolicy(env))
    assert run.cumulative_regret == [0.0] * 300
    assert run.arms == [env.label(t) for t in range(300)]


def test_uniform_policy_regret_close_to_one_minus_one_over_k():
    K, T = 4, 4000
    X, y = _balanced(K, per_class=50)
    env = BanditEnvironment(X, y, T, seed=3)
    run = run_policy(env, UniformPolicy(K, seed=5))
    per_round = run.cumulative_regret[-1] / T
    se = math.sqrt((1 - 1 / K) / K / T)  # Bernoulli(1 − 1/K) standard error of the mean
    assert abs(per_round - (1 - 1 / K)) < 4 * se


def test_cumulative_regret_never_decreases_and_counts_wrong_arms():
    X, y = _balanced(3, per_class=20)
    env = BanditEnvironment(X, y, 200, seed=0)
    run = run_policy(env, UniformPolicy(3, seed=1))
    c = torch.tensor(run.cumulative_regret)
    assert bool((c[1:] >= c[:-1]).all())
    wrong = sum(int(a != env.label(t)) for t, a in enumerate(run.arms))
    assert run.cumulative_regret[-1] == wrong


def test_environment_is_deterministic_and_checks_input():
    X, y = _balanced(3, per_class=10)
    a, b = BanditEnvironment(X, y, 25, seed=7), BanditEnvironment(X, y, 25, seed=7)
    assert torch.equal(a.order, b.order)
    assert sorted(a.order[:30].tolist()[:25]) != list(range(25))  # shuffled
    with pytest.raises(ValueError, match="labels has"):
        BanditEnvironment(X, y[:-1], 5)
    with pytest.raises(ValueError, match="num_rounds"):
        BanditEnvironment(X, y, 0)
    with pytest.raises(ValueError, match="arm must lie"):
        a.reward(0, 3)


def test_disjoint_encoding_puts_the_context_in_the_arm_block():
    K, d = 4, 3
    x = torch.arange(1.0, d + 1)
    F = disjoint_encoding(x, K)
    assert F.shape == (K, K * d)
    for a in range(K):
        expect = torch.zeros(K * d)
        expect[a * d:(a + 1) * d] = x
        assert torch.equal(F[a], expect)
    xs = torch.randn(5, d)
    Fb = disjoint_encoding(xs, K)
    assert Fb.shape == (5, K, K * d)
    assert torch.equal(Fb[2, 1, d:2 * d], xs[2]) and float(Fb[2, 1].abs().sum()) == float(xs[2].abs().sum())
    with pytest.raises(ValueError, match="num_arms"):
        disjoint_encoding(x, 0)


# -- the posterior ----------------------------------------------------------------------------------
def _tiny_config(**kw):
    cfg = dict(QUICK.__dict__)
    cfg.update(seed=0, train_steps=5, retrain_until=4, retrain_every=5, **kw)
    return cfg


def _jacobian(net, X):
    """Explicit float64 Jacobian (n, P) of a scalar-output network, row by row."""
    net = net.double()
    params = list(net.parameters())
    rows = []
    for x in X.double():
        g = torch.autograd.grad(net(x[None]).sum(), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


@pytest.mark.parametrize("method", ["laplace_ucb", "neuralucb_grid"])
def test_arm_variances_equal_the_dense_weight_space_posterior(method):
    X, y = load_bandit_data("wine")
    env = BanditEnvironment(X, y, 40, seed=2)
    pol = NeuralBandit(method, env.num_arms * env.dim, 8, env.num_rounds, _tiny_config(), seed=4, gamma=0.5)
    T = 13  # retrains after observations 1..4, 5, 10; rows 11..13 are appended to the factor
    for t in range(T):
        feats = env.arm_features(t)
        arm = pol.select(t, feats)
        pol.observe(t, arm, feats, env.reward(t, arm))
    assert pol.history.appended == 3 and pol.history.n == T
    feats = env.arm_features(T)
    mean, var = pol.predict(feats)

    import copy

    net = copy.deepcopy(pol.net)
    Jh, Ja = _jacobian(net, pol.X[:T]), _jacobian(net, feats)
    s2, sn2 = pol.history.prior_scale, pol.history.noise
    # weight space: Σ = (Jᵀ J / σ² + I / s²)⁻¹ (independent of the kernel-space algebra)
    P = Jh.shape[1]
    Sigma = torch.linalg.inv(Jh.T @ Jh / sn2 + torch.eye(P, dtype=torch.float64) / s2)
    var_ref = torch.einsum("kp,pq,kq->k", Ja, Sigma, Ja)
    with torch.no_grad():
        f_h, f_a = net(pol.X[:T].double()).reshape(-1), net(feats.double()).reshape(-1)
    mean_ref = f_a + Ja @ Sigma @ Jh.T @ (pol.y[:T].double() - f_h) / sn2
    torch.testing.assert_close(var, var_ref, rtol=1e-7, atol=1e-10)
    # the network's outputs f(x) are evaluated in float32 (the kernels in float64): ~1e-7 relative
    torch.testing.assert_close(mean, mean_ref, rtol=1e-5, atol=1e-6)
    # the variances went through PCG preconditioned by the grown Cholesky factor: one iteration
    from linear_operator.operators import DenseLinearOperator

    from ntkscale.gp import PredictInfo

    post, info = pol.history.posterior(), PredictInfo(mode="exact")
    Ksx = DenseLinearOperator((Ja @ Jh.T).detach())
    v2 = post.variance(Ksx, (Ja * Ja).sum(1), mode="exact", solver="cg", info=info)
    torch.testing.assert_close(v2, var_ref, rtol=1e-7, atol=1e-10)
    assert info.solver == "cg" and info.converged and max(info.solve_iterations) <= 2
    if method == "neuralucb_grid":  # σ² = 1, s² = 1/λ: the variance is gᵀ Z⁻¹ g with Z = λI + Σ g gᵀ
        lam = pol.cfg["ridge"]
        Zinv = torch.linalg.inv(lam * torch.eye(P, dtype=torch.float64) + Jh.T @ Jh)
        torch.testing.assert_close(var, torch.einsum("kp,pq,kq->k", Ja, Zinv, Ja), rtol=1e-7, atol=1e-10)
        ld = torch.linalg.slogdet(torch.eye(T, dtype=torch.float64) + Jh @ Jh.T / lam)[1]
        assert pol.history.log_det_ratio() == pytest.approx(float(ld), rel=1e-9)


def test_laplace_evidence_matches_the_library_and_the_online_fit_improves_it():
    torch.manual_seed(0)
    X, y = load_bandit_data("wine")
    env = BanditEnvironment(X, y, 30, seed=0)
    pol = NeuralBandit("laplace_ucb", env.num_arms * env.dim, 8, 30, _tiny_config(), seed=1)
    for t in range(25):
        feats = env.arm_features(t)
        arm = pol.select(t, feats)
        pol.observe(t, arm, feats, env.reward(t, arm))
    n = pol.n
    Xh, yh = pol.X[:n].double(), pol.y[:n].double().unsqueeze(-1)
    gp = NTKGP(pol.net, Xh, yh, noise=0.3, prior_scale=2.0, num_probes=n, num_iter=n, dtype=torch.float64)
    G = gp.K.to_dense()
    r = (yh - gp.f_train).reshape(-1)
    mu = torch.linalg.eigvalsh(G)
    ours = laplace_evidence(mu, r, gp.weight_norm_sq, 0.3, 2.0)
    theirs = gp.log_marginal_likelihood(0.3, 2.0, kind="laplace")
    assert ours == pytest.approx(float(theirs), rel=1e-6, abs=1e-6)

    fit = fit_laplace_evidence(mu, r, gp.weight_norm_sq, 0.3, 2.0)
    assert fit.initial_evidence == pytest.approx(ours)
    assert fit.evidence > fit.initial_evidence + 1e-3
    assert fit.evidence == pytest.approx(laplace_evidence(mu, r, gp.weight_norm_sq, fit.noise, fit.prior_scale))
    # a local maximum: no neighbour on a fine log grid does better
    for a in (0.9, 1.0, 1.1):
        for b in (0.9, 1.0, 1.1):
            assert laplace_evidence(mu, r, gp.weight_norm_sq, fit.noise * a, fit.prior_scale * b) <= fit.evidence + 1e-9
    # the policy refit its hyperparameters online, each time no worse than its start
    trace = [e for e in pol.trace if "evidence" in e]
    assert len(trace) >= 3 and all(e["evidence"] >= e["initial_evidence"] for e in trace)


def test_neuralucb_gamma_is_the_theorem_constant():
    g = neuralucb_gamma(log_det_ratio=4.0, nu=0.5, delta=0.1, ridge=1.0, S=3.0)
    assert g == pytest.approx(0.5 * math.sqrt(4.0 - 2 * math.log(0.1)) + 3.0)


# -- the study --------------------------------------------------------------------------------------
TINY = dict(datasets=["wine"], rounds={"wine": 12}, widths=[4, 8], seeds=2, methods=list(METHODS),
            train_steps=3, retrain_until=3, retrain_every=4, gamma_grid=[0.1, 1.0])


def _quiet(**kw):
    return dict(quick=True, progress=False, figures=False, device="cpu", stream=io.StringIO(), **kw)


def test_tiny_study_runs_with_the_row_layout(tmp_path):
    res = run_study(STUDY, out=tmp_path, overrides=TINY, **_quiet())
    rows = res.results["rows"]
    assert len(rows) == 2 * len(METHODS) * 2
    for r in rows:
        assert {"dataset", "width", "method", "seed", "cumulative_regret", "seconds"} <= set(r)
        c = r["cumulative_regret"]
        assert len(c) == 12 and all(b >= a for a, b in zip(c, c[1:])) and 0 <= c[-1] <= 12
        assert r["seconds"] > 0
    grid = res.results["extras"]["dataset=wine,width=4,method=neuralucb_grid"]
    assert grid["gamma"] in (0.1, 1.0) and set(grid["grid_final_regret"]) == {"0.1", "1.0"}


def test_resume_skips_finished_configurations_and_reproduces_rows(tmp_path):
    tiny = dict(TINY, widths=[4], methods=["greedy", "neuralucb", "laplace_ts"])
    full = run_study(STUDY, out=tmp_path / "a", overrides=tiny, **_quiet())

    class Stop(Exception):
        pass

    def stop_after_two(k, cid, outcome):
        if k == 1:
            raise Stop

    with pytest.raises(Stop):
        run_study(STUDY, out=tmp_path / "b", overrides=tiny, after_configuration=stop_after_two, **_quiet())
    resumed = run_study(STUDY, out=tmp_path / "b", overrides=tiny, **_quiet())
    assert len(resumed.skipped) == 2 and resumed.ran == full.ran[2:]

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(resumed.results["rows"]) == strip(full.results["rows"])


def test_unknown_method_is_refused(tmp_path):
    from ntkscale.experiments import ExperimentError

    with pytest.raises(ExperimentError, match="unknown bandit method"):
        run_study(STUDY, out=tmp_path, overrides=dict(TINY, methods=["thompson"]), **_quiet())
    with pytest.raises(ValueError, match="method must be one of"):
        NeuralBandit("ucb", 6, 4, 10, _tiny_config())


def _write_idx(path, array):
    import gzip
    import struct

    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype("uint8").tobytes())


def test_full_preset_adds_the_data_sets_found_on_disk(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 40), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    res = run_study(STUDY, quick=False, out=tmp_path / "out", data_dir=tmp_path / "data", progress=False,
                    figures=False, device="cpu", stream=io.StringIO(),
                    overrides=dict(datasets=[], rounds={"mnist": 6}, widths=[4], seeds=1, methods=["laplace_ucb"],
                                   train_steps=2, retrain_until=2, retrain_every=3))
    assert res.results["config"]["datasets"] == ["mnist"] and res.results["config"]["data_found"] == ["mnist"]
    (row,) = res.results["rows"]
    assert row["dataset"] == "mnist" and len(row["cumulative_regret"]) == 6
    X, y = load_bandit_data("mnist", tmp_path / "data", size=30)
    assert X.shape == (30, 784) and y.shape == (30,)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_bandit_data("mnist")
