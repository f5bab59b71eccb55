"""Attention models as users build them: the operator evaluates them its own way (MHA fast path
off, the math SDPA kernel) around every product, and leaves the user's settings as they were."""

from __future__ import annotations

import logging

import torch
from torch import nn

import ntkscale as nks

from .cases import make, reference_ntk


class _Recorder(nn.Module):
    """Records the attention settings in force each time the model is evaluated."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.seen.append((torch.backends.mha.get_fastpath_enabled(), torch.backends.cuda.flash_sdp_enabled()))
        return self.inner(x)


def test_products_run_with_fast_path_off_and_math_attention():
    model, X, _ = make("transformer-C3")
    rec = _Recorder(model)
    assert torch.backends.mha.get_fastpath_enabled() and torch.backends.cuda.flash_sdp_enabled()
    K = nks.NTKOperator(rec, X, backend="autodiff")
    v = torch.randn(K.shape[1], dtype=torch.float64)
    torch.testing.assert_close(K @ v, reference_ntk(model, X) @ v, rtol=1e-9, atol=1e-10)
    assert rec.seen and all(s == (False, False) for s in rec.seen)
    # the user's global settings are restored
    assert torch.backends.mha.get_fastpath_enabled() and torch.backends.cuda.flash_sdp_enabled()


def test_auto_runs_on_a_transformer(caplog):
    model, X, Xt = make("transformer-C3")
    with caplog.at_level(logging.INFO, logger="ntkscale"):
        K = nks.NTKOperator(model, X)
    assert "picked" in caplog.text
    torch.testing.assert_close(K.to_dense(), reference_ntk(model, X), rtol=1e-9, atol=1e-10)


def test_structured_sends_attention_out_proj_through_autodiff(caplog):
    """out_proj's weight is used functionally by attention: the structured backend says so and
    computes its part by autodiff; the other Linear layers keep their factors."""
    model, X, _ = make("vit-C2")
    with caplog.at_level(logging.INFO, logger="ntkscale"):
        K = nks.NTKOperator(model, X, backend="structured")
        K @ torch.randn(K.shape[1], dtype=torch.float64)
    assert "'attn.out_proj' is not called in the forward pass" in caplog.text
    assert "'head'" not in caplog.text and "'mlp.0'" not in caplog.text
    assert K.factor_bytes() > 0
