"""Small data sets that ship with a dependency or are synthesized; nothing is downloaded.

Every loader returns a :class:`Dataset` of float32 tensors with inputs standardized by the
training split's statistics (:func:`standardize`; ``digits(standardized=False)`` keeps raw pixels). Classification targets are one-hot ``(N, C)`` float32 (the form
regression onto targets and the NTK operator's ``(sample, output)`` rows want) or class indices
``(N,)`` int64 with ``one_hot=False``. Regression targets are ``(N, 1)``.

The classification sets come from scikit-learn, an optional dependency
(``pip install 'ntkscale[experiments]'``); it is imported only when a loader is called.

Examples:
    >>> from ntkscale import data
    >>> ds = data.regression1d(n=40, seed=0)
    >>> ds.X_train.shape, ds.y_train.shape, ds.name
    (torch.Size([40, 1]), torch.Size([40, 1]), 'regression1d')
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "Dataset",
    "breast_cancer",
    "cifar10",
    "digits",
    "find_on_disk",
    "load",
    "mnist",
    "regression1d",
    "standardize",
    "wine",
]

_SKLEARN_HINT = "pip install 'ntkscale[experiments]'"


@dataclass
class Dataset:
    """A train/test split as tensors.

    Attributes:
        name: the data set's name (``"digits"``, ``"wine"``, ...).
        X_train: training inputs.  # shape: (N, D), float32
        y_train: training targets.  # shape: (N, C) float32, or (N,) int64 class indices
        X_test: test inputs.  # shape: (M, D), float32
        y_test: test targets.  # shape: (M, C) float32, or (M,) int64 class indices
        task: ``"classification"`` or ``"regression"``.
        num_classes: number of classes; ``None`` for regression.
    """

    name: str
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    task: str = "classification"
    num_classes: int | None = None

    @property
    def num_features(self) -> int:
        """D, the input dimension."""
        return int(self.X_train.shape[1])

    @property
    def num_outputs(self) -> int:
        """Outputs a model needs: the number of classes, or the target dimension."""
        if self.num_classes is not None:
            return self.num_classes
        return 1 if self.y_train.ndim == 1 else int(self.y_train.shape[1])

    def labels(self, split: str = "train") -> Tensor:
        """Class indices of ``split`` (``"train"`` or ``"test"``), shape (N,), from either form.

        Raises:
            ValueError: for a regression data set or an unknown split.
        """
        if self.task != "classification":
            raise ValueError(f"{self.name} is a regression data set; it has no class labels")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        y = self.y_train if split == "train" else self.y_test
        return y.argmax(1) if y.ndim == 2 else y

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, train={tuple(self.X_train.shape)}, "
            f"test={tuple(self.X_test.shape)}, num_outputs={self.num_outputs})"
        )


def _sklearn_datasets():
    try:
        from sklearn import datasets
    except ImportError as err:
        raise ImportError(
            f"this data set is loaded through scikit-learn, which is not installed; "
            f"install it with: {_SKLEARN_HINT}"
        ) from err
    return datasets


def standardize(X_train: np.ndarray, X_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero mean, unit variance per feature, by the statistics of the training split.

    Features constant on the training split are only centred (they stay 0 there).

    Args:
        X_train: training inputs.  # shape: (N, D), a NumPy array
        X_test: test inputs, scaled by the training split's mean and standard deviation.  # shape: (M, D)

    Returns:
        The standardized ``(X_train, X_test)``.
    """
    mu = X_train.mean(0)
    sd = X_train.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    return (X_train - mu) / sd, (X_test - mu) / sd


def _split(
    X: np.ndarray, y: np.ndarray, n_train: int, n_test: int, seed: int, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = X.shape[0]
    if n_train < 1 or n_test < 0:
        raise ValueError(f"n_train must be >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    if n_train + n_test > n:
        raise ValueError(
            f"{name} has {n} samples; n_train={n_train} + n_test={n_test} = {n_train + n_test} "
            f"asks for more"
        )
    perm = np.random.default_rng(seed).permutation(n)
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    return X[tr], y[tr], X[te], y[te]


def _classification(
    name: str, X: np.ndarray, y: np.ndarray, n_train: int, n_test: int, seed: int, one_hot: bool,
    scale: bool = True,
) -> Dataset:
    num_classes = int(y.max()) + 1
    Xtr, ytr, Xte, yte = _split(X.astype(np.float64), y.astype(np.int64), n_train, n_test, seed, name)
    if scale:
        Xtr, Xte = standardize(Xtr, Xte)

    def targets(labels: np.ndarray) -> Tensor:
        t = torch.from_numpy(labels)
        return torch.nn.functional.one_hot(t, num_classes).float() if one_hot else t

    return Dataset(
        name=name,
        X_train=torch.from_numpy(Xtr).float(),
        y_train=targets(ytr),
        X_test=torch.from_numpy(Xte).float(),
        y_test=targets(yte),
        task="classification",
        num_classes=num_classes,
    )


def _fraction_split(n: int, n_train: int | None, n_test: int | None, test_fraction: float) -> tuple[int, int]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if n_test is None:
        n_test = int(round(test_fraction * n)) if n_train is None else n - n_train
    if n_train is None:
        n_train = n - n_test
    return n_train, n_test


def digits(
    n_train: int = 1000, n_test: int = 500, seed: int = 0, one_hot: bool = True, standardized: bool = True
) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 samples, 64 features, 10 classes).

    Args:
        n_train: training samples.
        n_test: test samples, disjoint from the training ones (``n_train + n_test <= 1797``).
        seed: seed of the random split.
        one_hot: targets as one-hot float32 ``(N, 10)``; ``False`` gives int64 labels ``(N,)``.
        standardized: standardize the inputs per pixel by the training split (see
            :func:`standardize`); ``False`` keeps the raw intensities 0..16 (to transform the
            images before standardizing them).

    Returns:
        A :class:`Dataset` with inputs standardized per pixel by the training split, or raw.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: the split asks for more samples than there are.
    """
    ds = _sklearn_datasets().load_digits()
    return _classification("digits", ds.data, ds.target, n_train, n_test, seed, one_hot, standardized)


def wine(
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    one_hot: bool = True,
    test_fraction: float = 0.3,
) -> Dataset:
    """scikit-learn's wine recognition data (178 samples, 13 features, 3 classes).

    Args:
        n_train: training samples; default all that the test split leaves.
        n_test: test samples; default ``test_fraction`` of the data.
        seed: seed of the random split.
        one_hot: targets as one-hot float32 ``(N, 3)``; ``False`` gives int64 labels ``(N,)``.
        test_fraction: share of the data held out when neither size is given.

    Returns:
        A :class:`Dataset` with standardized features.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    ds = _sklearn_datasets().load_wine()
    n_train, n_test = _fraction_split(ds.data.shape[0], n_train, n_test, test_fraction)
    return _classification("wine", ds.data, ds.target, n_train, n_test, seed, one_hot)


def breast_cancer(
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    one_hot: bool = True,
    test_fraction: float = 0.3,
) -> Dataset:
    """scikit-learn's Wisconsin breast-cancer data (569 samples, 30 features, 2 classes).

    Args:
        n_train: training samples; default all that the test split leaves.
        n_test: test samples; default ``test_fraction`` of the data.
        seed: seed of the random split.
        one_hot: targets as one-hot float32 ``(N, 2)``; ``False`` gives int64 labels ``(N,)``.
        test_fraction: share of the data held out when neither size is given.

    Returns:
        A :class:`Dataset` with standardized features.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    ds = _sklearn_datasets().load_breast_cancer()
    n_train, n_test = _fraction_split(ds.data.shape[0], n_train, n_test, test_fraction)
    return _classification("breast_cancer", ds.data, ds.target, n_train, n_test, seed, one_hot)


def regression1d_target(x: Tensor) -> Tensor:
    """The noiseless function behind :func:`regression1d`: ``sin(3x) + 0.3 cos(9x)``."""
    return torch.sin(3.0 * x) + 0.3 * torch.cos(9.0 * x)


def regression1d(
    n: int = 64,
    seed: int = 0,
    noise: float = 0.1,
    n_test: int = 400,
    gap: tuple[float, float] = (-0.25, 0.5),
    domain: tuple[float, float] = (-1.0, 1.0),
    test_domain: tuple[float, float] = (-1.5, 1.5),
) -> Dataset:
    """A 1-D regression with a gap in the inputs, for comparing means and uncertainty bands.

    Training inputs are drawn uniformly from ``domain`` minus the open interval ``gap``; targets
    are :func:`regression1d_target` plus Gaussian noise of standard deviation ``noise``. The test
    inputs are an even grid over ``test_domain``, which covers the gap and both sides beyond the
    data, with noiseless targets: where a predictive should grow uncertain is visible at a glance.
    The inputs are not standardized (the grid is the plotting axis).

    Args:
        n: training samples.
        seed: seed of the inputs and the noise.
        noise: standard deviation of the observation noise, >= 0.
        n_test: points of the test grid.
        gap: ``(lo, hi)``, the interval inside ``domain`` without training inputs.
        domain: ``(lo, hi)``, where training inputs lie.
        test_domain: ``(lo, hi)``, the range of the test grid.

    Returns:
        A :class:`Dataset` with ``X`` of shape (N, 1) and ``y`` of shape (N, 1), float32,
        training inputs sorted.

    Raises:
        ValueError: for a gap outside the domain, ``n < 1`` or ``noise < 0``.
    """
    lo, hi = domain
    g_lo, g_hi = gap
    if not lo <= g_lo < g_hi <= hi or (g_lo == lo and g_hi == hi):
        raise ValueError(f"gap {gap} must be a proper sub-interval of domain {domain}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite standard deviation >= 0, got {noise}")
    gen = torch.Generator().manual_seed(seed)
    # Inverse-CDF sampling of the uniform law on [lo, g_lo) ∪ (g_hi, hi].
    left = g_lo - lo
    u = torch.rand(n, 1, generator=gen, dtype=torch.float64) * (left + hi - g_hi)
    x = torch.where(u < left, lo + u, g_hi + (u - left))
    x, _ = torch.sort(x, dim=0)
    y = regression1d_target(x) + noise * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    x_test = torch.linspace(test_domain[0], test_domain[1], n_test, dtype=torch.float64).unsqueeze(1)
    return Dataset(
        name="regression1d",
        X_train=x.float(),
        y_train=y.float(),
        X_test=x_test.float(),
        y_test=regression1d_target(x_test).float(),
        task="regression",
        num_classes=None,
    )


# -- image data sets already on disk (torchvision's layouts; nothing is downloaded) ---------------
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _first_existing(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_on_disk(name: str, data_dir: str | os.PathLike) -> Path | None:
    """The folder holding ``name`` (``"mnist"`` or ``"cifar10"``) under ``data_dir``, or ``None``.

    Looked for in torchvision's layouts: MNIST's idx files (optionally gzipped) in
    ``data_dir``, ``data_dir/raw`` or ``data_dir/MNIST/raw``; CIFAR-10's python batches in
    ``data_dir`` or ``data_dir/cifar-10-batches-py``.
    """
    root = Path(data_dir).expanduser()
    if name == "mnist":
        for folder in (root, root / "raw", root / "MNIST" / "raw"):
            if all(_first_existing(folder, f) for f in _MNIST_FILES["train"] + _MNIST_FILES["test"]):
                return folder
        return None
    if name == "cifar10":
        for folder in (root, root / "cifar-10-batches-py"):
            if all((folder / f"data_batch_{i}").is_file() for i in range(1, 6)) and (folder / "test_batch").is_file():
                return folder
        return None
    raise ValueError(f"find_on_disk knows 'mnist' and 'cifar10', got {name!r}")


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format): magic ``0 0 8 ndim``, big-endian int32 sizes, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (magic {raw[:4]!r})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {data.size} bytes of data; its header says {dims}")
    return data.reshape(dims)


def _image_dataset(name, Xtr, ytr, Xte, yte, n_train, n_test, seed, one_hot, num_classes) -> Dataset:
    """Random subsets of the official splits, scaled to [0, 1] and standardized by one scalar
    mean and standard deviation of the training subset (per-pixel statistics would blow up
    nearly constant border pixels)."""
    if n_train < 1 or n_test < 0 or n_train > len(ytr) or n_test > len(yte):
        raise ValueError(
            f"{name} has {len(ytr)} training and {len(yte)} test images; asked for n_train={n_train}, n_test={n_test}"
        )
    gen = np.random.default_rng(seed)
    tr = np.sort(gen.permutation(len(ytr))[:n_train])
    te = np.sort(gen.permutation(len(yte))[:n_test])
    Xtr = Xtr[tr].reshape(n_train, -1).astype(np.float32) / 255.0
    Xte = Xte[te].reshape(n_test, Xtr.shape[1]).astype(np.float32) / 255.0  # n_test may be 0
    mu, sd = float(Xtr.mean()), float(Xtr.std()) or 1.0

    def targets(labels: np.ndarray) -> Tensor:
        t = torch.from_numpy(labels.astype(np.int64))
        return torch.nn.functional.one_hot(t, num_classes).float() if one_hot else t

    return Dataset(
        name=name,
        X_train=torch.from_numpy((Xtr - mu) / sd),
        y_train=targets(ytr[tr]),
        X_test=torch.from_numpy((Xte - mu) / sd),
        y_test=targets(yte[te]),
        task="classification",
        num_classes=num_classes,
    )


def mnist(
    data_dir: str | os.PathLike, n_train: int = 60_000, n_test: int = 10_000, seed: int = 0, one_hot: bool = True
) -> Dataset:
    """MNIST from files already on disk (torchvision's ``MNIST/raw`` idx files; nothing is downloaded).

    Args:
        data_dir: a folder holding the four idx files (see :func:`find_on_disk`).
        n_train: images drawn at random (by ``seed``) from the 60,000 training images.
        n_test: images drawn from the 10,000 test images.
        seed: seed of the subsets.
        one_hot: targets as one-hot float32 ``(N, 10)``; ``False`` gives int64 labels.

    Returns:
        A :class:`Dataset` with flat inputs ``(N, 784)`` (reshape to ``(N, 1, 28, 28)`` for a CNN).

    Raises:
        FileNotFoundError: the files are not under ``data_dir``.
    """
    folder = find_on_disk("mnist", data_dir)
    if folder is None:
        raise FileNotFoundError(
            f"MNIST's idx files ({', '.join(_MNIST_FILES['train'] + _MNIST_FILES['test'])}, optionally .gz) "
            f"are not in {data_dir} nor in its raw/ or MNIST/raw/; nothing is downloaded"
        )
    arrays = {
        split: tuple(_read_idx(_first_existing(folder, f)) for f in files) for split, files in _MNIST_FILES.items()
    }
    (Xtr, ytr), (Xte, yte) = arrays["train"], arrays["test"]
    return _image_dataset("mnist", Xtr, ytr, Xte, yte, n_train, n_test, seed, one_hot, 10)


def cifar10(
    data_dir: str | os.PathLike, n_train: int = 50_000, n_test: int = 10_000, seed: int = 0, one_hot: bool = True
) -> Dataset:
    """CIFAR-10 from files already on disk (the python batches of ``cifar-10-batches-py``).

    Args:
        data_dir: a folder holding ``data_batch_1`` … ``data_batch_5`` and ``test_batch``.
        n_train: images drawn at random (by ``seed``) from the 50,000 training images.
        n_test: images drawn from the 10,000 test images.
        seed: seed of the subsets.
        one_hot: targets as one-hot float32 ``(N, 10)``; ``False`` gives int64 labels.

    Returns:
        A :class:`Dataset` with flat inputs ``(N, 3072)`` in channel-major order (reshape to
        ``(N, 3, 32, 32)`` for a CNN).

    Raises:
        FileNotFoundError: the files are not under ``data_dir``.
    """
    import pickle

    folder = find_on_disk("cifar10", data_dir)
    if folder is None:
        raise FileNotFoundError(
            f"CIFAR-10's python batches (data_batch_1..5, test_batch) are not in {data_dir} nor in its "
            f"cifar-10-batches-py/; nothing is downloaded"
        )

    def batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        return np.asarray(d[b"data"], dtype=np.uint8), np.asarray(d[b"labels"], dtype=np.int64)

    parts = [batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    Xtr, ytr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    Xte, yte = batch(folder / "test_batch")
    return _image_dataset("cifar10", Xtr, ytr, Xte, yte, n_train, n_test, seed, one_hot, 10)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": digits,
    "wine": wine,
    "breast_cancer": breast_cancer,
    "regression1d": regression1d,
}


def load(name: str, **kwargs) -> Dataset:
    """Load a data set by name; ``kwargs`` go to its loader.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(map(repr, DATASETS))}")
    return DATASETS[name](**kwargs)
