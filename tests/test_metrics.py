"""``ntkscale.metrics`` against values computed by hand on tiny inputs."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import ntkscale.metrics as metrics_module
from ntkscale import metrics

P = torch.tensor(
    [
        [0.70, 0.20, 0.10],  # conf 0.70, pred 0, label 0: right
        [0.10, 0.30, 0.60],  # conf 0.60, pred 2, label 1: wrong
        [0.05, 0.90, 0.05],  # conf 0.90, pred 1, label 1: right
        [0.34, 0.33, 0.33],  # conf 0.34, pred 0, label 2: wrong
    ],
    dtype=torch.float64,
)
Y = torch.tensor([0, 1, 1, 2])


def test_accuracy_nll_brier_by_hand():
    assert metrics.accuracy(P, Y) == 0.5
    expected_nll = -(math.log(0.70) + math.log(0.30) + math.log(0.90) + math.log(0.33)) / 4
    assert metrics.nll(P, Y) == pytest.approx(expected_nll, rel=1e-12)
    brier = [
        0.3**2 + 0.2**2 + 0.1**2,
        0.1**2 + 0.7**2 + 0.6**2,
        0.05**2 + 0.1**2 + 0.05**2,
        0.34**2 + 0.33**2 + 0.67**2,
    ]
    assert metrics.brier_score(P, Y) == pytest.approx(sum(brier) / 4, rel=1e-12)


def test_ece_by_hand_with_empty_bins():
    # bins=5: (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]
    #   0.34 wrong -> bin 1; 0.60 wrong -> bin 2; 0.70 right -> bin 3; 0.90 right -> bin 4; bin 0 empty
    expected = (abs(0 - 0.34) + abs(0 - 0.60) + abs(1 - 0.70) + abs(1 - 0.90)) / 4
    assert metrics.expected_calibration_error(P, Y, bins=5) == pytest.approx(expected, rel=1e-12)
    # bins=2: (0, .5] holds 0.34 (wrong); (.5, 1] holds 0.6 (wrong), 0.7, 0.9 (right)
    expected2 = (abs(0 - 0.34) + 3 * abs(2 / 3 - (0.6 + 0.7 + 0.9) / 3)) / 4
    assert metrics.expected_calibration_error(P, Y, bins=2) == pytest.approx(expected2, rel=1e-12)
    # many bins: every sample alone, most bins empty -> mean |correct - conf|
    expected_many = (0.34 + 0.60 + 0.30 + 0.10) / 4
    assert metrics.expected_calibration_error(P, Y, bins=1000) == pytest.approx(expected_many, rel=1e-12)
    # one bin: |accuracy - mean confidence|
    one = abs(0.5 - (0.34 + 0.6 + 0.7 + 0.9) / 4)
    assert metrics.expected_calibration_error(P, Y, bins=1) == pytest.approx(one, rel=1e-12)


def test_ece_bin_edges_are_right_closed():
    p = torch.tensor([[0.5, 0.5], [0.75, 0.25]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    # bins=4: 0.5 -> (0.25, 0.5] (pred 0, right), 0.75 -> (0.5, 0.75] (pred 0, wrong)
    assert metrics.expected_calibration_error(p, y, bins=4) == pytest.approx((0.5 + 0.75) / 2, rel=1e-12)


def test_perfectly_calibrated_and_perfect_predictions():
    onehot = torch.eye(3, dtype=torch.float64)
    y = torch.arange(3)
    assert metrics.nll(onehot, y) == 0.0
    assert metrics.brier_score(onehot, y) == 0.0
    assert metrics.expected_calibration_error(onehot, y) == 0.0
    assert metrics.accuracy(onehot, y) == 1.0
    # a confident mistake: nll inf, floored by eps
    assert metrics.nll(onehot, torch.tensor([1, 1, 2])) == math.inf
    assert metrics.nll(onehot, torch.tensor([1, 1, 2]), eps=1e-10) == pytest.approx(-math.log(1e-10) / 3)


def test_gaussian_nll_and_coverage_by_hand():
    mean = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    var = torch.tensor([1.0, 4.0, 0.25, 1.0], dtype=torch.float64)
    y = torch.tensor([0.5, 1.0, 0.0, 5.0], dtype=torch.float64)
    terms = [0.5 * math.log(2 * math.pi * v) + (t - m) ** 2 / (2 * v) for m, v, t in zip(mean.tolist(), var.tolist(), y.tolist())]
    assert metrics.gaussian_nll(mean, var, y) == pytest.approx(sum(terms) / 4, rel=1e-12)
    # |y - m| / sd = 0.5, 0, 2, 3: inside 95% (z = 1.96) for the first two only
    assert metrics.coverage(mean, var, y, level=0.95) == 0.5
    # z(0.99) = 2.5758: also covers the third
    assert metrics.coverage(mean, var, y, level=0.99) == 0.75
    # z(0.5) = 0.6745: 0.5 and 0 inside
    assert metrics.coverage(mean, var, y, level=0.5) == 0.5
    # (M, C) shapes average over both
    assert metrics.gaussian_nll(mean.reshape(2, 2), var.reshape(2, 2), y.reshape(2, 2)) == pytest.approx(sum(terms) / 4)


def test_coverage_of_a_calibrated_gaussian_is_its_level():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    sd = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    y = mean + sd * torch.randn(n, generator=g, dtype=torch.float64)
    for level in (0.5, 0.9, 0.95):
        # binomial standard error sqrt(l(1-l)/n) <= 1.2e-3; allow 5 of them
        assert metrics.coverage(mean, sd**2, y, level=level) == pytest.approx(level, abs=6e-3)


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (torch.tensor([0.5, 0.5]), torch.tensor([0]), "shape \\(M, C\\)"),
        (P, torch.tensor([0, 1, 3, 0]), "lie in \\[0, 3\\)"),
        (P, torch.tensor([0, 1, -1, 0]), "lie in \\[0, 3\\)"),
        (P, torch.tensor([0.0, 1.5, 1.0, 2.0]), "integer"),
        (P, torch.tensor([0, 1, 1]), "shape \\(4,\\)"),
        (P * 2, Y, "rows summing to 1"),
    ],
)
def test_classification_errors(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics.nll(probs, labels)


def test_regression_errors_and_bins():
    m = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="var must be finite and > 0"):
        metrics.gaussian_nll(m, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), m)
    with pytest.raises(ValueError, match="share one"):
        metrics.coverage(m, torch.ones(2, dtype=torch.float64), m)
    with pytest.raises(ValueError, match="level"):
        metrics.coverage(m, torch.ones(3, dtype=torch.float64), m, level=1.0)
    with pytest.raises(ValueError, match="bins"):
        metrics.expected_calibration_error(P, Y, bins=0)


def test_docstring_examples():
    failures, _ = doctest.testmod(metrics_module, verbose=False)
    assert failures == 0
