"""The studies' cores on tiny configurations: invariants, resume, references (dense eigvalsh)."""

from __future__ import annotations

import gzip
import io
import json
import math
import pickle
import struct

import numpy as np
import pytest
import torch

from ntkscale import data, kernels
from ntkscale.cli import main
from ntkscale.experiments import Context, ExperimentError, read_results, run_study
from ntkscale.experiments import conditioning, regression1d
from ntkscale.models import MLP

pytest.importorskip("sklearn")

TINY_R1D = dict(widths=[8, 32], num_seeds=1, n_train=12, n_grid=25, steps=30)
TINY_COND = dict(num_samples=5, mlp_widths=[2, 32], cnn_widths=[1, 4], depths=[1], steps=3,
                 num_perturbations=1, jacobian_iter=8)


def _ctx(tmp_path, seed=0):
    return Context(device=torch.device("cpu"), seed=seed, configuration_seed=seed, data_dir=None, out=tmp_path,
                   show_progress=False)


def _quiet(**kw):
    return dict(quick=True, progress=False, device="cpu", stream=io.StringIO(), **kw)


# -- regression1d ----------------------------------------------------------------------------------
def test_regression1d_rows_and_resume(tmp_path):
    out = tmp_path / "r1d"
    calls = []

    def stop(index, cid, outcome):
        calls.append(cid)
        if index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(regression1d.STUDY, out=out, overrides=TINY_R1D, after_configuration=stop, **_quiet())
    assert read_results(out)["finished"] == ["width=8,seed=0"]
    res = run_study(regression1d.STUDY, out=out, overrides=TINY_R1D, **_quiet())
    assert res.skipped == ["width=8,seed=0"] and res.ran == ["width=32,seed=0", "width=None,seed=None"]
    whole = run_study(regression1d.STUDY, out=tmp_path / "whole", overrides=TINY_R1D, **_quiet())
    assert res.results["rows"] == whole.results["rows"]  # the resumed sweep reproduces the rows

    rows = res.results["rows"]
    assert [r["width"] for r in rows] == [8, 32, None]
    for r in rows:
        for key in ("mean_rmse_to_infinite", "std_rmse_to_infinite", "test_rmse"):
            assert math.isfinite(r[key]) and r[key] >= 0
    assert rows[-1]["mean_rmse_to_infinite"] == 0 and rows[-1]["seed"] is None
    assert rows[0]["mean_rmse_to_infinite"] > 0
    assert {p.name for p in res.figures} == {"regression1d.png", "regression1d_convergence.png"}
    assert all(p.stat().st_size > 0 for p in res.figures)

    # another config refuses the folder, and says how to start fresh
    with pytest.raises(ExperimentError, match="--fresh"):
        run_study(regression1d.STUDY, out=out, overrides={**TINY_R1D, "steps": 31}, **_quiet())


def test_infinite_predictive_matches_kernel_gd_by_iteration():
    """The closed-form sum over GD steps equals running kernel gradient descent step by step."""
    ds = data.regression1d(n=10, seed=1, n_test=7)
    config = {**regression1d.QUICK.__dict__, "seed": 1, "steps": 25}
    X, y, G = ds.X_train.double(), ds.y_train.double().reshape(-1), ds.X_test.double()
    def kernel(X1, X2=None):  # the study's infinite-width NTK: a relu MLP of its depth and scales
        return kernels.infinite_ntk(X1, X2, depth=config["depth"], activation="relu",
                                    W_std=config["W_std"], b_std=config["b_std"])

    K = kernel(X)
    Ks = kernel(G, X)
    eta = regression1d.step_size(config, X) / X.shape[0]
    f_train, f_grid = torch.zeros(10, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    for _ in range(config["steps"]):
        r = f_train - y
        f_train, f_grid = f_train - eta * K @ r, f_grid - eta * Ks @ r
    lam = config["noise"] / config["prior_scale"]
    A = K + lam * torch.eye(10, dtype=torch.float64)
    mean_ref = f_grid + Ks @ torch.linalg.solve(A, y - f_train)
    kss = torch.diagonal(kernel(G))
    var_ref = config["prior_scale"] * (kss - torch.einsum("mn,mn->m", Ks, torch.linalg.solve(A, Ks.T).T))
    mean, std = regression1d.infinite_predictive(config, X, y.unsqueeze(-1), G)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(std, var_ref.clamp_min(0).sqrt(), rtol=1e-7, atol=1e-9)


# -- conditioning ----------------------------------------------------------------------------------
def test_spectrum_by_lanczos_equals_eigvalsh(tmp_path):
    """λ_min, λ_max of JJᵀ by Lanczos on the operator against eigvalsh of a dense float64 J Jᵀ."""
    torch.manual_seed(0)
    model = MLP(5, [16, 16], 3, W_std=1.5, b_std=0.1).double()
    X = torch.randn(7, 5, dtype=torch.float64)
    params = {k: p.detach() for k, p in model.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (X,)).reshape(-1))(params)
    J = torch.cat([j.reshape(21, -1) for j in jac.values()], dim=1)
    ref = torch.linalg.eigvalsh(J @ J.T)
    spec = conditioning.spectrum(model, X)
    assert isinstance(spec, conditioning.Spectrum)
    assert spec.converged and not spec.singular
    assert spec.lambda_max == pytest.approx(ref[-1].item(), rel=1e-9)
    assert spec.lambda_min == pytest.approx(ref[0].item(), rel=1e-6)
    assert spec.condition_number == pytest.approx((ref[-1] / ref[0]).item(), rel=1e-6)


def test_spectrum_of_a_rank_deficient_gram_is_zero():
    """N·C > P: JJᵀ is singular, and λ_min is reported as 0 (a finding, not an error)."""
    torch.manual_seed(0)
    model = MLP(2, [2], 4)  # P = 2·2 + 2 + 2·4 + 4 = 18 < N·C = 40
    spec = conditioning.spectrum(model, torch.randn(10, 2))
    assert spec.singular and spec.lambda_min == 0.0 and spec.condition_number is None
    assert spec.lambda_max > 0


def test_conditioning_sweep_invariants_and_resume(tmp_path):
    overrides = {**TINY_COND, "architectures": ["mlp", "cnn"], "parametrizations": ["ntk", "standard"]}
    out = tmp_path / "cond"

    def stop(index, cid, outcome):
        if index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(conditioning.STUDY, out=out, overrides=overrides, after_configuration=stop, **_quiet())
    res = run_study(conditioning.STUDY, out=out, overrides=overrides, **_quiet())
    assert len(res.skipped) == 1 and len(res.ran) == 7
    rows = res.results["rows"]
    assert len(rows) == 8
    for r in rows:
        assert 0 <= r["lambda_min"] <= r["lambda_max"]
        assert r["rank_deficient"] == (r["num_samples"] * 10 > r["num_parameters"])
        if r["rank_deficient"]:
            assert r["lambda_min"] == 0 and r["condition_number"] is None
        if r["condition_number"] is not None:
            assert r["condition_number"] >= 1
        assert r["stability_constant"] is not None and r["stability_constant"] > 0
        assert set(r["loss_curves"]) == {"ngd", "gd", "adam"}
        for curve in r["loss_curves"].values():
            assert len(curve) == TINY_COND["steps"] + 1
    # the first configuration (computed before the interrupt) is the one an uninterrupted run gets
    first = conditioning.configurations({**conditioning.QUICK.__dict__, **overrides})[0]
    again = run_study(conditioning.STUDY, out=tmp_path / "again", overrides={**overrides, "depths": [first["depth"]],
                      "mlp_widths": [first["width"]], "architectures": ["mlp"], "parametrizations": ["ntk"]},
                      figures=False, **_quiet())
    assert again.results["rows"][0] == rows[0]
    names = {p.name for p in res.figures}
    assert names == {"conditioning_spectrum.png", "conditioning_stability.png", "conditioning_training.png"}


def test_ngd_fits_the_linear_regime_fastest():
    """A wide NTK-parametrized MLP on few samples: NGD drives the loss far below GD's and Adam's."""
    config = {**conditioning.QUICK.__dict__, **TINY_COND, "seed": 0}
    X, Y, shape = conditioning.load_data(config)
    torch.manual_seed(0)
    model = conditioning.build_model(config, "mlp", 256, 1, "ntk", shape, 10)
    spec = conditioning.spectrum(model, X)
    out = conditioning.train_curves(model, X, Y, {**config, "steps": 3}, spec.lambda_max,
                                    _ctx(None))
    c = out["curves"]
    assert c["ngd"][-1] < 1e-2 * c["ngd"][0]
    assert c["ngd"][-1] < c["gd"][-1] and c["ngd"][-1] < c["adam"][-1]


def test_full_batch_steps_in_chunks_equal_one_batch():
    """GD's and Adam's full-batch steps accumulated over chunks follow the one-batch curves."""
    config = {**conditioning.QUICK.__dict__, **TINY_COND, "seed": 0}
    X, Y, shape = conditioning.load_data(config)
    torch.manual_seed(0)
    model = conditioning.build_model(config, "mlp", 64, 2, "ntk", shape, 10)
    lam = conditioning.spectrum(model, X).lambda_max
    whole = conditioning.train_curves(model, X, Y, {**config, "steps": 3}, lam, _ctx(None), chunk_size=X.shape[0])
    parts = conditioning.train_curves(model, X, Y, {**config, "steps": 3}, lam, _ctx(None), chunk_size=3)
    for name in ("gd", "adam"):
        torch.testing.assert_close(torch.tensor(parts["curves"][name]), torch.tensor(whole["curves"][name]),
                                   rtol=1e-5, atol=1e-7)


# -- command line and data ---------------------------------------------------------------------------
def test_cli_device_not_present(capsys, tmp_path):
    missing = f"cuda:{torch.cuda.device_count()}"
    assert main(["experiment", "regression1d", "--quick", "--device", missing, "--out", str(tmp_path)]) == 2
    assert "not present" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_cli_refuses_another_sweep(capsys, tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"study": "conditioning", "preset": "quick", "config": {}}))
    assert main(["experiment", "regression1d", "--quick", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--fresh" in err and "another --out" in err


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_and_cifar10_from_disk(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 10, 30)
    for prefix, n in (("train", 30), ("t10k", 30)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", imgs[:n])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels[:n])
    ds = data.mnist(tmp_path, n_train=20, n_test=5, seed=0)
    assert ds.X_train.shape == (20, 784) and ds.y_train.shape == (20, 10) and ds.X_test.shape == (5, 784)
    assert abs(ds.X_train.mean().item()) < 1e-5 and ds.X_train.std().item() == pytest.approx(1, rel=1e-3)
    # every drawn image is one of the files' images, with its own label
    flat = imgs.reshape(30, -1).astype(np.float64)
    X = ds.X_train.double().numpy()
    corr = (X - X.mean(1, keepdims=True)) @ (flat - flat.mean(1, keepdims=True)).T
    match = corr.argmax(1)
    assert len(set(match.tolist())) == 20
    assert ds.labels().tolist() == labels[match].tolist()
    assert data.find_on_disk("mnist", tmp_path) == raw

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), b"labels": [1, 2, 3, 4]}, f)
    ds = data.cifar10(tmp_path, n_train=12, n_test=2)
    assert ds.X_train.shape == (12, 3072) and ds.X_test.shape == (2, 3072)
    assert sorted(set(ds.labels().tolist())) <= [1, 2, 3, 4]
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        data.mnist(tmp_path / "nowhere")
