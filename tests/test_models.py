"""``ntkscale.models``: shapes, initialization statistics, structured factoring, bad input.

Agreement of every backend with the dense float64 reference on these models is in
``test_operator.py`` (the ``models-*`` cases of ``cases.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkscale as nks
from ntkscale.backends.autodiff import AutodiffBackend
from ntkscale.models import CNN, MLP

from .cases import reference_ntk


def test_shapes_and_layers():
    torch.manual_seed(0)
    assert MLP(4, [8, 6], 3)(torch.randn(5, 4)).shape == (5, 3)
    assert CNN(2, [4, 5], 3, kernel_size=5)(torch.randn(2, 2, 7, 6)).shape == (2, 3)
    m = MLP(4, [8], 1, W_std=2.0, b_std=0.5)
    assert m[0].weight_scale == pytest.approx(2.0 / 2.0) and m[0].bias_scale == 0.5
    assert m[2].weight_scale == pytest.approx(2.0 / 8**0.5)
    c = CNN(3, [4], 1, kernel_size=3, W_std=1.5)
    assert c[0].weight_scale == pytest.approx(1.5 / 27**0.5) and c[0].padding == (1, 1)
    s = MLP(4, [8], 1, parametrization="standard")
    assert s[0].weight_scale == 1.0 and s[0].bias_scale == 1.0


@pytest.mark.parametrize("parametrization", ["ntk", "standard"])
def test_initial_parameter_statistics(parametrization):
    torch.manual_seed(0)
    m = MLP(400, [300], 1, W_std=1.5, b_std=0.7, parametrization=parametrization)
    W, b = m[0].weight, m[0].bias
    if parametrization == "ntk":  # W, b ~ N(0, 1)
        assert abs(W.std().item() - 1) < 0.01 and abs(b.std().item() - 1) < 0.15
    else:  # W ~ N(0, W_std² / fan_in), b ~ N(0, b_std²)
        assert abs(W.std().item() - 1.5 / 20) < 0.01 * 1.5 / 20 and abs(b.std().item() - 0.7) < 0.15 * 0.7
    torch.manual_seed(0)
    again = MLP(400, [300], 1, W_std=1.5, b_std=0.7, parametrization=parametrization)
    assert torch.equal(again[0].weight, W)  # the global torch seed


def test_zero_bias_std_keeps_a_zero_gradient_bias():
    torch.manual_seed(0)
    m = MLP(3, [4], 1, b_std=0.0).double()
    assert "0.bias" in dict(m.named_parameters())
    X = torch.randn(3, 3, dtype=torch.float64)
    K = nks.NTKOperator(m, X, backend="structured", params=["0.bias", "2.bias"]).to_dense()
    assert K.abs().max() == 0


@pytest.mark.parametrize("backend", ["structured", "cuda", "keops"])
@pytest.mark.parametrize(
    "make,in_shape",
    [
        (lambda p: MLP(3, [6, 5], 2, activation="gelu", b_std=0.3, parametrization=p), (3,)),
        (lambda p: CNN(2, [3, 4], 2, activation="relu", b_std=0.3, parametrization=p), (2, 4, 4)),
    ],
)
@pytest.mark.parametrize("parametrization", ["ntk", "standard"])
def test_no_parameter_goes_through_autodiff(monkeypatch, backend, make, in_shape, parametrization):
    if backend == "keops":
        pytest.importorskip("pykeops")

    def refuse(*args, **kwargs):
        raise AssertionError("a parameter went through the autodiff fallback")

    torch.manual_seed(0)
    model = make(parametrization).double()
    X = torch.randn(4, *in_shape, dtype=torch.float64)
    Kref = reference_ntk(model, X)
    for meth in ("vjp", "jvp", "matmul", "diagonal", "gram"):
        monkeypatch.setattr(AutodiffBackend, meth, refuse)
    K = nks.NTKOperator(model, X, backend=backend)
    v = torch.randn(K.shape[0], 2, dtype=torch.float64)
    assert torch.allclose(K @ v, Kref @ v, rtol=1e-9, atol=1e-10)
    assert torch.allclose(K.diagonal(), Kref.diagonal(), rtol=1e-9, atol=1e-10)
    assert torch.allclose(K.to_dense(), Kref, rtol=1e-9, atol=1e-10)
    # the check can fail: a layer the structured backend does not know goes through autodiff
    with_norm = nn.Sequential(model, nn.LayerNorm(2)).double()
    with pytest.raises(AssertionError, match="autodiff fallback"):
        nks.NTKOperator(with_norm, X, backend=backend) @ v


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(activation="sigmoid"), r"activation must be one of \('relu', 'erf', 'tanh', 'gelu'\), got 'sigmoid'"),
        (dict(parametrization="mup"), r"parametrization must be one of \('ntk', 'standard'\), got 'mup'"),
        (dict(widths=[]), r"widths must be a non-empty list of positive ints"),
        (dict(widths=[4, 0]), r"widths must be a non-empty list of positive ints .*got \[4, 0\]"),
        (dict(widths=[-3]), r"widths must be a non-empty list of positive ints"),
        (dict(widths=[2.5]), r"widths must be a non-empty list of positive ints"),
        (dict(widths=5), r"widths must be a non-empty list of positive ints"),
        (dict(W_std=0.0), r"W_std must be a finite number > 0"),
        (dict(b_std=-0.1), r"b_std must be a finite number >= 0"),
        (dict(in_features=0), r"in_features must be a positive int"),
    ],
)
def test_mlp_bad_input(kwargs, match):
    args = {"in_features": 3, "widths": [4], "out_features": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        MLP(**args)


def test_cnn_bad_input():
    with pytest.raises(ValueError, match="channels must be a non-empty list of positive ints"):
        CNN(2, [], 1)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        CNN(2, [3], 1, kernel_size=2)
    with pytest.raises(ValueError, match="activation must be one of"):
        CNN(2, [3], 1, activation="swish")
    with pytest.raises(ValueError, match="parametrization must be one of"):
        CNN(2, [3], 1, parametrization="mean-field")
