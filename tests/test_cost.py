"""The cost model behind ``backend="auto"`` and ``NTKOperator.with_backend``.

What ``auto`` must never do is pick a backend that cannot run here: the compiled kernel without a
compiler (or with one, paying a half-minute compile for a few products), KeOps without pykeops,
the structured family on a model whose layers are used without being called, autodiff on a model
without forward-mode rules. Products of the picked backend are checked against the float64
explicit Jacobian of ``tests.cases``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import ntkscale as nks
from ntkscale.backends import _ext, cost
from tests.cases import reference_ntk


def _mlp(d, w, c):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, c))


@pytest.fixture
def no_toolchain(monkeypatch, tmp_path):
    """A machine with no C++ compiler, no pykeops, and the extension neither loaded nor built:
    any attempt to compile fails the test."""
    monkeypatch.setattr(cost.shutil, "which", lambda *a, **k: None)
    monkeypatch.setenv("NTKSCALE_EXT_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(_ext, "_module", None)
    real_find_spec = cost.importlib.util.find_spec
    monkeypatch.setattr(cost.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pykeops" else real_find_spec(name, *a))
    cost._keops_importable.cache_clear()

    def no_compile(*args, **kwargs):
        raise AssertionError("a compile was attempted")

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", no_compile)
    yield
    cost._keops_importable.cache_clear()


@pytest.fixture
def built_extension(monkeypatch):
    """The extension counts as built (whether or not it is), so kernel space competes freely."""
    monkeypatch.setattr(cost, "extension_status",
                        lambda device="cpu": cost.ExtensionStatus(True, True, False))


# A wide MLP on few samples: kernel space is far cheaper per product than weight space.
WIDE = dict(d=16, w=2048, c=1, n=64)


def _wide():
    model = _mlp(WIDE["d"], WIDE["w"], WIDE["c"])
    X = torch.randn(WIDE["n"], WIDE["d"], generator=torch.Generator().manual_seed(1))
    return model, X


def test_kernel_space_wins_when_built_and_layers_are_wide(built_extension):
    """The premise of the next test: with the extension at hand, wide layers go to kernel space."""
    model, X = _wide()
    K = nks.NTKOperator(model, X, backend="auto")
    assert K.backend == "cuda", K.cost_estimates["reason"]


def test_no_compiler_no_pykeops_never_picks_compiled_backends(no_toolchain):
    model, X = _wide()
    K = nks.NTKOperator(model, X, backend="auto")
    est = K.cost_estimates
    assert K.backend not in ("cuda", "keops"), est["reason"]
    assert "compiler" in est["cannot_run"]["cuda"]
    assert "pykeops" in est["cannot_run"]["keops"]
    assert "cuda" not in est["total_s"] and "keops" not in est["total_s"]
    v = torch.randn(K.shape[0])
    torch.testing.assert_close(K @ v, K.with_backend("autodiff") @ v, rtol=1e-4, atol=1e-4)


def test_no_ninja_is_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("NTKSCALE_EXT_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(cost, "_ninja", lambda: False)
    st = cost.extension_status("cpu")
    assert not st.built and not st.buildable and not st.usable
    assert "ninja" in st.reason


def test_gpu_tensors_need_nvcc(monkeypatch):
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_want_cuda", lambda: False)
    st = cost.extension_status("cuda")
    assert not st.usable and "nvcc" in st.reason


def test_compile_is_counted_against_the_products(monkeypatch, tmp_path):
    """Not built but buildable: the compile is a setup cost. A few products do not pay for it;
    a long enough workload does."""
    from ntkscale.reductions import compiled

    monkeypatch.setattr(cost, "extension_status",
                        lambda device="cpu": cost.ExtensionStatus(False, True, False))
    monkeypatch.setattr(compiled, "loaded_extension", lambda: None)  # whatever ran before in this process
    model, X = _wide()
    K = nks.NTKOperator(model, X, backend="auto")
    est = K.cost_estimates
    assert K.backend != "cuda"
    assert est["setup_s"]["cuda"] >= cost.COMPILE_S["cpu"]
    fm_args = _fm_args(model, X)
    long = cost.choose(*fm_args, products=10**7)
    assert long["backend"] == "cuda", long["reason"]


def _fm_args(model, X):
    from ntkscale.functional import FunctionalModel, select_parameters

    names, fixed_names = select_parameters(model, None)
    sd = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    p = [sd[n].detach() for n in names]
    fx = [sd[n].detach() for n in fixed_names]
    fm = FunctionalModel(model, tuple(names), tuple(fixed_names), num_outputs=model(X[:1]).shape[-1])
    return fm, p, fx, X, X, True, 256 * 2**20


def test_built_check_sees_a_build_of_other_sources(monkeypatch, tmp_path):
    """A library built from another checkout's sources is rebuilt by torch: not 'built'."""
    ext = tmp_path / "ext"
    ext.mkdir()
    monkeypatch.setenv("NTKSCALE_EXT_DIR", str(ext))
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_want_cuda", lambda: False)
    lib = ext / f"{_ext._EXT_NAME}.so"
    lib.write_bytes(b"")
    (ext / "build.ninja").write_text("build ntk_reduce.o: compile /elsewhere/csrc/ntk_reduce.cpp\n")
    assert not _ext.is_built()
    (ext / "build.ninja").write_text(f"build ntk_reduce.o: compile {_ext.csrc_dir() / 'ntk_reduce.cpp'}\n")
    lib.touch()
    assert _ext.is_built()


def test_compile_is_logged(monkeypatch, tmp_path, caplog):
    from torch.utils import cpp_extension

    monkeypatch.setenv("NTKSCALE_EXT_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_want_cuda", lambda: False)
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or SimpleNamespace())
    with caplog.at_level(logging.WARNING, logger="ntkscale"):
        _ext.load_extension()
    assert len(calls) == 1
    assert any("compiling the kernel-space extension" in r.message for r in caplog.records)
    assert any("compiled the kernel-space extension in" in r.message for r in caplog.records)


class FunctionalHead(nn.Module):
    """The last layer's weight is used through F.linear, never by calling the module (as
    nn.MultiheadAttention does with out_proj): the structured factors cannot be taken."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return nn.functional.linear(self.body(x), self.head.weight, self.head.bias)


class _NoForwardAD(torch.autograd.Function):
    """tanh with a backward rule but no forward-mode (jvp) rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class NoForwardAD(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.l2(_NoForwardAD.apply(self.l1(x)))


def test_auto_skips_autodiff_when_the_model_has_no_forward_mode_rule():
    torch.manual_seed(0)
    model = NoForwardAD().double()
    X = torch.randn(6, 4, dtype=torch.float64)
    K = nks.NTKOperator(model, X, backend="auto")
    est = K.cost_estimates
    assert "autodiff" in est["cannot_run"], est["reason"]
    assert K.backend != "autodiff"
    v = torch.randn(K.shape[0], dtype=torch.float64)
    torch.testing.assert_close(K @ v, reference_ntk(model, X) @ v, rtol=1e-10, atol=1e-10)


def test_layers_used_without_their_call_are_costed_as_autodiff_work():
    """The head's weight is used through F.linear: the structured backend sends it through
    autodiff, and the cost model counts it among the unstructured parameters."""
    torch.manual_seed(0)
    model = FunctionalHead().double()
    X = torch.randn(6, 4, dtype=torch.float64)
    K = nks.NTKOperator(model, X, backend="auto")
    est = K.cost_estimates
    assert est["unstructured_params"] == 16 * 3 + 3
    assert est["layers"] == [(1, 4, 16)]
    # used outside any module call: where is unknown, so the whole forward pass is counted
    assert est["after_rest_macs"] == est["forward_macs"] > 0
    for b in ("structured", "autodiff", "dense"):
        assert b in est["product_s"], est["reason"]
    v = torch.randn(K.shape[0], dtype=torch.float64)
    ref = reference_ntk(model, X) @ v
    for b in ("structured", K.backend):
        torch.testing.assert_close(K.with_backend(b) @ v, ref, rtol=1e-10, atol=1e-10)


def test_unfactorable_parameters_early_in_the_network_cost_a_full_autodiff_pass():
    """BatchNorm right after the first convolution (a ResNet stem): the structured backend must
    run autodiff through the whole network for it, so it cannot beat autodiff per product."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    X = torch.randn(16, 3, 8, 8)
    est = nks.NTKOperator(model, X, backend="auto").cost_estimates
    assert est["after_rest_macs"] > 0.9 * est["forward_macs"] - 8 * 6 * 6 * 27  # all but conv1
    assert est["product_s"]["structured"] > est["product_s"]["autodiff"]
    # the same network without the BatchNorm: the factors pay off
    plain = nn.Sequential(*[m for m in model if not isinstance(m, nn.BatchNorm2d)])
    est2 = nks.NTKOperator(plain, X, backend="auto").cost_estimates
    assert est2["unstructured_params"] == 0
    assert est2["product_s"]["structured"] < est2["product_s"]["autodiff"]


def test_no_runnable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cost, "DENSE_FALLBACK_BYTES", 0)
    monkeypatch.setattr(cost, "DENSE_MAX_BYTES", 0)
    model = FunctionalHead().double()
    X = torch.randn(6, 4, dtype=torch.float64)

    class Both(nn.Module):  # unfactorable and without forward AD
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return _NoForwardAD.apply(self.inner(x))

    with pytest.raises(RuntimeError, match="no backend that can run") as exc:
        nks.NTKOperator(Both(), X, backend="auto")
    assert "autodiff" in str(exc.value) and "structured" in str(exc.value)


# -- with_backend ------------------------------------------------------------------------------
def test_with_backend_gives_the_same_kernel_by_each_backend():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X = torch.randn(9, 5, dtype=torch.float64)
    K = nks.NTKOperator(model, X, backend="autodiff")
    v = torch.randn(K.shape[0], 2, dtype=torch.float64)
    ref = reference_ntk(model, X) @ v
    for b in ("autodiff", "structured", "dense", "cuda", "keops"):
        if b == "keops" and cost.keops_status():
            continue
        if b == "cuda" and not cost.extension_status("cpu").usable:
            continue
        Kb = K.with_backend(b)
        assert Kb.backend == b and Kb.shape == K.shape
        assert Kb.cost_estimates == {}
        torch.testing.assert_close(Kb @ v, ref, rtol=1e-10, atol=1e-10)
    assert K.backend == "autodiff"  # the original is untouched


def test_with_backend_shares_the_structured_factors(monkeypatch):
    from ntkscale.backends import structured

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X = torch.randn(12, 5, dtype=torch.float64)
    K = nks.NTKOperator(model, X, backend="structured")
    v = torch.randn(K.shape[0], dtype=torch.float64)
    K @ v
    seen = []
    real = structured.compute_factors
    monkeypatch.setattr(structured, "compute_factors",
                        lambda data, specs, Xc: seen.append(Xc.shape[0]) or real(data, specs, Xc))
    K.with_backend("structured") @ v
    K.with_backend("dense") @ v  # another family: nothing of the factors is needed
    assert [n for n in seen if n > 1] == []


def test_with_backend_rejects_auto_and_unknown_names():
    model = nn.Sequential(nn.Linear(3, 2))
    K = nks.NTKOperator(model, torch.randn(4, 3), backend="autodiff")
    with pytest.raises(ValueError, match="explicit backend"):
        K.with_backend("auto")
    with pytest.raises(ValueError, match="'nosuch'"):
        K.with_backend("nosuch")
