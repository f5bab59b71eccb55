"""The autodiff backend's linearized products against its recomputed fallback and a float64
reference NTK built from explicit autograd Jacobians (tests/cases.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import ntkscale as nks

from .cases import make, reference_ntk

CASES = ["mlp-C3", "mlp-scalar", "cnn-C2", "resnet-C2", "shared-C2", "seqlinear-C2",
         "transformer-C3", "vit-C2"]


def _pair(model, X, X2=None, chunk_size=4):
    """(linearized, recomputed) autodiff operators on the same model and data."""
    lin = nks.NTKOperator(model, X, X2, backend="autodiff", chunk_size=chunk_size)
    rec = nks.NTKOperator(model, X, X2, backend="autodiff", chunk_size=chunk_size, memory_budget=1)
    return lin, rec


@pytest.mark.parametrize("case", CASES)
def test_linearized_products_match_recomputed_and_reference(case, caplog):
    model, X, _ = make(case, n=9)
    lin, rec = _pair(model, X)
    ref = reference_ntk(model, X)
    g = torch.Generator().manual_seed(3)
    with caplog.at_level(logging.INFO, logger="ntkscale"):
        # the first product builds the linearization (k = 1 and k > 1 first calls differ)
        for k in (1, 3, 1, 10, 2):
            V = torch.randn(ref.shape[0], k, generator=g, dtype=torch.float64)
            a, b = lin @ V, rec @ V
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
            torch.testing.assert_close(a, ref @ V, rtol=1e-10, atol=1e-10)
    assert any("linearized the network over 9 samples" in r.message for r in caplog.records)
    assert any("over memory_budget" in r.message for r in caplog.records)


@pytest.mark.parametrize("k", [1, 4])
def test_first_product_with_several_columns(k):
    model, X, _ = make("mlp-C3", n=7)
    lin, rec = _pair(model, X, chunk_size=3)
    V = torch.randn(7 * 3, k, dtype=torch.float64)
    torch.testing.assert_close(lin @ V, rec @ V, rtol=0, atol=1e-12)
    torch.testing.assert_close(lin @ V, rec @ V, rtol=0, atol=1e-12)  # and from the cache


@pytest.mark.filterwarnings("ignore::ntkscale.SmallChunkWarning")
@pytest.mark.parametrize("chunk_size", [25, 400])
def test_several_columns_in_small_and_large_chunks(chunk_size):
    """Small chunks send several right-hand sides through one batched backward; chunks whose
    activations pass ``BATCHED_COLUMNS_MAX_BYTES`` (400 samples here: about 3 MiB) one at a time.
    Both agree with the recomputed products."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                          nn.Linear(256, 2)).double()
    X = torch.randn(400, 8, dtype=torch.float64)
    lin, rec = _pair(model, X, chunk_size=chunk_size)
    g = torch.Generator().manual_seed(1)
    lin @ torch.randn(800, 1, generator=g, dtype=torch.float64)  # builds the linearization
    V = torch.randn(800, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(lin @ V, rec @ V, rtol=1e-12, atol=1e-10)


def test_cross_kernel_and_blocks():
    model, X, Xt = make("cnn-C2", n=8, m=5)
    lin, rec = _pair(model, Xt, X)
    V = torch.randn(8 * 2, 3, dtype=torch.float64)
    torch.testing.assert_close(lin @ V, rec @ V, rtol=0, atol=1e-12)
    torch.testing.assert_close(lin @ V, reference_ntk(model, Xt, X) @ V, rtol=1e-10, atol=1e-10)
    K = nks.NTKOperator(model, X, backend="autodiff", chunk_size=3)
    K @ torch.randn(16, 1, dtype=torch.float64)  # builds the linearization
    torch.testing.assert_close(K.to_dense(), reference_ntk(model, X), rtol=1e-10, atol=1e-10)


def test_factor_bytes_reports_the_linearization():
    model, X, _ = make("mlp-C3", n=20)
    K = nks.NTKOperator(model, X, backend="autodiff")
    per_sample = K.factor_bytes() / 20
    assert per_sample > 0
    # two copies of the input and the layer outputs per sample, and one of the parameters
    P = sum(p.numel() for p in model.parameters())
    assert K.factor_bytes() == 2 * 20 * (5 + 12 + 12 + 10 + 10 + 3) * 8 + P * 8


def test_structured_factor_bytes_count_the_linearization_of_unfactored_parameters():
    """A LayerNorm's parameters go through autodiff, whose linearization the structured operator
    keeps within memory_budget: factor_bytes() counts it then, and only then."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3)).double()
    X = torch.randn(20, 5, dtype=torch.float64)
    roomy = nks.NTKOperator(model, X, backend="structured").factor_bytes()
    lin = nks.NTKOperator(model, X, backend="autodiff").factor_bytes()  # over all parameters
    tight = nks.NTKOperator(model, X, backend="structured", memory_budget=lin // 2).factor_bytes()
    P = sum(p.numel() for p in model.parameters())
    P_rest = sum(p.numel() for p in model[1].parameters())
    assert roomy - tight == lin - (P - P_rest) * 8


class _OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again (forward mode and vmap work)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


class _OnceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(_OnceDifferentiableTanh.apply(self.a(x)))


def test_fallback_when_a_backward_is_not_differentiable(caplog):
    torch.manual_seed(0)
    model = _OnceNet().double()
    X = torch.randn(6, 4, dtype=torch.float64)
    K = nks.NTKOperator(model, X, backend="autodiff")
    V = torch.randn(12, 2, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="ntkscale"):
        out = K @ V
    assert any("recompute" in r.message for r in caplog.records)
    torch.testing.assert_close(out, reference_ntk(model, X) @ V, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(K @ V, out, rtol=0, atol=1e-12)


def test_gradient_through_the_product_still_flows():
    model, X, _ = make("mlp-C3", n=5)
    K = nks.NTKOperator(model, X, backend="autodiff")
    K @ torch.randn(15, 1, dtype=torch.float64)  # linearization built
    v = torch.randn(15, 1, dtype=torch.float64, requires_grad=True)
    (K @ v).square().sum().backward()
    Kd = reference_ntk(model, X)
    torch.testing.assert_close(v.grad, 2 * Kd @ (Kd @ v.detach()), rtol=1e-10, atol=1e-10)
