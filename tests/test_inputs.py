"""Errors on inputs and models that say what to do (each reproduced from a user's first try)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ntkscale as nks
from ntkscale import NonDeterministicModelError

from .cases import CASES, make, reference_ntk


@pytest.mark.parametrize("case", ["mlp-C1", "mlp-scalar", "cnn-C2", "transformer-C3"])
def test_single_sample_without_batch_dim_says_unsqueeze(case):
    model, X, _ = make(case)
    with pytest.raises(ValueError, match=r"single sample without its batch dimension.*X\.unsqueeze\(0\)"):
        nks.NTKOperator(model, X[0])
    K = nks.NTKOperator(model, X[0].unsqueeze(0))  # and that advice works
    assert K.shape == (CASES[case].C, CASES[case].C)


def test_wrong_shape_batch_gets_no_single_sample_hint():
    model, _, _ = make("mlp-C1")
    with pytest.raises(ValueError, match="model rejected it") as err:
        nks.NTKOperator(model, torch.randn(6, 4, dtype=torch.float64))
    assert "unsqueeze" not in str(err.value)


def test_matmul_with_numpy_is_a_clear_type_error():
    model, X, _ = make("mlp-C3")
    K = nks.NTKOperator(model, X)
    v = np.ones(18)
    with pytest.raises(TypeError, match=r"K @ v needs a torch.Tensor.*numpy.ndarray.*torch.as_tensor\(v, dtype=torch.float64"):
        K @ v
    with pytest.raises(TypeError, match="K @ v needs a torch.Tensor"):
        K.matmul([1.0] * 18)
    torch.testing.assert_close(K @ torch.as_tensor(v), reference_ntk(model, X) @ torch.as_tensor(v))


def test_allow_nondeterministic_is_refused_with_what_to_do():
    torch.manual_seed(0)
    drop = nn.Sequential(nn.Linear(5, 32), nn.Dropout(0.5), nn.Linear(32, 2)).double()
    X = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(NonDeterministicModelError, match=r"no longer supported.*Call model\.eval\(\)"):
        nks.NTKOperator(drop, X, allow_nondeterministic=True)


def test_batchnorm_train_mode_on_one_sample_says_eval():
    """BatchNorm in train mode fails on a batch of one: the error is about train mode, not X."""
    bn = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).double().train()
    X = torch.randn(1, 5, dtype=torch.float64)
    with pytest.raises(NonDeterministicModelError, match=r"train mode with \['BatchNorm1d'\]\. Call model\.eval\(\)"):
        nks.NTKOperator(bn, X)


def test_batchnorm_advice_gives_the_batch_statistics_kernel():
    """The refusal's advice (batch statistics into running_mean/var, then eval) works and gives
    the kernel of the network normalized by that batch's statistics, frozen."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).double()
    X = torch.randn(7, 5, dtype=torch.float64)
    with torch.no_grad():
        h = net[0](X)
        net[1].running_mean.copy_(h.mean(0))
        net[1].running_var.copy_(h.var(0, unbiased=False))
    net.eval()
    K = nks.NTKOperator(net, X, backend="structured")

    class Frozen(nn.Module):  # the train-mode normalization with this batch's statistics held fixed
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            lin, bn, _, head = self.net
            mean, var = bn.running_mean, bn.running_var
            return head(torch.tanh((lin(x) - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias))

    torch.testing.assert_close(K.to_dense(), reference_ntk(Frozen(), X), rtol=1e-10, atol=1e-12)
