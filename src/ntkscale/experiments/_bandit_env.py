"""Contextual bandits from classification data: the environment, the encoding, regret.

A classification set with ``K`` classes becomes a ``K``-armed contextual bandit: each round
shows one sample ``x`` (its context), the policy picks an arm ``a``, and the reward is 1 if
``a`` is the sample's class and 0 otherwise. The best arm always pays 1, so the regret of a
round is ``1 − reward`` and the cumulative regret counts the wrong picks.

Contexts use NeuralUCB's disjoint encoding (Zhou, Li & Gu 2020, Section 6): arm ``a``'s
feature vector for a context ``x ∈ R^d`` is the ``K·d`` vector that holds ``x`` in block ``a``
(entries ``a·d … (a+1)·d − 1``) and zeros elsewhere, so one scalar-output network scores every
arm.

The policies here are references (tests and sanity checks); the learned policies live in
:mod:`ntkscale.experiments._bandit_policy` and the study in :mod:`ntkscale.experiments.bandits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BanditEnvironment",
    "BanditRun",
    "OraclePolicy",
    "Policy",
    "UniformPolicy",
    "disjoint_encoding",
    "load_bandit_data",
    "run_policy",
]


def disjoint_encoding(x: Tensor, num_arms: int) -> Tensor:
    """Arm features of contexts in the disjoint encoding: ``x`` in the arm's block, zeros elsewhere.

    Args:
        x: contexts.  # shape: (d,) or (n, d)
        num_arms: ``K ≥ 1``.

    Returns:
        ``out[..., a, a*d:(a+1)*d] = x`` and 0 elsewhere.  # shape: (K, K*d) or (n, K, K*d)

    Raises:
        ValueError: for ``num_arms < 1`` or ``x`` not 1-D or 2-D.
    """
    if not isinstance(num_arms, int) or num_arms < 1:
        raise ValueError(f"num_arms must be a positive int, got {num_arms!r}")
    if x.dim() not in (1, 2):
        raise ValueError(f"contexts must have shape (d,) or (n, d), got {tuple(x.shape)}")
    single = x.dim() == 1
    x2 = x.unsqueeze(0) if single else x
    n, d = x2.shape
    eye = torch.eye(num_arms, dtype=x.dtype, device=x.device)
    out = (eye[None, :, :, None] * x2[:, None, None, :]).reshape(n, num_arms, num_arms * d)
    return out[0] if single else out


@dataclass
class BanditEnvironment:
    """A ``K``-armed contextual bandit over a classification set, for a fixed horizon.

    The contexts of the ``num_rounds`` rounds are the samples in a random order drawn from
    ``seed`` (a fresh permutation each time the data run out), so two policies given the same
    seed see the same contexts in the same order.

    Args:
        X: the samples (standardized features).  # shape: (N, d)
        labels: their classes in ``0 … K−1``.  # shape: (N,)
        num_rounds: the horizon ``T ≥ 1``.
        seed: seed of the order.
        num_arms: ``K`` (default ``labels.max() + 1``).
        name: the data set's name.

    Raises:
        ValueError: for mismatched sizes, labels outside ``0 … K−1``, or ``num_rounds < 1``.
    """

    X: Tensor
    labels: Tensor
    num_rounds: int
    seed: int = 0
    num_arms: int | None = None
    name: str = "bandit"

    def __post_init__(self):
        if self.X.dim() != 2:
            raise ValueError(f"X must have shape (N, d), got {tuple(self.X.shape)}")
        labels = torch.as_tensor(self.labels).long().reshape(-1)
        if labels.numel() != self.X.shape[0]:
            raise ValueError(f"labels has {labels.numel()} entries but X has {self.X.shape[0]} rows")
        K = int(labels.max().item()) + 1 if self.num_arms is None else int(self.num_arms)
        if labels.min().item() < 0 or labels.max().item() >= K:
            raise ValueError(f"labels must lie in 0 … {K - 1} (num_arms={K}), got {labels.min()} … {labels.max()}")
        if not isinstance(self.num_rounds, int) or self.num_rounds < 1:
            raise ValueError(f"num_rounds must be a positive int, got {self.num_rounds!r}")
        self.labels, self.num_arms = labels, K
        rng = np.random.default_rng(self.seed)
        N = self.X.shape[0]
        reps = -(-self.num_rounds // N)
        order = np.concatenate([rng.permutation(N) for _ in range(reps)])[: self.num_rounds]
        self.order = torch.from_numpy(order)

    @property
    def dim(self) -> int:
        """``d``, the context dimension (arm features have ``K·d``)."""
        return int(self.X.shape[1])

    def context(self, t: int) -> Tensor:
        """The context of round ``t`` (0-based).  # shape: (d,)"""
        return self.X[self.order[t]]

    def arm_features(self, t: int) -> Tensor:
        """The ``K`` arms' features of round ``t`` in the disjoint encoding.  # shape: (K, K*d)"""
        return disjoint_encoding(self.context(t), self.num_arms)

    def label(self, t: int) -> int:
        """The best arm of round ``t`` (the context's class)."""
        return int(self.labels[self.order[t]])

    def reward(self, t: int, arm: int) -> float:
        """1.0 if ``arm`` is round ``t``'s class, else 0.0."""
        if not 0 <= int(arm) < self.num_arms:
            raise ValueError(f"arm must lie in 0 … {self.num_arms - 1}, got {arm}")
        return 1.0 if int(arm) == self.label(t) else 0.0

    def regret(self, t: int, arm: int) -> float:
        """Best reward minus the reward of ``arm`` in round ``t``: ``1 − reward``."""
        return 1.0 - self.reward(t, arm)


class Policy(Protocol):
    """What :func:`run_policy` asks of a policy."""

    def select(self, t: int, features: Tensor) -> int:
        """The arm to pull in round ``t`` given the arms' features (K, K*d)."""

    def observe(self, t: int, arm: int, features: Tensor, reward: float) -> None:
        """Learn from the reward of the pulled arm."""


class OraclePolicy:
    """Pulls the true class: regret 0 (a reference)."""

    def __init__(self, env: BanditEnvironment):
        self.env = env

    def select(self, t: int, features: Tensor) -> int:
        return self.env.label(t)

    def observe(self, t: int, arm: int, features: Tensor, reward: float) -> None:
        pass


class UniformPolicy:
    """Pulls an arm uniformly at random: expected regret ``1 − 1/K`` per round on a balanced set."""

    def __init__(self, num_arms: int, seed: int = 0):
        self.num_arms = num_arms
        self.gen = torch.Generator().manual_seed(seed)

    def select(self, t: int, features: Tensor) -> int:
        return int(torch.randint(self.num_arms, (1,), generator=self.gen))

    def observe(self, t: int, arm: int, features: Tensor, reward: float) -> None:
        pass


@dataclass
class BanditRun:
    """One policy's run.

    Attributes:
        cumulative_regret: regret summed over rounds ``0 … t``, one value per round.
        arms: the arm pulled each round.
        seconds: wall time.
    """

    cumulative_regret: list[float]
    arms: list[int]
    seconds: float


def run_policy(env: BanditEnvironment, policy: Policy, progress=None) -> BanditRun:
    """Play ``policy`` for the environment's horizon.

    Args:
        env: the bandit.
        policy: anything with ``select(t, features)`` and ``observe(t, arm, features, reward)``.
        progress: an optional tqdm-like bar, updated once per round.

    Returns:
        A :class:`BanditRun`.
    """
    import time

    t0 = time.perf_counter()
    total, cum, arms = 0.0, [], []
    for t in range(env.num_rounds):
        feats = env.arm_features(t)
        arm = int(policy.select(t, feats))
        reward = env.reward(t, arm)
        policy.observe(t, arm, feats, reward)
        total += 1.0 - reward
        cum.append(total)
        arms.append(arm)
        if progress is not None:
            progress.update(1)
    return BanditRun(cumulative_regret=cum, arms=arms, seconds=time.perf_counter() - t0)


DISK_DATASETS = ("mnist", "cifar10")


def load_bandit_data(name: str, data_dir: str | Path | None = None, size: int = 2000) -> tuple[Tensor, Tensor]:
    """A classification set as ``(X, labels)``, features standardized and flattened.

    ``"digits"``, ``"wine"`` and ``"breast_cancer"`` come whole from scikit-learn (through
    :mod:`ntkscale.data`); ``"mnist"`` and ``"cifar10"`` are ``size`` training images drawn (seed
    0) from the files already under ``data_dir`` (:func:`ntkscale.data.find_on_disk`; nothing is
    downloaded).

    Raises:
        FileNotFoundError: a disk data set without ``data_dir`` or not found under it.
        ValueError: an unknown name.
    """
    from .. import data

    if name in ("digits", "wine", "breast_cancer"):
        n = {"digits": 1797, "wine": 178, "breast_cancer": 569}[name]
        ds = data.DATASETS[name](n_train=n, n_test=0, seed=0, one_hot=False)
        return ds.X_train, ds.y_train.long()
    if name not in DISK_DATASETS:
        raise ValueError(f"unknown bandit data set {name!r}; expected digits, wine, breast_cancer, mnist or cifar10")
    if data_dir is None:
        raise FileNotFoundError(f"{name} is read from files on disk; pass --data-dir (nothing is downloaded)")
    loader = data.mnist if name == "mnist" else data.cifar10
    ds = loader(data_dir, n_train=size, n_test=0, seed=0, one_hot=False)
    return ds.X_train.reshape(size, -1), ds.y_train.long()


def bandit_data_on_disk(data_dir: str | Path | None) -> list[str]:
    """Which of :data:`DISK_DATASETS` are under ``data_dir`` (empty without a folder)."""
    if data_dir is None:
        return []
    from ..data import find_on_disk

    return [n for n in DISK_DATASETS if find_on_disk(n, data_dir) is not None]
