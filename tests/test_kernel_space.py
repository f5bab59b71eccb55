"""Kernel-space NTK products: every implementation against an explicit-Jacobian reference.

The reference builds, per sample and output, the flattened per-layer Jacobians
``J[i, c] = concat_l vec(G[l][i, c] ⊗ A[l][i])`` (what autodiff gives for a Linear layer
``z = W a``), the Gram matrix ``J1 J2ᵀ`` by einsum, and multiplies it by ``V`` -- nothing of the
factored algebra under test. Tolerances: float64 1e-10 relative to the largest entry (sums of
at most a few hundred products); float32 1e-5 (a few ulps times the reduction length).

Compiled pieces (the C++ extension, KeOps formulas, the CUDA kernel under emulation and nvcc)
carry ``pytest.mark.compile``: they run by default and build into per-user caches, so a warm
run takes seconds; the first run on a machine takes about a minute.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths, is_ninja_available

from ntkscale.reductions import core as ks

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
HAS_CUDA = torch.cuda.is_available()
try:
    import pykeops  # noqa: F401

    HAS_KEOPS = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_KEOPS = False

N1, N2 = 7, 9
LAYERS = [(5, 6), (4, 3)]  # (d_l, o_l): two layers of different widths
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

compile_mark = pytest.mark.compile
needs_keops = pytest.mark.skipif(not HAS_KEOPS, reason="pykeops is not installed")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
needs_build = pytest.mark.skipif(
    not is_ninja_available(), reason="building the extension needs ninja (pip install ninja)"
)

IMPL_PARAMS = [
    pytest.param("torch", id="torch"),
    pytest.param("keops", id="keops", marks=[compile_mark, needs_keops]),
    pytest.param("cpp", id="cpp", marks=[compile_mark, needs_build]),
    pytest.param(
        "cuda", id="cuda", marks=[compile_mark, pytest.mark.cuda, needs_cuda, needs_build]
    ),
]


def _device(impl: str) -> torch.device:
    return torch.device("cuda" if impl == "cuda" else "cpu")


def make_factors(C: int, dtype=torch.float64, device="cpu", seed: int = 0):
    """Random factors (A1, G1, A2, G2) of the two-layer net; A[l] ends in a bias column."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    A1, G1, A2, G2 = [], [], [], []
    for d, o in LAYERS:
        A1.append(torch.cat([rnd(N1, d - 1), torch.ones(N1, 1, dtype=dtype, device=device)], 1))
        A2.append(torch.cat([rnd(N2, d - 1), torch.ones(N2, 1, dtype=dtype, device=device)], 1))
        G1.append(rnd(N1, C, o))
        G2.append(rnd(N2, C, o))
    return A1, G1, A2, G2


def explicit_jacobian(A, G):
    """(N, C, P): per-sample Jacobians w.r.t. all weights, J[i, c] = concat_l vec(G_ic ⊗ A_i)."""
    return torch.cat([torch.einsum("ico,id->icod", g, a).flatten(2) for a, g in zip(A, G)], dim=2)


def explicit_gram(A1, G1, A2, G2):
    """(N1*C, N2*C) Gram matrix J1 J2ᵀ, rows (sample, output) row-major."""
    J1, J2 = explicit_jacobian(A1, G1), explicit_jacobian(A2, G2)
    n1, C, _ = J1.shape
    return torch.einsum("icp,jep->icje", J1, J2).reshape(n1 * C, -1)


def explicit_matmul(A1, G1, A2, G2, V):
    n2, C, k = V.shape
    K = explicit_gram(A1, G1, A2, G2)
    return (K @ V.reshape(n2 * C, k)).reshape(-1, C, k)


def _close(got, want, dtype):
    scale = want.abs().max().clamp_min(1.0)
    err = (got.to(torch.float64) - want.to(torch.float64)).abs().max()
    assert err <= TOL[dtype] * scale, f"max abs error {err:.3e} (scale {scale:.3e})"


# ---------------------------------------------------------------------------------------------
# every implementation against the explicit reference
# ---------------------------------------------------------------------------------------------


class _no_tf32:
    """TF32 off in reference comparisons (matters on Ampere+ GPUs only)."""

    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("k", [1, 4])
def test_matmul_matches_explicit_gram(impl, dtype, C, k):
    if impl == "keops" and dtype == torch.float32:
        pytest.skip("KeOps is checked in float64 only: each dtype is another formula to compile")
    dev = _device(impl)
    A1, G1, A2, G2 = make_factors(C, torch.float64, seed=C * 10 + k)
    V = torch.randn(N2, C, k, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    want = explicit_matmul(A1, G1, A2, G2, V)
    cast = lambda ts: [t.to(dtype=dtype, device=dev) for t in ts]  # noqa: E731
    block = 3 if impl in ("torch", "cpp") else None  # ragged row blocks (7 = 3 + 3 + 1)
    with _no_tf32():
        got = ks.kernel_space_matmul(
            cast(A1), cast(G1), cast(A2), cast(G2), V.to(dtype=dtype, device=dev),
            impl=impl, block_size=block,
        )
    assert got.shape == (N1, C, k) and got.dtype == dtype and got.device.type == dev.type
    _close(got.cpu(), want, dtype)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_backward_wrt_V_matches_autograd_through_reference(impl):
    C, k = 3, 4  # k = 4 reuses the KeOps formula compiled for the forward test
    dev = _device(impl)
    A1, G1, A2, G2 = make_factors(C, seed=5)
    g = torch.Generator().manual_seed(6)
    V = torch.randn(N2, C, k, dtype=torch.float64, generator=g)
    R = torch.randn(N1, C, k, dtype=torch.float64, generator=g)  # cotangent

    V_ref = V.clone().requires_grad_(True)
    (explicit_matmul(A1, G1, A2, G2, V_ref) * R).sum().backward()

    to = lambda ts: [t.to(dev) for t in ts]  # noqa: E731
    V_got = V.to(dev).requires_grad_(True)
    out = ks.kernel_space_matmul(to(A1), to(G1), to(A2), to(G2), V_got, impl=impl)
    (out * R.to(dev)).sum().backward()
    _close(V_got.grad.cpu(), V_ref.grad, torch.float64)


def test_torch_impl_gradients_wrt_factors():
    """The reference impl is plain torch: its factor gradients match the explicit Gram's."""
    C, k = 3, 2
    A1, G1, A2, G2 = make_factors(C, seed=7)
    V = torch.randn(N2, C, k, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    leaves = lambda ts: [t.clone().requires_grad_(True) for t in ts]  # noqa: E731
    ref = [leaves(A1), leaves(G1), leaves(A2), leaves(G2)]
    got = [leaves(A1), leaves(G1), leaves(A2), leaves(G2)]
    explicit_matmul(*ref, V).pow(2).sum().backward()
    ks.kernel_space_matmul(*got, V, impl="torch", block_size=2).pow(2).sum().backward()
    for group_ref, group_got in zip(ref, got):
        for r, q in zip(group_ref, group_got):
            _close(q.grad, r.grad, torch.float64)


@compile_mark
@pytest.mark.parametrize(
    "impl",
    [
        pytest.param("cpp", id="cpp", marks=needs_build),
        pytest.param("keops", id="keops", marks=needs_keops),
    ],
)
def test_compiled_impls_leave_factor_gradients_none_and_say_so(impl):
    C, k = 1, 1
    A1, G1, A2, G2 = make_factors(C, seed=9)
    A1 = [a.clone().requires_grad_(True) for a in A1]
    V = torch.randn(N2, C, k, dtype=torch.float64).requires_grad_(True)
    out = ks.kernel_space_matmul(A1, G1, A2, G2, V, impl=impl)
    with pytest.warns(UserWarning, match="with respect to V only"):
        out.sum().backward()
    assert V.grad is not None and all(a.grad is None for a in A1)


# ---------------------------------------------------------------------------------------------
# Gram blocks and diagonals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [1, 3])
def test_gram_block_matches_explicit(C):
    A1, G1, A2, G2 = make_factors(C, seed=11)
    K = ks.gram_block(A1, G1, A2, G2)
    assert K.shape == (N1 * C, N2 * C)
    _close(K, explicit_gram(A1, G1, A2, G2), torch.float64)
    # rows (sample, output) row-major: entry (i*C + c, j*C + e)
    i, c, j, e = 4, C - 1, 2, 0
    want = sum(
        (a1[i] @ a2[j]) * (g1[i, c] @ g2[j, e]) for a1, g1, a2, g2 in zip(A1, G1, A2, G2)
    )
    assert torch.isclose(K[i * C + c, j * C + e], want)


@pytest.mark.parametrize("C", [1, 3])
def test_gram_diagonal_matches_explicit(C):
    A, G, _, _ = make_factors(C, seed=12)
    diag = ks.gram_diagonal(A, G)
    assert diag.shape == (N1, C)
    _close(diag.reshape(-1), explicit_gram(A, G, A, G).diagonal(), torch.float64)


# ---------------------------------------------------------------------------------------------
# bad inputs: clear errors, up front
# ---------------------------------------------------------------------------------------------


def _bad_cases():
    C, k = 3, 2

    def base():
        A1, G1, A2, G2 = make_factors(C, seed=13)
        return A1, G1, A2, G2, torch.randn(N2, C, k, dtype=torch.float64)

    def g1_shape(f):
        f[1][1] = torch.randn(N1, C + 1, LAYERS[1][1], dtype=torch.float64)
        return f

    cases = {
        "g1-shape": (
            g1_shape, ValueError, r"G1\[1\] has shape \(7, 4, 3\), expected \(N1=7, C=3, o\)"
        ),
        "g2-shape": (
            lambda f: (f[3].__setitem__(0, f[3][0][:, :, :5]), f)[1],
            ValueError, r"G2\[0\] has shape \(9, 3, 5\), expected \(N2=9, C=3, o=6\)",
        ),
        "a2-width": (
            lambda f: (f[2].__setitem__(1, torch.randn(N2, 7, dtype=torch.float64)), f)[1],
            ValueError, r"A2\[1\] has shape \(9, 7\), expected \(N2=9, d=4\)",
        ),
        "v-shape": (
            lambda f: f[:4] + [torch.randn(N2 + 1, C, k, dtype=torch.float64)],
            ValueError, r"V has shape \(10, 3, 2\), expected \(N2=9, C=3, k\)",
        ),
        "layer-count": (
            lambda f: [f[0], f[1][:1], f[2], f[3], f[4]],
            ValueError, r"one tensor per layer; got lengths A1=2, G1=1, A2=2, G2=2",
        ),
        "no-layers": (lambda f: [[], [], [], [], f[4]], ValueError, "at least one layer"),
        "dtype-mix": (
            lambda f: f[:4] + [f[4].float()],
            TypeError, r"V has dtype torch.float32, expected torch.float64",
        ),
        "device-mix": (
            lambda f: (f[0].__setitem__(1, f[0][1].to("meta")), f)[1],
            ValueError, r"A1\[1\] is on meta, expected cpu",
        ),
        "not-a-list": (
            lambda f: [f[0][0]] + f[1:],
            TypeError, "A1 must be a list or tuple of tensors",
        ),
    }
    return base, cases


_BASE, _CASES = _bad_cases()


@pytest.mark.parametrize("name", list(_CASES))
def test_bad_inputs_raise_clear_errors(name):
    mutate, exc, pattern = _CASES[name]
    f = [list(x) if isinstance(x, list) else x for x in _BASE()]
    A1, G1, A2, G2, V = mutate(f)
    with pytest.raises(exc, match=pattern):
        ks.kernel_space_matmul(A1, G1, A2, G2, V)


def test_bad_impl_and_impl_specific_checks():
    A1, G1, A2, G2 = make_factors(1, seed=14)
    V = torch.randn(N2, 1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"impl must be one of .*got 'fast'"):
        ks.kernel_space_matmul(A1, G1, A2, G2, V, impl="fast")
    with pytest.raises(ValueError, match=r"impl='cuda' runs on CUDA tensors, got tensors on cpu"):
        ks.kernel_space_matmul(A1, G1, A2, G2, V, impl="cuda")
    half = lambda ts: [t.half() for t in ts]  # noqa: E731
    with pytest.raises(TypeError, match=r"impl='cpp' supports float32 and float64, got .*float16"):
        ks.kernel_space_matmul(half(A1), half(G1), half(A2), half(G2), V.half(), impl="cpp")
    G1_strided = [torch.stack([g, g], dim=-1)[..., 0] for g in G1]  # same values, strided
    with pytest.raises(ValueError, match=r"contiguous inputs; G1\[0\] with shape \(7, 1, 6\)"):
        ks.kernel_space_matmul(A1, G1_strided, A2, G2, V, impl="cpp")
    # the torch impl takes any strides
    _close(
        ks.kernel_space_matmul(A1, G1_strided, A2, G2, V), explicit_matmul(A1, G1, A2, G2, V),
        torch.float64,
    )


# ---------------------------------------------------------------------------------------------
# loading: lazy, cached, optional
# ---------------------------------------------------------------------------------------------


def test_import_compiles_nothing_and_loads_no_pykeops():
    code = (
        "import sys\n"
        "import ntkscale.reductions, ntkscale.reductions.keops\n"
        "import ntkscale.reductions.compiled as e\n"
        "assert 'pykeops' not in sys.modules, 'pykeops imported at import time'\n"
        "assert e._module is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_old_module_paths_are_the_moved_modules():
    """ntkscale.backends.kernel_space/.keops/._ext moved to ntkscale.reductions; the old names are
    the same module objects (so their state, e.g. the loaded extension, is shared)."""
    import ntkscale.backends._ext as old_ext
    import ntkscale.backends.keops as old_keops
    import ntkscale.backends.kernel_space as old_core
    from ntkscale.reductions import compiled, core, keops

    assert old_core is core and old_keops is keops and old_ext is compiled
    assert old_core.kernel_space_matmul is core.kernel_space_matmul


@compile_mark
@needs_build
def test_fast_impls_share_one_function_and_check_inputs_in_one_place():
    """The compiled reduction's gradient with respect to V is the swapped reduction (through the
    shared Function), and its input errors are the dispatcher's."""
    from ntkscale.reductions import compiled

    A1, G1, A2, G2 = make_factors(2, seed=21)
    V = torch.randn(N2, 2, 2, dtype=torch.float64, requires_grad=True)
    R = torch.randn(N1, 2, 2, dtype=torch.float64)
    (compiled.ntk_reduce(A1, G1, A2, G2, V) * R).sum().backward()
    want = ks.kernel_space_matmul_reference(A2, G2, A1, G1, R)
    torch.testing.assert_close(V.grad, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(TypeError, match="supports float32 and float64"):
        compiled.ntk_reduce([a.half() for a in A1], [g.half() for g in G1], [a.half() for a in A2],
                            [g.half() for g in G2], V.detach().half())


def test_keops_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pykeops", None)
    monkeypatch.setitem(sys.modules, "pykeops.torch", None)
    A1, G1, A2, G2 = make_factors(1, seed=15)
    V = torch.randn(N2, 1, 1, dtype=torch.float64)
    hint = r"backend 'keops' needs pykeops: pip install 'ntkscale\[keops\]'"
    with pytest.raises(ImportError, match=hint):
        ks.kernel_space_matmul(A1, G1, A2, G2, V, impl="keops")


@needs_keops
def test_keops_build_folder_from_env(monkeypatch, tmp_path):
    import pykeops

    from ntkscale.reductions import keops as kk

    calls = []
    monkeypatch.setattr(pykeops, "set_build_folder", lambda path=None: calls.append(path))
    monkeypatch.setattr(kk, "_build_folder_set", None)
    monkeypatch.setenv("NTKSCALE_KEOPS_DIR", str(tmp_path / "keops"))
    kk._lazy_tensor()
    kk._lazy_tensor()  # set once per folder
    assert calls == [str(tmp_path / "keops")]


def test_ext_cache_folder_and_clear(monkeypatch, tmp_path):
    from ntkscale.reductions import compiled as _ext

    monkeypatch.delenv("NTKSCALE_EXT_DIR", raising=False)
    default = _ext.extension_dir()
    assert default.parts[-3:-1] == ("ntkscale", "ext")
    assert default.name == f"{torch.__version__}-{'cuda' if HAS_CUDA else 'cpu'}"
    monkeypatch.setenv("NTKSCALE_EXT_DIR", str(tmp_path / "ext"))
    assert _ext.extension_dir() == tmp_path / "ext"
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "stale.o").write_text("x")
    monkeypatch.setattr(_ext, "_module", _ext._module)  # restored after the test
    _ext.clear_cache()
    assert not (tmp_path / "ext").exists() and _ext._module is None
    assert _ext.csrc_dir() == CSRC
    monkeypatch.setenv("NTKSCALE_CSRC", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="NTKSCALE_CSRC"):
        _ext.csrc_dir()


@compile_mark
@needs_build
def test_cpp_extension_blocks_over_j_and_checks_inputs():
    """The compiled op directly: j-blocking (block_j=4 < N2) and its own defensive checks."""
    from ntkscale.reductions import compiled as _ext

    ext = _ext.load_extension()
    assert ext.with_cuda() == HAS_CUDA
    C, k = 3, 2
    A1, G1, A2, G2 = make_factors(C, seed=16)
    V = torch.randn(N2, C, k, dtype=torch.float64)
    W = [torch.bmm(g.transpose(1, 2), V).contiguous() for g in G2]
    got = ext.ntk_reduce(A1, G1, A2, W, 2, 4)
    _close(got, explicit_matmul(A1, G1, A2, G2, V), torch.float64)
    with pytest.raises(RuntimeError, match=r"W\[1\] has shape \(9, 2, 2\), expected \(N2, o, k\)"):
        ext.ntk_reduce(A1, G1, A2, [W[0], W[1][:, :2].contiguous()])


# ---------------------------------------------------------------------------------------------
# the CUDA kernel without a GPU: emulated on the CPU, and compiled by nvcc
# ---------------------------------------------------------------------------------------------


def _compiler():
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@compile_mark
@pytest.mark.skipif(_compiler() is None, reason="needs a C++20 compiler")
def test_cuda_kernel_under_cpu_emulation(tmp_path):
    """Run the kernel body of ntk_reduce_kernel.cuh with one std::thread per CUDA thread and
    std::barrier for __syncthreads(), with both tile shapes, over ragged tiles (N1, N2, d, o*k
    not multiples of the tiles), C in {1, 3, 10}, k in {1, 4}, several layers, float32 and
    float64; Y's guard rows/columns check that exactly the valid entries are written."""
    exe = tmp_path / "emulate"
    src = REPO / "tests" / "csrc" / "ntk_reduce_emulate.cpp"
    subprocess.run(
        [_compiler(), "-std=c++20", "-O1", "-pthread", f"-I{CSRC}", str(src), "-o", str(exe)],
        check=True, timeout=120,
    )
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ALL OK" in res.stdout, res.stdout + res.stderr


_NVCC = shutil.which("nvcc")
_DRIVER = """
#include "ntk_reduce_kernel.cuh"
cudaError_t f32(const ntk::Args<float>& a, cudaStream_t s) { return ntk::launch_ntk_reduce(a, s); }
cudaError_t f64(const ntk::Args<double>& a, cudaStream_t s) { return ntk::launch_ntk_reduce(a, s); }
"""


@compile_mark
@pytest.mark.skipif(_NVCC is None, reason="nvcc is not on PATH")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    """The kernel (torch-free header) compiles with nvcc, on machines without a GPU too.

    A CPU-only torch wheel lacks c10/cuda's generated headers, so the torch glue
    (ntk_reduce_cuda.cu) cannot be compiled there; a tiny torch-free driver instantiates every
    kernel variant of the header instead.
    """
    drv = tmp_path / "driver.cu"
    drv.write_text(_DRIVER)
    cmd = [_NVCC, "-c", "-std=c++17", "-O3", f"-I{CSRC}", str(drv), "-o", str(tmp_path / "d.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "d.o").stat().st_size > 0


_TORCH_INC = [Path(p) for p in include_paths()]
_TORCH_HAS_CUDA_HEADERS = any(
    (p / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in _TORCH_INC
)


@compile_mark
@pytest.mark.slow
@pytest.mark.skipif(_NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.skipif(not _TORCH_HAS_CUDA_HEADERS, reason="this torch build has no CUDA headers")
def test_cuda_source_with_torch_glue_compiles_with_nvcc(tmp_path):
    """ntk_reduce_cuda.cu itself (torch headers included: minutes of nvcc time)."""
    incs = [f"-I{p}" for p in _TORCH_INC] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    cmd = [_NVCC, "-c", "-std=c++20", "-DWITH_CUDA", *incs, str(CSRC / "ntk_reduce_cuda.cu"),
           "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
