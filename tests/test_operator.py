"""NTKOperator against an independent float64 reference ``J Jᵀ`` (see ``cases.py``).

Tolerances: float64 comparisons use rtol=1e-9 (round-off of a few reductions over P ≤ 300
parameters); float32 uses rtol=1e-4 relative to the kernel's largest entry (single-precision
accumulation over chunks and layers).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkscale as nks
from ntkscale import NonDeterministicModelError

from .cases import CASES, make, reference_ntk

try:
    import pykeops  # noqa: F401

    HAVE_KEOPS = True
except ImportError:  # pragma: no cover - optional extra
    HAVE_KEOPS = False

# "cuda" runs the csrc kernel on a GPU and its C++ twin on the CPU.
BACKENDS = [
    "autodiff",
    "dense",
    "structured",
    pytest.param("keops", marks=pytest.mark.skipif(not HAVE_KEOPS, reason="pykeops is not installed")),
    "cuda",
]
CORE_BACKENDS = ["autodiff", "dense", "structured"]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def close(a, b, dtype=torch.float64):
    tol = TOL[dtype]
    scale = b.abs().max().item() + 1e-30
    a, b = a.double(), b.double()
    assert (a - b).abs().max().item() <= tol["atol"] * scale + tol["rtol"] * scale, (
        f"max abs err {(a - b).abs().max().item():.3e} at scale {scale:.3e}"
    )


@pytest.fixture(scope="module")
def refs():
    """Reference kernels per case, computed once."""
    out = {}
    for name in CASES:
        model, X, Xt = make(name)
        out[name] = (model, X, Xt, reference_ntk(model, X), reference_ntk(model, Xt, X))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matvec_diag_dense_cross(refs, case, backend):
    model, X, Xt, Kref, Ksref = refs[case]
    C = CASES[case].C
    K = nks.NTKOperator(model, X, backend=backend)
    assert K.shape == (X.shape[0] * C,) * 2 and K.num_outputs == C
    g = torch.Generator().manual_seed(0)
    v = torch.randn(K.shape[0], generator=g, dtype=torch.float64)
    V = torch.randn(K.shape[0], 3, generator=g, dtype=torch.float64)
    close(K @ v, Kref @ v)
    close(K @ V, Kref @ V)
    close(K.diagonal(), Kref.diagonal())
    close(K.to_dense(), Kref)
    Ks = nks.NTKOperator(model, Xt, X, backend=backend)
    assert Ks.shape == (Xt.shape[0] * C, X.shape[0] * C)
    close(Ks @ V, Ksref @ V)
    close(Ks.to_dense(), Ksref)
    # the transpose is the (X, Xt) kernel
    W = torch.randn(Ks.shape[0], 2, generator=g, dtype=torch.float64)
    close(Ks.mT @ W, Ksref.T @ W)
    close(Ks.mT.to_dense(), nks.NTKOperator(model, X, Xt, backend=backend).to_dense())


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("case", ["mlp-C3", "cnn-C2"])
def test_float32(case, backend):
    model, X, _ = make(case, dtype=torch.float32)
    Kref = reference_ntk(model, X)
    K = nks.NTKOperator(model, X, backend=backend)
    assert K.dtype == torch.float32
    V = torch.randn(K.shape[0], 2)
    close(K @ V, Kref.float() @ V, torch.float32)
    close(K.diagonal(), Kref.diagonal(), torch.float32)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_subsetting(refs, backend):
    model, X, _, Kref, _ = refs["mlp-C3"]
    K = nks.NTKOperator(model, X, backend=backend)
    idx = torch.tensor([7, 2, 3, 16, 4])  # rows from several samples, not whole sample blocks
    S = K[idx][:, idx]
    assert isinstance(S, nks.NTKOperator)
    sub = Kref[idx][:, idx]
    assert S.shape == (5, 5)
    assert S.X1.shape[0] == 4  # only the samples the rows touch are kept
    close(S.to_dense(), sub)
    close(S.diagonal(), sub.diagonal())
    v = torch.randn(5, dtype=torch.float64)
    close(S @ v, sub @ v)
    # rows (pivoted-Cholesky style), slices and single entries
    close(K[idx, :].to_dense(), Kref[idx])
    close(K[3:11, 1:17].to_dense(), Kref[3:11, 1:17])
    close(K[3:11, 1:17] @ torch.ones(16, dtype=torch.float64), Kref[3:11, 1:17].sum(1))
    r, c = torch.tensor([0, 5, 9, 17]), torch.tensor([1, 5, 2, 0])
    close(K[r, c], Kref[r, c])
    assert abs(K[4, 9].item() - Kref[4, 9].item()) <= 1e-9 * Kref.abs().max()
    d_idx = torch.tensor([3, 3, 17, 0])
    close(K[d_idx, d_idx], Kref.diagonal()[d_idx])  # diagonal entries by the diagonal path
    # a sub-operator of a sub-operator
    S2 = K[2:14][:, 2:14][1:6][:, 1:6]
    close(S2.to_dense(), Kref[3:8, 3:8])


def test_rows_take_only_their_tangents(refs, monkeypatch):
    """A few rows of the kernel (as pivoted Cholesky asks) cost one tangent each, not C."""
    from ntkscale.backends.autodiff import AutodiffBackend

    model, X, _, Kref, _ = refs["mlp-C3"]
    widths = []
    real = AutodiffBackend.jvp
    monkeypatch.setattr(AutodiffBackend, "jvp", lambda self, d, X_, U: widths.append(U[0].shape[0]) or real(self, d, X_, U))
    K = nks.NTKOperator(model, X, backend="autodiff")
    close(K[torch.tensor([7]), :].to_dense(), Kref[[7]])
    close(K[torch.tensor([2, 16]), :].to_dense(), Kref[[2, 16]])
    assert widths == [1, 2]  # one tangent per requested row (C = 3 per touched sample before)


@pytest.mark.filterwarnings("ignore::ntkscale.SmallChunkWarning")
@pytest.mark.parametrize("case", ["mlp-C3", "cnn-C2"])
def test_chunking_invariance(case):
    model, X, _ = make(case, n=9)
    v = torch.randn(9 * CASES[case].C, 4, dtype=torch.float64)
    outs = [nks.NTKOperator(model, X, backend="autodiff", chunk_size=cs) for cs in (1, 7, 9)]
    res = [K @ v for K in outs]
    diags = [K.diagonal() for K in outs]
    for r, d in zip(res[1:], diags[1:]):
        torch.testing.assert_close(r, res[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d, diags[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_params_subset(backend):
    model, X, _ = make("mlp-C3")
    last = ["4.weight", "4.bias"]
    Kref = reference_ntk(model, X, names=last)
    by_name = nks.NTKOperator(model, X, params="4", backend=backend)
    by_tensor = nks.NTKOperator(model, X, params=[model[4].weight, model[4].bias], backend=backend)
    assert by_name.num_params == by_tensor.num_params == 3 * 10 + 3
    close(by_name.to_dense(), Kref)
    close(by_tensor @ torch.eye(18, dtype=torch.float64), Kref)
    # frozen parameters are left out by default
    model[0].weight.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    close(nks.NTKOperator(model, X, backend=backend).diagonal(), reference_ntk(model, X, names=names).diagonal())


@pytest.mark.parametrize("case", ["mlp-C3", "resnet-C2"])
def test_structured_factor_cache_and_recompute(refs, case, monkeypatch):
    """Factors are computed once and reused; past the factor budget they are recomputed per
    chunk with the same result."""
    from ntkscale.backends import structured

    model, X, _, Kref, _ = refs[case]
    calls = []
    real = structured.compute_factors
    monkeypatch.setattr(structured, "compute_factors", lambda *a: calls.append(1) or real(*a))
    K = nks.NTKOperator(model, X, backend="structured", chunk_size=4)
    V = torch.randn(K.shape[0], 2, dtype=torch.float64)
    close(K @ V, Kref @ V)
    n_first = len(calls)
    close(K @ V, Kref @ V)
    close(K.diagonal(), Kref.diagonal())
    assert len(calls) == n_first  # cached: no new factor passes
    Kr = nks.NTKOperator(model, X, backend="structured", chunk_size=4, factor_budget=1)
    close(Kr @ V, Kref @ V)
    before = len(calls)
    close(Kr @ V, Kref @ V)
    assert len(calls) > before  # recomputed chunk by chunk


def test_kernel_space_factors_are_cached_within_the_factor_budget(refs, monkeypatch):
    """The kernel-space backends copy each side's dense-layer factors into contiguous
    kernel-space factors once, not on every product; when the factors and these copies
    together exceed the factor budget, they are copied per product with the same result."""
    from ntkscale.backends.structured import StructuredBackend

    model, X, Xt, Kref, Ksref = refs["mlp-C3"]
    calls = []
    real = StructuredBackend._kernel_factors
    monkeypatch.setattr(StructuredBackend, "_kernel_factors", staticmethod(lambda *a: calls.append(1) or real(*a)))
    V = torch.randn(X.shape[0] * 3, 2, dtype=torch.float64)
    K = nks.NTKOperator(model, X, backend="cuda")
    for _ in range(3):
        close(K @ V, Kref @ V)
    close(K.to_dense(), Kref)
    assert len(calls) == 1  # one square side, copied once
    Ks = nks.NTKOperator(model, Xt, X, backend="cuda")
    for _ in range(3):
        close(Ks @ V, Ksref @ V)
    assert len(calls) == 3  # and once per side of a cross-kernel
    tight = nks.NTKOperator(model, X, backend="cuda", factor_budget=K.factor_bytes())
    before = len(calls)
    for _ in range(3):
        close(tight @ V, Kref @ V)
    assert len(calls) == before + 3  # factors cached, their copies past the budget: per product


def test_factor_memory_is_reported():
    model, X, Xt = make("mlp-C3")
    K = nks.NTKOperator(model, X, backend="structured")
    # per sample: inputs of the three Linear layers (5 + 12 + 10) and gradients C * (12 + 10 + 3)
    assert K.factor_bytes() == 6 * (5 + 12 + 10 + 3 * (12 + 10 + 3)) * 8
    assert nks.NTKOperator(model, Xt, X, backend="structured").factor_bytes() == 10 * (5 + 12 + 10 + 3 * (12 + 10 + 3)) * 8
    # the autodiff backend reports its linearization (see tests/test_linearization.py)
    assert nks.NTKOperator(model, X, backend="autodiff").factor_bytes() > 0
    assert nks.NTKOperator(model, X, backend="dense").factor_bytes() is None


def test_keops_missing_is_said_at_selection(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pykeops" else real(name, *a))
    model, X, _ = make("mlp-C1")
    with pytest.raises(ImportError, match=r"backend 'keops' needs pykeops: pip install 'ntkscale\[keops\]'"):
        nks.NTKOperator(model, X, backend="keops")


def test_scalar_output_rows():
    model, X, _ = make("mlp-scalar")
    K = nks.NTKOperator(model, X)
    assert K.shape == (6, 6) and K.num_outputs == 1


def test_operator_holds_a_snapshot():
    model, X, _ = make("mlp-C1", dtype=torch.float32)
    K = nks.NTKOperator(model, X)
    before = K.to_dense()
    Kd = K.double()
    assert Kd.dtype == torch.float64 and isinstance(Kd, nks.NTKOperator)
    assert next(model.parameters()).dtype == torch.float32  # the user's model is not converted
    with torch.no_grad():  # training the model later leaves the kernel as it was
        for p in model.parameters():
            p.add_(1.0)
    torch.testing.assert_close(K.to_dense(), before)
    torch.testing.assert_close(Kd.to_dense().float(), before, rtol=1e-5, atol=1e-5)


def test_linear_operator_algebra():
    """The operator composes with linear_operator's algebra (K + σ²I, scaling, solves)."""
    from linear_operator.operators import DiagLinearOperator

    model, X, _ = make("mlp-C1")
    Kref = reference_ntk(model, X)
    K = nks.NTKOperator(model, X)
    A = K + DiagLinearOperator(torch.full((6,), 0.5, dtype=torch.float64))
    v = torch.randn(6, dtype=torch.float64)
    close(A @ v, (Kref + 0.5 * torch.eye(6, dtype=torch.float64)) @ v)
    close((2.0 * K) @ v, 2 * Kref @ v)


# -- bad input --------------------------------------------------------------------------------


def test_error_x_shape_rejected():
    model, X, _ = make("mlp-C1")
    with pytest.raises(ValueError, match=r"X has shape \(6, 4\).*model rejected it"):
        nks.NTKOperator(model, torch.randn(6, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="same per-sample shape"):
        nks.NTKOperator(model, X, torch.randn(3, 4, dtype=torch.float64))


def test_error_nan_inputs():
    model, X, _ = make("mlp-C1")
    Xb = X.clone()
    Xb[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"X contains NaN or inf .*first at index 3"):
        nks.NTKOperator(model, Xb)
    K = nks.NTKOperator(model, X)
    v = torch.ones(6, dtype=torch.float64)
    v[2] = float("inf")
    with pytest.raises(ValueError, match="right-hand side contains NaN or inf"):
        K @ v


def test_error_vector_shape_dtype():
    model, X, _ = make("mlp-C3")
    K = nks.NTKOperator(model, X)
    with pytest.raises(ValueError, match=r"has 17 rows but the operator has 18 columns \(N=6 samples x C=3"):
        K @ torch.ones(17, dtype=torch.float64)
    with pytest.raises(ValueError, match="no batch dimensions"):
        K @ torch.ones(2, 18, 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="right-hand side is torch.float32 but the operator is torch.float64"):
        K @ torch.ones(18)


def test_error_no_trainable_params():
    model, X, _ = make("mlp-C1")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        nks.NTKOperator(model, X)
    with pytest.raises(ValueError, match="no parameter named 'nope'"):
        nks.NTKOperator(model, X, params="nope")


def test_error_device_dtype_mismatch():
    model, X, _ = make("mlp-C1")
    with pytest.raises(TypeError, match="X is torch.float32 but the model's parameters are torch.float64; pass dtype"):
        nks.NTKOperator(model, X.float())
    with pytest.raises(ValueError, match="X is on meta but the model's parameters are on cpu"):
        nks.NTKOperator(model, torch.empty(6, 5, device="meta", dtype=torch.float64))
    # dtype= casts both
    K = nks.NTKOperator(model, X.float(), dtype=torch.float64)
    assert K.dtype == torch.float64


def test_error_unknown_backend():
    model, X, _ = make("mlp-C1")
    with pytest.raises(ValueError, match="unknown backend 'fast'; expected one of"):
        nks.NTKOperator(model, X, backend="fast")


def test_nondeterministic_models_refused():
    torch.manual_seed(0)
    drop = nn.Sequential(nn.Linear(5, 32), nn.Dropout(0.5), nn.Linear(32, 2)).double()
    X = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(NonDeterministicModelError, match=r"two evaluations .* disagree.*\['Dropout'\]\. Call model.eval\(\)"):
        nks.NTKOperator(drop, X)
    assert nks.NTKOperator(drop.eval(), X).shape == (12, 12)
    bn = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).double().train()
    with pytest.raises(NonDeterministicModelError, match="BatchNorm1d.*Call model.eval"):
        nks.NTKOperator(bn, X)
    running = bn[1].running_mean.clone()
    assert torch.equal(bn[1].running_mean, running)  # the probe did not touch the user's buffers


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_matches_cpu(refs, backend):
    import copy

    model, X, Xt, Kref, Ksref = refs["cnn-C2"]
    dev = torch.device("cuda")
    gpu_model = copy.deepcopy(model).to(dev)
    K = nks.NTKOperator(gpu_model, X.to(dev), backend=backend)
    V = torch.randn(K.shape[0], 3, dtype=torch.float64)
    close((K @ V.to(dev)).cpu(), Kref @ V)
    close(K.diagonal().cpu(), Kref.diagonal())
    Ks = nks.NTKOperator(gpu_model, Xt.to(dev), X.to(dev), backend=backend)
    close((Ks @ V.to(dev)).cpu(), Ksref @ V)
    # an operator built on the CPU and moved with .to() computes on the GPU
    Kc = nks.NTKOperator(model, X, backend=backend).to(dev)
    assert Kc.device.type == "cuda"
    close(Kc.to_dense().cpu(), Kref)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["structured", "cuda"])
def test_cuda_mlp_float32(backend):
    """The kernel-space path on dense layers (the csrc kernel on the GPU), float32, C = 10."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 300), nn.ReLU(), nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    X = torch.randn(150, 20)
    Kref = reference_ntk(model, X)
    dev = torch.device("cuda")
    K = nks.NTKOperator(copy_to(model, dev), X.to(dev), backend=backend)
    V = torch.randn(K.shape[0], 4)
    close((K @ V.to(dev)).cpu(), Kref.float() @ V, torch.float32)
    close(K.diagonal().cpu(), Kref.diagonal(), torch.float32)


def copy_to(model, dev):
    import copy

    return copy.deepcopy(model).to(dev)
