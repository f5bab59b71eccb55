"""Memory as promised: factors built in place (peak RSS in a fresh process), chunked input
checks, and a warning for a chunk far below the memory budget."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import ntkscale as nks

from .cases import make, reference_ntk

_PEAK_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, torch
    import ntkscale as nks

    torch.manual_seed(0)
    n, budget = int(sys.argv[1]), int(sys.argv[2])
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    X = torch.randn(n, 32)
    K = nks.NTKOperator(model, X, backend="structured", memory_budget=budget)
    factor_bytes = K.factor_bytes()
    v = torch.randn(n * 10)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    gc.collect()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    K @ v  # the first product builds and caches the factors
    print(json.dumps({"factor_bytes": factor_bytes, "peak_growth": status("VmHWM") - before}))
    """
)


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_structured_factors_peak_within_factor_bytes():
    """The factor cache is written chunk by chunk into preallocated tensors: the peak during the
    first product is the factors plus one chunk's temporaries (the budget is 16 MiB here against
    132 MiB of factors), not the parts and their concatenation (2.2x before)."""
    n, budget = 6000, 16 * 2**20
    res = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(n), str(budget)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert rec["factor_bytes"] == n * (32 + 256 + 256 + 10 * (256 + 256 + 10)) * 4
    assert rec["peak_growth"] <= 1.2 * rec["factor_bytes"], rec


def test_factor_build_across_chunks_matches_reference():
    """Several chunks (budget-bound factor passes) fill the same factors as one pass."""
    model, X, _ = make("seqlinear-C2", n=9)
    K = nks.NTKOperator(model, X, backend="structured", memory_budget=1)
    torch.testing.assert_close(K.to_dense(), reference_ntk(model, X), rtol=1e-10, atol=1e-12)


def test_small_chunk_warns_with_the_knob():
    model, X, _ = make("mlp-C3", n=40)
    with pytest.warns(nks.SmallChunkWarning, match=r"chunk_size=1 is far below the 40 samples.*chunk_size=None"):
        K = nks.NTKOperator(model, X, backend="autodiff", chunk_size=1)
    assert K.chunk_size == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nks.NTKOperator(model, X, backend="autodiff", chunk_size=20)  # within 8x: no warning
        nks.NTKOperator(model, X, backend="autodiff")


def test_data_check_is_chunked_and_finds_the_bad_sample(monkeypatch):
    """NaN/inf in X is found by a check over slices of at most 16 MiB (no temporaries the size
    of X), and the first bad sample is named."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 2))
    X = torch.randn(6000, 1000)  # 24 MB
    sizes = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: sizes.append(t.numel()) or real(t))
    K = nks.NTKOperator(model, X, backend="autodiff")
    K @ torch.randn(K.shape[1])
    assert sizes and max(sizes) <= 16 * 2**20 // 4 < X.numel()
    X[5999, 3] = float("inf")
    X[4100, 7] = float("nan")
    with pytest.raises(ValueError, match=r"X contains NaN or inf \(in 2 of 6000 samples, first at index 4100\)"):
        nks.NTKOperator(model, X)


def test_debug_setting():
    assert nks.settings.debug.on() is False
    with nks.settings.debug(True):
        assert nks.settings.debug.on() is True
        model, X, _ = make("mlp-C1")
        K = nks.NTKOperator(model, X)
        v = torch.ones(6, dtype=torch.float64)
        v[1] = float("nan")
        with pytest.raises(ValueError, match="right-hand side contains NaN or inf"):
            K @ v
    assert nks.settings.debug.on() is False
    with pytest.raises(ValueError, match="debug expects True or False"):
        nks.settings.debug(1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["autodiff", "structured"])
def test_gpu_product_checks_without_a_sync(backend):
    """On a GPU, the per-product vector check reads nothing back (debug off): a product runs
    under torch.cuda's sync debug mode "error"; with debug on, the check is made."""
    model, X, _ = make("mlp-C3")
    dev = torch.device("cuda")
    K = nks.NTKOperator(model.to(dev), X.to(dev), backend=backend)
    v = torch.randn(K.shape[1], dtype=torch.float64, device=dev)
    K @ v  # warm-up: caches, factors
    torch.cuda.set_sync_debug_mode("error")
    try:
        K @ v
    finally:
        torch.cuda.set_sync_debug_mode("default")
    v[0] = float("nan")
    with nks.settings.debug(True), pytest.raises(ValueError, match="NaN or inf"):
        K @ v
