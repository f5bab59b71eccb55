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

import functools
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

from .function import Reduction, apply_reduction

__all__ = [
    "extension_dir",
    "csrc_dir",
    "load_extension",
    "loaded_extension",
    "wants_cuda",
    "is_built",
    "clear_cache",
    "ntk_reduce",
    "compiled_reduce",
]

log = logging.getLogger("ntkscale")

_EXT_NAME = "ntkscale_ntk_reduce"
_lock = threading.Lock()
_module: ModuleType | None = None


def loaded_extension() -> ModuleType | None:
    """The extension when this process has loaded it, else None (nothing is built or loaded)."""
    return _module


def wants_cuda() -> bool:
    """Whether a build here includes the CUDA kernel: torch has CUDA, a GPU is visible and nvcc
    can be found (warns once per call when a GPU is visible without nvcc)."""
    return _want_cuda()


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


def _library_name(cuda: bool | None = None) -> str:
    return _EXT_NAME + ("_cuda" if (_want_cuda() if cuda is None else cuda) else "")


def is_built(cuda: bool | None = None) -> bool:
    """Whether the extension is loaded, or its library is in :func:`extension_dir`, newer than
    the sources and built from these sources (torch rebuilds when the build command changes,
    e.g. sources in another folder): then :func:`load_extension` compiles nothing. ``cuda``:
    whether the build includes the CUDA kernel (default :func:`wants_cuda`)."""
    if _module is not None:
        return True
    try:
        src = csrc_dir()
    except FileNotFoundError:
        return False
    build = extension_dir()
    lib = build / f"{_library_name(cuda)}.so"
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
        cuda = _want_cuda()
        name = _library_name(cuda)
        if cuda:
            sources.append(str(src / "ntk_reduce_cuda.cu"))
            cflags.append("-DWITH_CUDA")
            cuda_flags = ["-O3", "-DWITH_CUDA", "-lineinfo"]
        compiling = not is_built(cuda)
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


def _reduce(A1, G1, A2, G2, V, block_size: int | None = None) -> Tensor:
    # W[l][j] = sum_c' G2[l][j, c', :] (x) V[j, c', :] -> (N2, o, k), contiguous, in torch;
    # the reduction over j in the extension
    from .core import w_factors

    ext = load_extension()
    block = int(block_size) if block_size else 0
    return ext.ntk_reduce(list(A1), list(G1), list(A2), w_factors(G2, V), block, 0)


def compiled_reduce(block_size: int | None = None) -> Reduction:
    """The unchecked compiled reduction with ``block_size`` rows per CPU block (validated inputs;
    see :mod:`.function`)."""
    return functools.partial(_reduce, block_size=block_size)


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
        (see :mod:`.function`).

    Raises:
        TypeError: dtype other than float32/float64.
        ValueError: non-contiguous inputs, or a device other than CPU/CUDA.
    """
    from .core import check_factors, check_fast_inputs

    check_factors(A1, G1, A2, G2, V)
    if V.device.type not in ("cpu", "cuda"):
        raise ValueError(f"the compiled kernel runs on CPU or CUDA tensors; got {V.device}")
    impl = "cuda" if V.device.type == "cuda" else "cpp"
    check_fast_inputs(A1, G1, A2, G2, V, impl)
    return apply_reduction(compiled_reduce(block_size), impl, A1, G1, A2, G2, V)
