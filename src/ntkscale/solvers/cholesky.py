"""Tiled Cholesky factorization of ``K + σ²I`` from explicit kernel blocks, in memory or out of core.

When a system has thousands of right-hand sides — exact posterior variances of many test
points — PCG costs ``columns × iterations`` products, and a direct factorization is far cheaper:
``n³/3`` multiply-adds once, then ``n²`` per column. The factor of an ``n = N C`` kernel does not
fit in memory at the sizes this library is for (``n = 50,000`` is 10 GB in float64), so it is
computed *left-looking by column panels* and kept, panel by panel, in a scratch directory:

    for each tile j (rows s_j..e_j):
        P   = K[s_j:, s_j:e_j] + σ² I                      (kernel blocks, row chunk by row chunk)
        P  -= Σ_{k<j} L[s_j:, k] L[s_j:e_j, k]ᵀ             (previous panels read back chunk by chunk)
        L_jj = chol(P[:t]);  L[e_j:, j] = P[t:] L_jjᵀ⁻¹      (stored as panel j)

Only one panel (``(n − s_j) × t``) and a few row chunks are ever in memory; the tile width ``t``
is chosen from ``memory_budget``. Kernel blocks come from slicing the operator
(``K[r0:r1, c0:c1].to_dense()``; for an :class:`ntkscale.NTKOperator` that costs the factors of
the samples the block touches and a few GEMMs). Triangular solves stream the panels once per
block of right-hand sides.

With ``scratch_dir`` given, a manifest records which panels are done: a run that stops (or a
later process with the same kernel, noise and tiling) resumes from the last finished panel. The
kernel is recognized by :func:`~ntkscale.solvers._utils.operator_fingerprint`: the operator's own
``fingerprint()`` when it has one (an :class:`ntkscale.NTKOperator` digests its parameters, data,
parameter selection, backend and dtype), else a digest of its representation tensors.
Without it the panels live in a temporary directory removed when the factor is garbage collected
(or, when the whole factor fits in half of ``memory_budget``, in memory).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from linear_operator import to_dense
from torch import Tensor
from tqdm.auto import tqdm

from ._utils import operator_fingerprint

__all__ = ["CholeskyInfo", "NotPositiveDefiniteError", "TiledCholesky", "cholesky_bytes", "free_disk_bytes"]

DEFAULT_MEMORY = 2 * 2**30  # bytes the factorization may hold in memory at once


class NotPositiveDefiniteError(ValueError):
    """``K + σ²I`` is not positive definite to the working precision."""


def free_disk_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk of ``path``, or of its nearest existing parent (0 if unknown)."""
    where = os.path.abspath(path)
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return 0


def cholesky_bytes(n: int, dtype: torch.dtype = torch.float64) -> int:
    """Bytes of the lower-triangular factor of an ``n × n`` matrix (its column panels)."""
    return n * (n + 1) // 2 * torch.finfo(dtype).bits // 8


@dataclass
class CholeskyInfo:
    """What :class:`TiledCholesky` did.

    Attributes:
        n: order of the matrix.
        tile: rows per tile (the last may be shorter); ``tiles`` is their count.
        on_disk: whether the panels live in ``scratch_dir`` (``None`` in memory).
        factor_bytes: bytes of the stored factor.
        resumed_tiles: panels found finished in ``scratch_dir`` and not recomputed.
        seconds: wall time of ``"kernel"`` (explicit blocks), ``"factor"`` (updates, the tile
            Cholesky factorizations and triangular solves) and ``"io"`` (reading/writing panels).
    """

    n: int
    tile: int
    tiles: int
    on_disk: bool
    scratch_dir: str | None
    factor_bytes: int
    resumed_tiles: int = 0
    seconds: dict = field(default_factory=lambda: {"kernel": 0.0, "factor": 0.0, "io": 0.0})


class TiledCholesky:
    """Lower Cholesky factor ``L Lᵀ = K + σ² I`` of a symmetric PSD operator, built from its blocks.

    Args:
        K: a square operator whose slices ``K[r0:r1, c0:c1]`` densify cheaply (an
            :class:`ntkscale.NTKOperator`, any ``linear_operator.LinearOperator``, a tensor).
        noise: ``σ² ≥ 0`` added to the diagonal.
        dtype: precision of the factor (default float64: the posterior variance
            ``Θ** − k*ᵀ(Θ + λI)⁻¹k*`` cancels most of its digits when ``λ`` is small). ``K`` is
            cast to it (for an ``NTKOperator`` the kernel itself is computed in this precision).
        tile: rows per tile; default the largest multiple of the operator's output count whose
            column panel (``n × tile``) takes a quarter of ``memory_budget``.
        memory_budget: bytes the factorization and the solves may hold at once (default 2 GiB).
        scratch_dir: directory for the panels. Default: memory when the factor fits in half of
            ``memory_budget``, else a temporary directory removed with this object. A given
            directory is kept, with a manifest that lets an interrupted or repeated
            factorization of the same kernel resume.
        progress: tqdm bars over tiles.

    Raises:
        ValueError: non-square ``K``, ``noise < 0``, a budget too small for one tile, or too little
            free disk for the factor.
        NotPositiveDefiniteError: a tile's Cholesky factorization failed (add noise, use float64).

    Memory: one column panel (``n × tile``) plus row chunks of a sixteenth of ``memory_budget``;
    disk: ``n (n+1)/2`` entries (:func:`cholesky_bytes`). Work: ``n³/3`` multiply-adds plus the
    explicit kernel blocks; each solve ``n²`` per right-hand side (two triangular passes).
    """

    def __init__(
        self,
        K,
        noise: float = 0.0,
        *,
        dtype: torch.dtype = torch.float64,
        tile: int | None = None,
        memory_budget: int = DEFAULT_MEMORY,
        scratch_dir: str | os.PathLike | None = None,
        progress: bool = False,
    ):
        n, n2 = K.shape[-2:]
        if len(K.shape) != 2 or n != n2:
            raise ValueError(f"TiledCholesky needs a square 2-D operator, got shape {tuple(K.shape)}")
        noise = float(noise)
        if not (noise >= 0 and math.isfinite(noise)):
            raise ValueError(f"noise must be a finite number >= 0, got {noise}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        memory_budget = int(memory_budget)
        self.n, self.noise, self.dtype = int(n), noise, dtype
        self.device = K.device if isinstance(K.device, torch.device) else torch.device("cpu")
        self.memory_budget = memory_budget
        self.progress = bool(progress)
        self._itemsize = torch.finfo(dtype).bits // 8
        self._np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        if isinstance(K, Tensor):
            self._K = K.to(dtype)
        else:
            self._K = K if K.dtype == dtype else K.to(dtype)
        align = int(getattr(K, "num_outputs", 1) or 1)  # tiles of whole samples for an NTKOperator
        if tile is None:
            tile = memory_budget // (4 * self.n * self._itemsize)
            tile = min(self.n, max(align, tile - tile % align))
            if tile * self.n * self._itemsize > memory_budget // 2:
                raise ValueError(
                    f"memory_budget={memory_budget} bytes is too small for one column panel of a "
                    f"{self.n}-row factor (needs at least {2 * align * self.n * self._itemsize} bytes)"
                )
        tile = int(tile)
        if tile < 1:
            raise ValueError(f"tile must be a positive int, got {tile}")
        self.tile = min(tile, self.n)
        self.bounds = [(s, min(s + self.tile, self.n)) for s in range(0, self.n, self.tile)]
        chunk = memory_budget // (16 * self.tile * self._itemsize)
        self._chunk = max(align, chunk - chunk % align, 1)

        total = cholesky_bytes(self.n, dtype) + self.n * self.tile * self._itemsize // 2
        keep = scratch_dir is not None
        if scratch_dir is None and total <= memory_budget // 2:
            self._dir = None
        else:
            if scratch_dir is None:
                scratch_dir = tempfile.mkdtemp(prefix="ntkscale-cholesky-")
                self._finalizer = weakref.finalize(self, shutil.rmtree, scratch_dir, True)
            os.makedirs(scratch_dir, exist_ok=True)
            free = free_disk_bytes(scratch_dir)
            have = sum(  # panels of an earlier run, resumed or overwritten
                os.path.getsize(os.path.join(scratch_dir, f))
                for f in os.listdir(scratch_dir)
                if f.startswith("panel_") and f.endswith(".bin")
            )
            if total - have > free:
                raise ValueError(
                    f"the Cholesky factor needs {total / 2**30:.1f} GiB of disk and {scratch_dir} "
                    f"has {free / 2**30:.1f} GiB free; pass scratch_dir= on a larger disk, or use "
                    "the iterative (CG) path"
                )
            self._dir = str(scratch_dir)
        self._mem: dict[int, Tensor] = {}
        self.info = CholeskyInfo(
            n=self.n,
            tile=self.tile,
            tiles=len(self.bounds),
            on_disk=self._dir is not None,
            scratch_dir=self._dir,
            factor_bytes=cholesky_bytes(self.n, dtype),
        )
        self._factor(resume=keep)

    # -- panel storage --------------------------------------------------------------------------
    def _path(self, j: int) -> str:
        return os.path.join(self._dir, f"panel_{j:05d}.bin")

    def _put(self, j: int, panel: Tensor) -> None:
        t0 = time.perf_counter()
        if self._dir is None:
            self._mem[j] = panel
        else:
            tmp = self._path(j) + ".tmp"
            panel.cpu().numpy().tofile(tmp)
            os.replace(tmp, self._path(j))  # a panel on disk is always complete
        self.info.seconds["io"] += time.perf_counter() - t0

    def _rows(self, j: int, r0: int, r1: int) -> Tensor:
        """Rows ``r0:r1`` (absolute) of column panel ``j``.  # shape: (r1 - r0, t_j)"""
        s, e = self.bounds[j]
        t = e - s
        if self._dir is None:
            return self._mem[j][r0 - s : r1 - s]
        t0 = time.perf_counter()
        arr = np.fromfile(self._path(j), dtype=self._np_dtype, count=(r1 - r0) * t, offset=(r0 - s) * t * self._itemsize)
        out = torch.from_numpy(arr).reshape(r1 - r0, t).to(self.device)
        self.info.seconds["io"] += time.perf_counter() - t0
        return out

    def _row_chunks(self, start: int):
        for r0 in range(start, self.n, self._chunk):
            yield r0, min(r0 + self._chunk, self.n)

    # -- resume ---------------------------------------------------------------------------------
    def _key(self) -> str:
        """What defines the factor: the kernel's fingerprint, the noise, the tiling and the dtype."""
        h = hashlib.sha256(operator_fingerprint(self._K).encode())
        h.update(repr((self.n, self.noise, self.bounds, str(self.dtype))).encode())
        return h.hexdigest()

    def _manifest(self) -> str:
        return os.path.join(self._dir, "manifest.json")

    def _done(self, key: str) -> int:
        try:
            with open(self._manifest()) as f:
                m = json.load(f)
        except (OSError, ValueError):
            return 0
        if m.get("key") != key:
            return 0
        done = int(m.get("done", 0))
        return done if all(os.path.exists(self._path(j)) for j in range(done)) else 0

    def _mark(self, key: str, done: int) -> None:
        tmp = self._manifest() + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"key": key, "done": done, "tiles": len(self.bounds), "n": self.n}, f)
        os.replace(tmp, self._manifest())

    # -- factorization --------------------------------------------------------------------------
    def _block(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        t0 = time.perf_counter()
        out = to_dense(self._K[r0:r1, c0:c1]).detach().to(device=self.device, dtype=self.dtype)
        self.info.seconds["kernel"] += time.perf_counter() - t0
        return out

    def _factor(self, resume: bool) -> None:
        key = self._key() if resume and self._dir is not None else None
        first = self._done(key) if key is not None else 0
        self.info.resumed_tiles = first
        bar = tqdm(
            range(first, len(self.bounds)),
            desc="Cholesky tiles",
            disable=not self.progress,
            leave=False,
            initial=first,
            total=len(self.bounds),
        )
        for j in bar:
            s, e = self.bounds[j]
            t = e - s
            panel = torch.empty(self.n - s, t, dtype=self.dtype, device=self.device)
            for r0, r1 in self._split(s, e):
                panel[r0 - s : r1 - s] = self._block(r0, r1, s, e)
            if not torch.isfinite(panel).all():
                raise ValueError(f"the kernel has NaN/inf entries in rows {s}..{self.n} of columns {s}..{e}")
            panel[:t].diagonal().add_(self.noise)
            t0, io0 = time.perf_counter(), self.info.seconds["io"]
            for k in range(j):
                Ljk = self._rows(k, s, e)  # (t, t_k)
                panel[:t].addmm_(Ljk, Ljk.mT, alpha=-1.0)
                for r0, r1 in self._row_chunks(e):
                    panel[r0 - s : r1 - s].addmm_(self._rows(k, r0, r1), Ljk.mT, alpha=-1.0)
            L, err = torch.linalg.cholesky_ex(panel[:t])
            if int(err) != 0:
                hint = (
                    "add noise (the factor is float64 already; a kernel computed in float32 carries "
                    "its round-off into the factor: build the operator with dtype=torch.float64)"
                    if self.dtype == torch.float64
                    else "add noise, or factor in float64 (dtype=torch.float64)"
                )
                raise NotPositiveDefiniteError(
                    f"K + {self.noise:.3g} I is not positive definite in {self.dtype} (the Cholesky "
                    f"factorization of tile {j} failed at its row {int(err)}): {hint}"
                )
            panel[:t] = L
            if t < panel.shape[0]:
                for r0, r1 in self._row_chunks(e):
                    sl = slice(r0 - s, r1 - s)
                    panel[sl] = torch.linalg.solve_triangular(L.mT, panel[sl], upper=True, left=False)
            # reading the earlier panels is counted as I/O, not as factor time
            self.info.seconds["factor"] += time.perf_counter() - t0 - (self.info.seconds["io"] - io0)
            self._put(j, panel)
            del panel
            if key is not None:
                self._mark(key, j + 1)
        bar.close()

    def _split(self, s: int, e: int):
        """Row chunks of ``[s, n)``: the tile's own rows first, then chunks of the rest."""
        yield s, e
        yield from self._row_chunks(e)

    # -- solves ---------------------------------------------------------------------------------
    def _check_rhs(self, B: Tensor) -> tuple[Tensor, bool]:
        if not isinstance(B, Tensor):
            raise TypeError(f"the right-hand side must be a torch.Tensor, got {type(B).__name__}")
        vec = B.ndim == 1
        if B.ndim not in (1, 2) or B.shape[0] != self.n:
            raise ValueError(f"the right-hand side must have shape ({self.n},) or ({self.n}, k), got {tuple(B.shape)}")
        B = B.to(device=self.device, dtype=self.dtype, copy=True)
        return (B[:, None] if vec else B), vec

    def solve_lower(self, B: Tensor) -> Tensor:
        """``L⁻¹ B`` (forward substitution, one pass over the panels).  # shape: like B"""
        W, vec = self._check_rhs(B)
        for j, (s, e) in enumerate(self.bounds):
            W[s:e] = torch.linalg.solve_triangular(self._rows(j, s, e), W[s:e], upper=False)
            for r0, r1 in self._row_chunks(e):
                W[r0:r1].addmm_(self._rows(j, r0, r1), W[s:e], alpha=-1.0)
        return W[:, 0] if vec else W

    def solve_upper(self, W: Tensor) -> Tensor:
        """``L⁻ᵀ W`` (backward substitution, one pass over the panels).  # shape: like W"""
        X, vec = self._check_rhs(W)
        for j in reversed(range(len(self.bounds))):
            s, e = self.bounds[j]
            acc = X[s:e]
            for r0, r1 in self._row_chunks(e):
                acc.addmm_(self._rows(j, r0, r1).mT, X[r0:r1], alpha=-1.0)
            X[s:e] = torch.linalg.solve_triangular(self._rows(j, s, e).mT, acc, upper=True)
        return X[:, 0] if vec else X

    def solve(self, B: Tensor) -> Tensor:
        """``(K + σ² I)⁻¹ B``.  # shape: like B"""
        return self.solve_upper(self.solve_lower(B))

    def inv_quad(self, B: Tensor) -> Tensor:
        """``diag(Bᵀ (K + σ² I)⁻¹ B) = ‖L⁻¹ b‖²`` per column.  # shape: (k,) or () for a vector"""
        W = self.solve_lower(B)
        return W.square().sum(0)

    def logdet(self) -> float:
        """``logdet(K + σ² I) = 2 Σ log diag L`` (exact, from the diagonal tiles)."""
        return float(sum(2 * self._rows(j, s, e).diagonal().log().sum().item() for j, (s, e) in enumerate(self.bounds)))

    def close(self) -> None:
        """Remove the panels (and the scratch directory, if it was a temporary one)."""
        self._mem.clear()
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
        elif self._dir is not None:
            for j in range(len(self.bounds)):
                if os.path.exists(self._path(j)):
                    os.remove(self._path(j))
            if os.path.exists(self._manifest()):
                os.remove(self._manifest())

    def __repr__(self) -> str:
        where = f"disk:{self._dir}" if self._dir is not None else "memory"
        return (
            f"TiledCholesky(n={self.n}, noise={self.noise:.3g}, tile={self.tile}, tiles={len(self.bounds)}, "
            f"dtype={self.dtype}, {where})"
        )
