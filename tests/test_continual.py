"""The continual study: summaries against their formulas, deterministic tasks, the NTK-change
measure against dense float64 Jacobians, and a tiny sweep with resume."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from ntkscale import NTKOperator
from ntkscale.experiments import ExperimentError, read_results, run_study
from ntkscale.experiments import continual
from ntkscale.models import MLP

pytest.importorskip("sklearn")

TINY = dict(families=["permuted", "rotated"], num_tasks=2, n_train=120, n_test=40, widths=[4, 16], num_seeds=1,
            max_epochs=2, early_steps=3, probe_samples=3, batch_size=32)


def _quiet(**kw):
    return dict(quick=True, progress=False, figures=False, device="cpu", stream=io.StringIO(), **kw)


# -- summaries -------------------------------------------------------------------------------------
def test_summaries_on_hand_made_matrices():
    A = [[0.90, 0.10, 0.10],
         [0.70, 0.95, 0.20],
         [0.50, 0.60, 0.99]]
    # task 0: best before the last task 0.90, final 0.50; task 1: best 0.95, final 0.60
    assert continual.average_forgetting(A) == pytest.approx(((0.90 - 0.50) + (0.95 - 0.60)) / 2)
    assert continual.average_accuracy(A) == pytest.approx((0.50 + 0.60 + 0.99) / 3)

    # the best accuracy may come after the task itself (backward transfer): the max runs over i ≥ j
    B = [[0.60, 0.00, 0.00, 0.00],
         [0.80, 0.70, 0.10, 0.00],
         [0.40, 0.90, 0.75, 0.30],
         [0.20, 0.30, 0.50, 0.95]]
    assert continual.average_forgetting(B) == pytest.approx(((0.80 - 0.20) + (0.90 - 0.30) + (0.75 - 0.50)) / 3)
    assert continual.average_accuracy(B) == pytest.approx((0.20 + 0.30 + 0.50 + 0.95) / 4)

    # the final row is not part of the max: a task that improves at the end has negative forgetting;
    # entries above the diagonal (tasks not trained yet) never count
    C = [[0.50, 0.99],
         [0.80, 0.90]]
    assert continual.average_forgetting(C) == pytest.approx(0.50 - 0.80)
    assert continual.average_accuracy(C) == pytest.approx(0.85)


def test_summaries_reject_bad_matrices():
    with pytest.raises(ValueError, match="square"):
        continual.average_forgetting([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    with pytest.raises(ValueError, match="at least 2 tasks"):
        continual.average_forgetting([[0.7]])
    assert continual.average_accuracy([[0.7]]) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="non-finite"):
        continual.average_accuracy([[0.1, math.nan], [0.2, 0.3]])


# -- tasks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", continual.FAMILIES)
def test_tasks_deterministic_given_the_seed(family):
    a = continual.task_sequence(family, 3, seed=5, n_train=200, n_test=50)
    b = continual.task_sequence(family, 3, seed=5, n_train=200, n_test=50)
    c = continual.task_sequence(family, 3, seed=6, n_train=200, n_test=50)
    assert len(a) == 3 and [t.name for t in a] == [t.name for t in b]
    for s, t in zip(a, b):
        for key in ("X_train", "y_train", "X_test", "y_test"):
            assert torch.equal(getattr(s, key), getattr(t, key))
    assert a[0].X_train.shape == (200, 64) and a[0].X_test.shape == (50, 64)
    assert a[0].y_train.dtype == torch.int64 and set(a[0].y_train.tolist()) <= set(range(10))
    assert not torch.equal(a[1].X_train, c[1].X_train)  # another seed: another split (and permutation)
    for t in a:  # labels shared by every task; inputs standardized by the task's training split
        assert torch.equal(t.y_train, a[0].y_train) and torch.equal(t.y_test, a[0].y_test)
        assert t.X_train.mean(0).abs().max() < 1e-5


def test_permuted_tasks_permute_the_pixels():
    tasks = continual.task_sequence("permuted", 4, seed=1, n_train=300, n_test=60)
    base = tasks[0].X_train
    perms = []
    for t in tasks[1:]:
        # every pixel column of task k is one pixel column of task 0, each used once
        match = [[j for j in range(64) if torch.equal(t.X_train[:, i], base[:, j])] for i in range(64)]
        varying = [m for m in match if len(m) == 1]
        assert len(varying) == sum(1 for j in range(64) if base[:, j].abs().sum() > 0)
        perms.append(tuple(m[0] if len(m) == 1 else -1 for m in match))
    assert len(set(perms)) == 3  # distinct permutations
    assert perms[0] != tuple(range(64))


def test_rotated_tasks_rotate_the_images():
    # T = 3 up to 180°: angles 0°, 90°, 180°, which map the 8×8 pixel grid onto itself exactly
    tasks = continual.task_sequence("rotated", 3, seed=0, n_train=150, n_test=30, max_angle=180.0)
    assert [t.name for t in tasks] == ["rotated 0°", "rotated 90°", "rotated 180°"]
    img0 = tasks[0].X_train.reshape(-1, 8, 8).numpy()
    img1 = tasks[1].X_train.reshape(-1, 8, 8).numpy()
    img2 = tasks[2].X_train.reshape(-1, 8, 8).numpy()
    # per-pixel standardization commutes with a pixel permutation
    np.testing.assert_allclose(img2, img0[:, ::-1, ::-1], atol=1e-5)
    np.testing.assert_allclose(img1, np.rot90(img0, k=1, axes=(1, 2)), atol=1e-5)
    # the first task of both families is the untransformed images
    perm0 = continual.task_sequence("permuted", 2, seed=0, n_train=150, n_test=30)[0]
    assert torch.equal(perm0.X_train, tasks[0].X_train)


def test_task_sequence_rejects_bad_input():
    with pytest.raises(ValueError, match="family"):
        continual.task_sequence("shuffled", 3)
    with pytest.raises(ValueError, match="num_tasks"):
        continual.task_sequence("rotated", 0)
    with pytest.raises(ValueError, match="1797"):
        continual.task_sequence("rotated", 2, n_train=1500, n_test=500)


# -- the NTK change --------------------------------------------------------------------------------
def _dense_ntk(model, params, X):
    """Θ = J Jᵀ from a dense float64 Jacobian (rows sample-major, as NTKOperator)."""
    names = list(params)

    def f(*ps):
        return functional_call(model, dict(zip(names, ps)), (X,)).reshape(-1)

    J = torch.cat([j.reshape(j.shape[0], -1) for j in jacrev(f, argnums=tuple(range(len(names))))(*params.values())], 1)
    return J @ J.T


def test_relative_ntk_change_against_dense_jacobians():
    torch.manual_seed(0)
    model = MLP(5, [12, 12], 3, W_std=1.4, b_std=0.3).double()
    X = torch.randn(6, 5, dtype=torch.float64)
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    K0 = NTKOperator(model, X)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    p1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    K1 = NTKOperator(model, X)
    D0, D1 = _dense_ntk(model, p0, X), _dense_ntk(model, p1, X)
    want = float(torch.linalg.matrix_norm(D1 - D0) / torch.linalg.matrix_norm(D0))
    assert want > 0.05
    assert continual.relative_ntk_change(K1, K0) == pytest.approx(want, rel=1e-9)
    assert continual.relative_ntk_change(K1, K0, block=5) == pytest.approx(want, rel=1e-9)  # several blocks
    # Hutchinson: unbiased for both squared norms; 4000 Rademacher vectors land within a few percent
    est = continual.relative_ntk_change(K1, K0, num_probes=4000, seed=3)
    assert est == pytest.approx(want, rel=0.05)
    assert continual.relative_ntk_change(K0, K0) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        continual.relative_ntk_change(K1, NTKOperator(model, X[:4]))
    with pytest.raises(ValueError, match="num_probes"):
        continual.relative_ntk_change(K1, K0, num_probes=0)


# -- the sweep -------------------------------------------------------------------------------------
def test_tiny_sweep_rows_and_resume(tmp_path):
    def stop(index, cid, outcome):
        if index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(continual.STUDY, out=tmp_path / "cut", overrides=TINY, after_configuration=stop, **_quiet())
    first = "family=permuted,width=4,regime=high_accuracy,seed=0"
    assert read_results(tmp_path / "cut")["finished"] == [first]
    res = run_study(continual.STUDY, out=tmp_path / "cut", overrides=TINY, **_quiet())
    assert res.skipped == [first] and len(res.ran) == 7
    whole = run_study(continual.STUDY, out=tmp_path / "whole", overrides=TINY, **{**_quiet(), "figures": True})
    assert res.results["rows"] == whole.results["rows"]  # the resumed sweep reproduces the rows
    assert sorted(p.name for p in whole.figures) == ["continual_forgetting.png", "continual_movement.png"]
    assert all(p.stat().st_size > 1000 for p in whole.figures)

    rows = res.results["rows"]
    assert [(r["family"], r["width"], r["regime"]) for r in rows] == [
        (f, w, g) for f in ("permuted", "rotated") for w in (4, 16) for g in ("high_accuracy", "early_stopped")]
    for r in rows:
        A = np.asarray(r["accuracy"])
        assert A.shape == (2, 2) and np.all((A >= 0) & (A <= 1))
        assert r["average_forgetting"] == pytest.approx(A[0, 0] - A[1, 0])
        assert r["average_accuracy"] == pytest.approx(A[1].mean())
        assert r["param_change"] > 0 and r["ntk_change"] > 0 and r["param_distance"] > 0
        assert len(r["ntk_change_per_task"]) == 2 and r["ntk_change_per_task"][-1] == r["ntk_change"]
        if r["regime"] == "early_stopped":
            assert r["steps"] == [3, 3]
        else:  # whole epochs of 120 samples in batches of 32, until the target or 2 epochs
            assert all(s % 4 == 0 and 0 < s <= 8 for s in r["steps"])
            assert all(ok == (a >= 0.99) for ok, a in zip(r["reached_target"], r["train_accuracy"]))


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ExperimentError, match="num_tasks"):
        run_study(continual.STUDY, out=tmp_path, overrides={**TINY, "num_tasks": 1}, **_quiet())
    with pytest.raises(ExperimentError, match="regimes"):
        run_study(continual.STUDY, out=tmp_path, overrides={**TINY, "regimes": ["lazy"]}, **_quiet())
    with pytest.raises(ExperimentError, match="probe_samples"):
        run_study(continual.STUDY, out=tmp_path, overrides={**TINY, "probe_samples": 41}, **_quiet())


def test_presets_meet_the_issue():
    for preset, tasks in ((continual.QUICK, 3), (continual.FULL, 5)):
        assert preset.num_tasks >= tasks and set(preset.families) == set(continual.FAMILIES)
        assert len(preset.widths) >= 3 and max(preset.widths) / min(preset.widths) >= 16
        assert set(preset.regimes) == set(continual.REGIMES)


def test_divergence_is_reported(tmp_path):
    with pytest.raises(ExperimentError, match="diverged"):
        run_study(continual.STUDY, out=tmp_path, overrides={**TINY, "lr": 1e30, "regimes": ["early_stopped"]},
                  **_quiet())


@pytest.mark.parametrize("family", ["permuted", "rotated"])
def test_tasks_without_test_images(family):
    """``n_test=0``: empty test splits, training splits as with test images."""
    tasks = continual.task_sequence(family, 3, seed=2, n_train=40, n_test=0)
    ref = continual.task_sequence(family, 3, seed=2, n_train=40, n_test=5)
    for t, r in zip(tasks, ref):
        assert t.X_test.shape == (0, 64) and t.y_test.shape == (0,)
        assert torch.equal(t.X_train, r.X_train) and torch.equal(t.y_train, r.y_train)
