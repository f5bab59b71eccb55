"""Loader of the compiled kernel-space NTK reduction (``csrc/``), built on first use.

The extension is compiled by :func:`torch.utils.cpp_extension.load` the first time
:func:`load_extension` (or :func:`ntk_reduce`) is called -- never at import -- and cached:

* cache folder: ``$NTKSCALE_EXT_DIR`` if set, else
  ``~/.cache/ntkscale/ext/<torch version>-<cpu|cuda>``; :func:`clear_cache` empties it;
* sources: ``$NTKSCALE_CSRC`` if set, else ``csrc/`` of the source checkout (the package is
  installed editable, so ``Path(__file__).parents[3] / "csrc"``);
* ``csrc/ntk_reduce_cuda.cu`` is compiled (and ``WITH_CUDA`` defined) only when
  ``torch.cuda.is_available()`` and nvcc is found (``CUDA_HOME``); a CPU build runs the C++
  twin only, and a CUDA call into it raises a clear error.

Building needs a C++ compiler and ``ninja`` on ``PATH`` (``pip install 'ntkscale[cuda]'``
provides ninja), plus ``nvcc`` for the CUDA part. The first build takes about half a minute on
two CPU cores; later calls load the cached library.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "extension_dir",
    "csrc_dir",
    "load_extension",
    "is_built",
    "clear_cache",
    "ntk_reduce",
    "NTKReduceFunction",
]

log = logging.getLogger("ntkscale")

_EXT_NAME = "ntkscale_ntk_reduce"
_lock = threading.Lock()
_module: ModuleType | None = None


def _want_cuda() -> bool:
    """Build the CUDA kernel: torch has CUDA, a GPU is visible and nvcc can be found."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        warnings.warn(
            "a GPU is visible but nvcc was not found (set CUDA_HOME): building the CPU twin of "
            "the kernel-space reduction only, so impl='cuda' will fail",
            stacklevel=3,
        )
        return False
    return True


def extension_dir() -> Path:
    """Folder the extension is built into and loaded from.

    Returns:
        ``$NTKSCALE_EXT_DIR`` if set, else ``~/.cache/ntkscale/ext/<torch version>-<cpu|cuda>``.
    """
    env = os.environ.get("NTKSCALE_EXT_DIR")
    if env:
        return Path(env).expanduser()
    flavour = "cuda" if _want_cuda() else "cpu"
    return Path.home() / ".cache" / "ntkscale" / "ext" / f"{torch.__version__}-{flavour}"


def csrc_dir() -> Path:
    """Folder holding ``ntk_reduce.cpp``, ``ntk_reduce_cuda.cu`` and ``ntk_reduce_kernel.cuh``.

    Returns:
        ``$NTKSCALE_CSRC`` if set, else ``csrc/`` at the root of the source checkout.

    Raises:
        FileNotFoundError: if ``ntk_reduce.cpp`` is not there.
    """
    env = os.environ.get("NTKSCALE_CSRC")
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[3] / "csrc"
    if not (path / "ntk_reduce.cpp").is_file():
        raise FileNotFoundError(
            f"the compiled backends need the sources csrc/ntk_reduce.cpp, not found in {path}; "
            "install ntkscale from a source checkout (pip install -e .) or point NTKSCALE_CSRC "
            "at the csrc/ folder"
        )
    return path


def _library_name() -> str:
    return _EXT_NAME + ("_cuda" if _want_cuda() else "")


def is_built() -> bool:
    """Whether the extension is loaded, or its library is in :func:`extension_dir`, newer than
    the sources and built from these sources (torch rebuilds when the build command changes,
    e.g. sources in another folder): then :func:`load_extension` compiles nothing."""
    if _module is not None:
        return True
    try:
        src = csrc_dir()
    except FileNotFoundError:
        return False
    build = extension_dir()
    lib = build / f"{_library_name()}.so"
    ninja_file = build / "build.ninja"
    if not (lib.is_file() and ninja_file.is_file()):
        return False
    sources = [p for p in src.iterdir() if p.suffix in (".cpp", ".cu", ".cuh", ".h")]
    if any(p.stat().st_mtime > lib.stat().st_mtime for p in sources):
        return False
    return str(src / "ntk_reduce.cpp") in ninja_file.read_text(errors="replace")


def load_extension(verbose: bool = False) -> ModuleType:
    """Compile (first call, or after a source change) and load the extension.

    Args:
        verbose: print the compiler's output.

    Returns:
        The extension module, with ``ntk_reduce(A1, G1, A2, W, block_i=0, block_j=0)`` and
        ``with_cuda()``.

    Raises:
        RuntimeError: if the build fails (the compiler's message is part of it).
    """
    global _module
    with _lock:
        if _module is not None:
            return _module
        from torch.utils import cpp_extension

        src = csrc_dir()
        build = extension_dir()
        build.mkdir(parents=True, exist_ok=True)
        sources = [str(src / "ntk_reduce.cpp")]
        cflags = ["-O3"]
        cuda_flags: list[str] = []
        name = _EXT_NAME
        if _want_cuda():
            sources.append(str(src / "ntk_reduce_cuda.cu"))
            cflags.append("-DWITH_CUDA")
            cuda_flags = ["-O3", "-DWITH_CUDA", "-lineinfo"]
            name = _EXT_NAME + "_cuda"
        compiling = not is_built()
        if compiling:
            log.warning(
                "ntkscale: compiling the kernel-space extension (%s) into %s; a one-off that "
                "takes about half a minute on two CPU cores (later runs load it from there)",
                ", ".join(Path(p).name for p in sources), build,
            )
        t0 = time.perf_counter()
        _module = cpp_extension.load(
            name=name,
            sources=sources,
            build_directory=str(build),
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags or None,
            extra_include_paths=[str(src)],
            verbose=verbose,
        )
        if compiling:
            log.warning("ntkscale: compiled the kernel-space extension in %.1f s", time.perf_counter() - t0)
        return _module


def clear_cache() -> None:
    """Delete the build folder (:func:`extension_dir`); the next use rebuilds.

    An extension already loaded in this process stays loaded (Python cannot unload it).
    """
    global _module
    with _lock:
        shutil.rmtree(extension_dir(), ignore_errors=True)
        _module = None


def _check(A1: Sequence[Tensor], G1: Sequence[Tensor], A2: Sequence[Tensor],
           G2: Sequence[Tensor], V: Tensor) -> None:
    """Checks particular to the compiled op (shapes are checked by kernel_space._check_inputs)."""
    if V.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"the compiled kernel supports float32 and float64; got {V.dtype} "
            "(use impl='torch' for other dtypes)"
        )
    if V.device.type not in ("cpu", "cuda"):
        raise ValueError(f"the compiled kernel runs on CPU or CUDA tensors; got {V.device}")
    groups = {"A1": A1, "G1": G1, "A2": A2, "G2": G2}
    for name, seq in groups.items():
        for l, t in enumerate(seq):
            if not t.is_contiguous():
                raise ValueError(
                    f"{name}[{l}] with shape {tuple(t.shape)} and strides {t.stride()} is not "
                    "contiguous; the compiled kernel needs contiguous factors (call .contiguous())"
                )
    if not V.is_contiguous():
        raise ValueError(
            f"V with shape {tuple(V.shape)} and strides {V.stride()} is not contiguous; "
            "call .contiguous()"
        )


def _w_factors(G2: Sequence[Tensor], V: Tensor) -> list[Tensor]:
    # W[l][j] = sum_c' G2[l][j, c', :] (x) V[j, c', :] -> (N2, o, k), contiguous
    from .kernel_space import w_factors

    return w_factors(G2, V)


def _forward(A1, G1, A2, G2, V, block_size):
    ext = load_extension()
    W = _w_factors(G2, V)
    block = int(block_size) if block_size else 0
    return ext.ntk_reduce(list(A1), list(G1), list(A2), W, block, 0)


class NTKReduceFunction(torch.autograd.Function):
    """``out = Θ(1, 2) V`` through the compiled op, differentiable with respect to ``V`` only.

    The backward pass is the same reduction with the roles of sides 1 and 2 swapped:
    ``grad_V = Θ(2, 1) grad_out``. Gradients with respect to the factors ``A1, G1, A2, G2``
    are **not** computed: ``None`` is returned for them (a warning says so once if any of them
    requires grad). Use ``impl="torch"`` when gradients with respect to the factors are needed.

    Call as ``NTKReduceFunction.apply(V, block_size, L, *A1, *G1, *A2, *G2)``; prefer
    :func:`ntk_reduce`.
    """

    @staticmethod
    def forward(ctx, V: Tensor, block_size: int | None, L: int, *factors: Tensor) -> Tensor:
        A1, G1, A2, G2 = (factors[q * L:(q + 1) * L] for q in range(4))
        ctx.L = L
        ctx.block_size = block_size
        ctx.save_for_backward(*factors)
        return _forward(A1, G1, A2, G2, V, block_size)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        L = ctx.L
        factors = ctx.saved_tensors
        A1, G1, A2, G2 = (factors[q * L:(q + 1) * L] for q in range(4))
        if any(ctx.needs_input_grad[3:]):
            warnings.warn(
                "the compiled kernel-space product differentiates with respect to V only; "
                "the gradients with respect to the factors A1, G1, A2, G2 are left None "
                "(use impl='torch' for those)",
                stacklevel=2,
            )
        grad_V = None
        if ctx.needs_input_grad[0]:
            grad_V = _forward(A2, G2, A1, G1, grad_out.contiguous(), ctx.block_size)
        return (grad_V, None, None) + (None,) * len(factors)


def ntk_reduce(
    A1: Sequence[Tensor],
    G1: Sequence[Tensor],
    A2: Sequence[Tensor],
    G2: Sequence[Tensor],
    V: Tensor,
    block_size: int | None = None,
) -> Tensor:
    """Kernel-space NTK product by the compiled op (CPU twin or CUDA kernel by device).

    Computes
    ``out[i,c,r] = Σ_l Σ_j (A1[l][i]·A2[l][j]) Σ_c' (G1[l][i,c]·G2[l][j,c']) V[j,c',r]``.
    ``W_l = Σ_c' G2[l][:, c'] ⊗ V[:, c']`` is formed in torch; the reduction over ``j`` runs in
    the extension, which is compiled on the first call (see the module docstring).

    Args:
        A1: per layer, shape ``(N1, d_l)``.
        G1: per layer, shape ``(N1, C, o_l)``.
        A2: per layer, shape ``(N2, d_l)``.
        G2: per layer, shape ``(N2, C, o_l)``.
        V: shape ``(N2, C, k)``.
        block_size: rows ``i`` per parallel block of the CPU twin (ignored on CUDA);
            ``None`` picks one.

    Returns:
        Tensor of shape ``(N1, C, k)``, differentiable with respect to ``V`` only
        (see :class:`NTKReduceFunction`).

    Raises:
        TypeError: dtype other than float32/float64.
        ValueError: non-contiguous inputs, or a device other than CPU/CUDA.
    """
    from .kernel_space import check_factors

    check_factors(A1, G1, A2, G2, V)
    _check(A1, G1, A2, G2, V)
    L = len(A1)
    return NTKReduceFunction.apply(V, block_size, L, *A1, *G1, *A2, *G2)
