"""Built-in data sets: shapes, dtypes, standardization, splits, and the missing-extra error."""

from __future__ import annotations

import gzip
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from ntkscale import data


def test_digits_one_hot_standardized():
    ds = data.digits(n_train=300, n_test=100, seed=1)
    assert ds.name == "digits" and ds.task == "classification" and ds.num_classes == 10
    assert ds.X_train.shape == (300, 64) and ds.X_test.shape == (100, 64)
    assert ds.y_train.shape == (300, 10) and ds.y_test.shape == (100, 10)
    assert ds.X_train.dtype == torch.float32 and ds.y_train.dtype == torch.float32
    assert torch.equal(ds.y_train.sum(1), torch.ones(300))
    mu, sd = ds.X_train.mean(0), ds.X_train.std(0, unbiased=False)
    assert mu.abs().max() < 1e-4
    varying = sd > 0  # constant border pixels stay 0
    assert torch.allclose(sd[varying], torch.ones_like(sd[varying]), atol=1e-4)
    assert ds.num_outputs == 10 and ds.num_features == 64


def test_digits_labels_and_determinism():
    a = data.digits(n_train=50, n_test=20, seed=3, one_hot=False)
    b = data.digits(n_train=50, n_test=20, seed=3, one_hot=True)
    assert a.y_train.dtype == torch.int64 and a.y_train.shape == (50,)
    assert torch.equal(a.labels("train"), b.labels("train"))
    assert torch.equal(a.X_test, b.X_test)
    c = data.digits(n_train=50, n_test=20, seed=4)
    assert not torch.equal(a.X_train, c.X_train)


def test_raw_digits_and_standardize_against_scikit_learn():
    """``standardized=False`` keeps scikit-learn's pixels; :func:`data.standardize` of them is
    StandardScaler fit on the training split, and gives the default (standardized) loader."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.preprocessing import StandardScaler

    raw = data.digits(n_train=200, n_test=60, seed=2, one_hot=False, standardized=False)
    ref = load_digits()
    # each raw row is one of scikit-learn's images, with its label
    for row, label in zip(raw.X_train.double().numpy(), raw.y_train.tolist()):
        assert label in ref.target[(ref.data == row).all(1)]
    Xtr, Xte = raw.X_train.double().numpy(), raw.X_test.double().numpy()
    a, b = data.standardize(Xtr, Xte)
    scaler = StandardScaler().fit(Xtr)
    np.testing.assert_allclose(a, scaler.transform(Xtr), atol=1e-12)
    np.testing.assert_allclose(b, scaler.transform(Xte), atol=1e-12)
    std = data.digits(n_train=200, n_test=60, seed=2, one_hot=False)
    assert torch.allclose(std.X_train, torch.from_numpy(a).float(), atol=1e-6)
    assert torch.allclose(std.X_test, torch.from_numpy(b).float(), atol=1e-6)


def test_digits_disjoint_split():
    ds = data.digits(n_train=1000, n_test=797, seed=0)
    rows = torch.cat([ds.X_train, ds.X_test])
    assert torch.unique(rows, dim=0).shape[0] >= 1700  # digits has a few duplicate images
    with pytest.raises(ValueError, match="1797 samples"):
        data.digits(n_train=1500, n_test=500)


@pytest.mark.parametrize("loader,n,d,c", [(data.wine, 178, 13, 3), (data.breast_cancer, 569, 30, 2)])
def test_small_classification_sets(loader, n, d, c):
    ds = loader(seed=0)
    assert ds.X_train.shape[0] + ds.X_test.shape[0] == n
    assert ds.X_test.shape[0] == round(0.3 * n)
    assert ds.X_train.shape[1] == d and ds.y_train.shape == (ds.X_train.shape[0], c)
    ds2 = loader(n_train=40, n_test=20, one_hot=False)
    assert ds2.X_train.shape == (40, d) and ds2.y_test.shape == (20,)


def test_regression1d_has_a_gap():
    ds = data.regression1d(n=200, seed=0, noise=0.05, gap=(-0.25, 0.5))
    x = ds.X_train.squeeze(1)
    assert ds.task == "regression" and ds.num_classes is None and ds.num_outputs == 1
    assert ds.X_train.shape == (200, 1) and ds.y_train.shape == (200, 1)
    assert not bool(((x > -0.25) & (x < 0.5)).any())
    assert bool((x < -0.25).any()) and bool((x > 0.5).any())
    assert bool((x[1:] >= x[:-1]).all())
    xt = ds.X_test.squeeze(1)
    assert xt.min() < -1.0 and xt.max() > 1.0  # the test grid reaches beyond the data
    resid = ds.y_train - data.regression1d_target(ds.X_train)
    assert 0.03 < resid.std().item() < 0.07
    assert torch.equal(data.regression1d(n=10, seed=5).X_train, data.regression1d(n=10, seed=5).X_train)
    with pytest.raises(ValueError, match="gap"):
        data.regression1d(gap=(0.5, 2.0))


def test_load_by_name():
    assert data.load("wine").name == "wine"
    with pytest.raises(ValueError, match="digits"):
        data.load("mnist")


def test_missing_sklearn_names_the_extra(monkeypatch):
    for mod in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'ntkscale\[experiments\]'"):
        data.digits()
    # regression1d needs no scikit-learn
    assert data.regression1d(n=5).X_train.shape == (5, 1)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("one_hot", [True, False])
def test_image_sets_without_a_test_split(tmp_path, one_hot):
    """``n_test=0`` gives an empty test split of the right shapes and the same training subset."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, 12))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), b"labels": [1, 2, 3, 4]}, f)
    for load, d in ((data.mnist, 784), (data.cifar10, 3072)):
        ds = load(tmp_path, n_train=8, n_test=0, seed=3, one_hot=one_hot)
        with_test = load(tmp_path, n_train=8, n_test=2, seed=3, one_hot=one_hot)
        assert ds.X_test.shape == (0, d) and ds.X_test.dtype == torch.float32
        assert ds.y_test.shape == ((0, 10) if one_hot else (0,))
        assert torch.equal(ds.X_train, with_test.X_train) and torch.equal(ds.y_train, with_test.y_train)
