"""Calibration and accuracy metrics for predictive distributions.

Classification metrics take predicted class probabilities ``probs`` (shape (M, C), rows summing
to 1) and integer labels ``labels`` (shape (M,), values in ``[0, C)``); regression metrics take a
Gaussian predictive ``mean`` and ``var`` and targets ``y`` of one shape ((M,) or (M, C)). Every
metric returns a Python float, averaged over the M samples (and outputs).

Examples:
    >>> import torch
    >>> from ntkscale import metrics
    >>> p = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    >>> y = torch.tensor([0, 0])
    >>> metrics.accuracy(p, y)
    0.5
    >>> round(metrics.nll(p, y), 6)  # -(log 0.9 + log 0.4) / 2
    0.510826
    >>> round(metrics.brier_score(p, y), 6)  # ((0.1² + 0.1²) + (0.6² + 0.6²)) / 2
    0.37
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .solvers._utils import check_positive_int

__all__ = [
    "accuracy",
    "brier_score",
    "coverage",
    "expected_calibration_error",
    "gaussian_nll",
    "nll",
]


# -- classification ---------------------------------------------------------------------------


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of samples whose most probable class is the label.

    Args:
        probs: predicted probabilities (or any scores: only the arg-max is used).  # shape: (M, C)
        labels: integer class labels in ``[0, C)``.  # shape: (M,)
    """
    probs, labels = _check_classification(probs, labels, require_probs=False)
    return float((probs.argmax(-1) == labels).double().mean())


def nll(probs: Tensor, labels: Tensor, eps: float = 0.0) -> float:
    """Mean negative log-likelihood ``-(1/M) Σ_i log p_i[y_i]`` (natural log).

    Args:
        probs: predicted probabilities, rows summing to 1.  # shape: (M, C)
        labels: integer class labels in ``[0, C)``.  # shape: (M,)
        eps: floor on the probability of the label, so a confident mistake costs ``-log eps``
            rather than ``inf`` (default 0: no floor).
    """
    probs, labels = _check_classification(probs, labels)
    p = probs.double().gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if eps > 0:
        p = p.clamp_min(eps)
    return float(-torch.log(p).mean())


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Mean multi-class Brier score ``(1/M) Σ_i ‖p_i − onehot(y_i)‖²`` (in ``[0, 2]``).

    Args:
        probs: predicted probabilities, rows summing to 1.  # shape: (M, C)
        labels: integer class labels in ``[0, C)``.  # shape: (M,)
    """
    probs, labels = _check_classification(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    return float(((probs.double() - onehot) ** 2).sum(-1).mean())


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width confidence bins.

    ``ECE = Σ_b (n_b / M) |acc_b − conf_b|``, where bin b holds the samples whose confidence
    ``max_c p_ic`` lies in ``(b/B, (b+1)/B]`` (the first bin also takes confidence 0), ``acc_b``
    is their accuracy and ``conf_b`` their mean confidence. Empty bins contribute nothing.

    Args:
        probs: predicted probabilities, rows summing to 1.  # shape: (M, C)
        labels: integer class labels in ``[0, C)``.  # shape: (M,)
        bins: number of equal-width bins B on ``[0, 1]``.

    Example:
        >>> import torch
        >>> p = torch.tensor([[0.95, 0.05], [0.3, 0.7], [0.8, 0.2]])
        >>> y = torch.tensor([0, 0, 0])
        >>> # bins (0.5,0.75]: {0.7, wrong}; (0.75, 1]: {0.95 right, 0.8 right}
        >>> round(expected_calibration_error(p, y, bins=4), 6)  # (1/3)|0-0.7| + (2/3)|1-0.875|
        0.316667
    """
    probs, labels = _check_classification(probs, labels)
    check_positive_int(bins, "bins")
    conf, pred = probs.double().max(-1)
    correct = (pred == labels).double()
    # bin b holds conf in (b/B, (b+1)/B]; ceil(conf*B) - 1, with conf = 0 in bin 0
    idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    M = conf.numel()
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    sum_conf = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, conf)
    sum_acc = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, correct)
    nonempty = count > 0
    gap = (sum_acc[nonempty] - sum_conf[nonempty]).abs()  # n_b |acc_b - conf_b|
    return float(gap.sum() / M)


# -- regression --------------------------------------------------------------------------------


def gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> float:
    """Mean Gaussian negative log-likelihood ``½ log(2π var) + (y − mean)² / (2 var)``.

    Args:
        mean: predictive means.  # shape: (M,) or (M, C)
        var: predictive variances, > 0 (add the likelihood noise for the noisy-target
            predictive).  # shape: as mean
        y: targets.  # shape: as mean
    """
    mean, var, y = _check_regression(mean, var, y)
    return float((0.5 * torch.log(2 * math.pi * var) + (y - mean) ** 2 / (2 * var)).mean())


def coverage(mean: Tensor, var: Tensor, y: Tensor, level: float = 0.95) -> float:
    """Fraction of targets inside the central ``level`` interval ``mean ± z·sqrt(var)``.

    ``z = Φ⁻¹((1 + level)/2)`` (1.959964 for 0.95). A calibrated predictive covers about
    ``level`` of the targets.

    Args:
        mean: predictive means.  # shape: (M,) or (M, C)
        var: predictive variances, > 0.  # shape: as mean
        y: targets.  # shape: as mean
        level: the interval's probability mass, in (0, 1).
    """
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be a float in (0, 1), got {level!r}")
    mean, var, y = _check_regression(mean, var, y)
    z = math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(float(level), dtype=torch.float64)))
    return float(((y - mean).abs() <= z * var.sqrt()).double().mean())


# -- checks ------------------------------------------------------------------------------------


def _check_classification(probs, labels, require_probs: bool = True) -> tuple[Tensor, Tensor]:
    if not torch.is_tensor(probs) or probs.dim() != 2:
        what = tuple(probs.shape) if torch.is_tensor(probs) else type(probs).__name__
        raise ValueError(f"probs must be a tensor of shape (M, C), got {what}")
    M, C = probs.shape
    if M == 0:
        raise ValueError("probs is empty (M = 0)")
    if not torch.is_tensor(labels) or labels.shape != (M,):
        what = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"labels must be a tensor of shape ({M},) to match probs {(M, C)}, got {what}")
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()) or not bool((labels == labels.round()).all()):
            raise ValueError("labels must be integer class indices, got non-integer values")
        labels = labels.long()
    elif labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.long().to(probs.device)
    if bool(((labels < 0) | (labels >= C)).any()):
        bad = labels[(labels < 0) | (labels >= C)]
        raise ValueError(f"labels must lie in [0, {C}) for C = {C} classes; got {int(bad[0])}")
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("probs contains NaN or inf")
    if require_probs:
        sums = probs.double().sum(-1)
        if bool((probs < 0).any()) or not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            raise ValueError(
                "probs must be probabilities: entries >= 0 and rows summing to 1 (apply softmax to logits)"
            )
    return probs, labels


def _check_regression(mean, var, y) -> tuple[Tensor, Tensor, Tensor]:
    for name, t in (("mean", mean), ("var", var), ("y", y)):
        if not torch.is_tensor(t):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if not (mean.shape == var.shape == y.shape) or mean.dim() not in (1, 2) or mean.numel() == 0:
        raise ValueError(
            f"mean, var and y must share one non-empty shape (M,) or (M, C); got "
            f"{tuple(mean.shape)}, {tuple(var.shape)}, {tuple(y.shape)}"
        )
    mean, var, y = mean.double(), var.double(), y.double().to(mean.device)
    var = var.to(mean.device)
    if not bool(torch.isfinite(var).all()) or bool((var <= 0).any()):
        raise ValueError("var must be finite and > 0 (add the likelihood noise to the posterior variance)")
    return mean, var, y
