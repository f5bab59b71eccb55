"""TiledCholesky (direct factor of K + σ²I from explicit blocks, in memory or out of core) and the
NTKGP Cholesky path, against dense float64 references (``torch.linalg`` on the explicit kernel
from ``tests.cases.reference_jacobian``, one autograd row at a time).

Tolerances: 1e-10 relative for float64 factors (a Cholesky solve of a matrix with condition number
~1e3 loses ~3 digits of 16), 1e-4 for the float32 factor.
"""

from __future__ import annotations

import copy
import gc
import os

import pytest
import torch
from linear_operator.operators import DenseLinearOperator
from torch import nn

import ntkscale as nks
import ntkscale.solvers.cholesky as chol_module
from ntkscale.gp import NTKGP
from ntkscale.solvers import NotPositiveDefiniteError, TiledCholesky, cholesky_bytes

from .cases import reference_jacobian

DT = torch.float64


@pytest.fixture(scope="module")
def kernel():
    """An MLP NTK with C = 3 outputs on N = 37 points (n = 111), its dense float64 reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)
    X = torch.randn(37, 5, dtype=DT)
    J = reference_jacobian(model, X)
    return {"model": model, "X": X, "K": J @ J.T}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "kw",
    [
        {},  # one tile, in memory
        {"tile": 12},  # tiles of 4 samples, the last one short (111 = 9 * 12 + 3)
        {"tile": 7},  # tiles that cut samples apart
        {"tile": 12, "memory_budget": 30_000},  # on disk, row chunks of 18 rows
    ],
    ids=["one-tile", "tiles", "ragged", "disk"],
)
def test_solves_match_dense(kernel, kw, tmp_path):
    K = nks.NTKOperator(kernel["model"], kernel["X"], backend="structured")
    noise = 0.1
    A = kernel["K"] + noise * torch.eye(111, dtype=DT)
    B = torch.randn(111, 4, dtype=DT)
    c = TiledCholesky(K, noise, scratch_dir=tmp_path if "memory_budget" in kw else None, **kw)
    assert c.info.on_disk == ("memory_budget" in kw)
    ref = torch.linalg.solve(A, B)
    assert _rel(c.solve(B), ref) < 1e-10
    assert _rel(c.solve(B[:, 0]), ref[:, 0]) < 1e-10  # a vector
    L = torch.linalg.cholesky(A)
    assert _rel(c.solve_lower(B), torch.linalg.solve_triangular(L, B, upper=False)) < 1e-10
    assert _rel(c.inv_quad(B), (B * ref).sum(0)) < 1e-10
    assert abs(c.logdet() - torch.logdet(A).item()) < 1e-10 * abs(torch.logdet(A).item())
    assert c.info.tiles == -(-111 // c.tile)
    if c.info.on_disk:
        assert len([f for f in os.listdir(tmp_path) if f.startswith("panel_")]) == c.info.tiles


@pytest.mark.parametrize("make", ["tensor", "linear_operator"])
def test_any_operator_and_float32(kernel, make):
    A = kernel["K"]
    Kop = A if make == "tensor" else DenseLinearOperator(A)
    B = torch.randn(111, 2, dtype=DT)
    ref = torch.linalg.solve(A + 0.5 * torch.eye(111, dtype=DT), B)
    assert _rel(TiledCholesky(Kop, 0.5, tile=20).solve(B), ref) < 1e-10
    c32 = TiledCholesky(Kop, 0.5, tile=20, dtype=torch.float32)
    out = c32.solve(B)
    assert out.dtype == torch.float32 and _rel(out.double(), ref) < 1e-4


def test_interrupted_factorization_resumes(kernel, tmp_path, monkeypatch):
    K = nks.NTKOperator(kernel["model"], kernel["X"], backend="structured")
    kw = dict(tile=12, memory_budget=30_000, scratch_dir=tmp_path)
    real = torch.linalg.cholesky_ex
    calls = []

    def failing(A, *args, **kwargs):
        calls.append(A.shape)
        if len(calls) == 5:  # the fifth tile: stop as if the run were killed
            raise KeyboardInterrupt
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    with pytest.raises(KeyboardInterrupt):
        TiledCholesky(K, 0.1, **kw)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", real)
    c = TiledCholesky(K, 0.1, **kw)
    assert c.info.resumed_tiles == 4
    B = torch.randn(111, 3, dtype=DT)
    assert _rel(c.solve(B), torch.linalg.solve(kernel["K"] + 0.1 * torch.eye(111, dtype=DT), B)) < 1e-10
    # a finished factor is reused whole; another noise level is a different matrix: recomputed
    assert TiledCholesky(K, 0.1, **kw).info.resumed_tiles == c.info.tiles
    other = TiledCholesky(K, 0.2, **kw)
    assert other.info.resumed_tiles == 0
    assert _rel(other.solve(B), torch.linalg.solve(kernel["K"] + 0.2 * torch.eye(111, dtype=DT), B)) < 1e-10


def test_temporary_directory_is_removed(kernel):
    c = TiledCholesky(kernel["K"], 0.1, tile=12, memory_budget=30_000)
    where = c.info.scratch_dir
    assert c.info.on_disk and os.path.isdir(where)
    del c
    gc.collect()
    assert not os.path.exists(where)
    c = TiledCholesky(kernel["K"], 0.1, tile=12, memory_budget=30_000)
    where = c.info.scratch_dir
    c.close()
    assert not os.path.exists(where)


def test_bad_inputs(kernel, monkeypatch, tmp_path):
    A = kernel["K"]
    with pytest.raises(ValueError, match="square 2-D operator"):
        TiledCholesky(A[:, :50], 0.1)
    with pytest.raises(ValueError, match="noise must be a finite number >= 0"):
        TiledCholesky(A, -1.0)
    with pytest.raises(ValueError, match="too small for one column panel"):
        TiledCholesky(A, 0.1, memory_budget=100)
    indefinite = A - 2 * A.diagonal().max() * torch.eye(111, dtype=DT)
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite .* add noise"):
        TiledCholesky(indefinite, 0.0, tile=20)
    bad = A.clone()
    bad[60, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf entries"):
        TiledCholesky(bad, 0.1, tile=20)
    c = TiledCholesky(A, 0.1)
    with pytest.raises(ValueError, match=r"shape \(111,\) or \(111, k\)"):
        c.solve(torch.randn(110, dtype=DT))
    monkeypatch.setattr(chol_module.shutil, "disk_usage", lambda _: type("U", (), {"free": 10})())
    with pytest.raises(ValueError, match="GiB of disk"):
        TiledCholesky(A, 0.1, tile=12, memory_budget=30_000)
    assert cholesky_bytes(111) == 111 * 112 // 2 * 8


# -- the NTKGP Cholesky path ----------------------------------------------------------------------


def test_gp_factor_on_disk_and_reused(kernel, tmp_path):
    torch.manual_seed(1)
    X, model = kernel["X"], kernel["model"]
    y = torch.randn(37, 3, dtype=DT)
    Xt = torch.randn(9, 5, dtype=DT)
    kw = dict(noise=0.05, backend="structured", exact_solver="cholesky", factor_memory=40_000,
              scratch_dir=str(tmp_path), tol=1e-12)
    gp = NTKGP(model, X, y, **kw)
    mean, var = gp.predict(Xt)
    info = gp.info.factor
    assert gp.info.solver == "cholesky" and info.on_disk and info.tiles > 3
    ref = NTKGP(model, X, y, noise=0.05, backend="dense", exact_solver="cg", tol=1e-12)
    ref_mean, ref_var = ref.predict(Xt)
    assert _rel(mean, ref_mean) < 1e-8 and _rel(var, ref_var) < 1e-8
    # a new GP on the same kernel and λ reads the finished factor back
    gp2 = NTKGP(model, X, y, **kw)
    _, var2 = gp2.predict(Xt)
    assert gp2.info.factor.resumed_tiles == info.tiles
    assert _rel(var2, var) < 1e-12


def test_gp_auto_picks_the_cheaper_path(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the cost model's rates scale with the threads: fix them
    try:
        _auto_picks_the_cheaper_path(monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _auto_picks_the_cheaper_path(monkeypatch):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)  # P = 17
    X = torch.randn(3000, 2, dtype=DT)
    gp = NTKGP(model, X, torch.sin(X[:, :1]), noise=0.1, backend="structured")
    # n = 3000: factor 3000³/3 = 9e9 multiply-adds + 3000² per column; PCG 100 iterations of a
    # product whose estimated time (a few layer calls of ~40 µs) is worth ~1e7 multiply-adds at
    # the GEMM rate: ~1e9 per column, so PCG for one column and the factor for 50
    assert not gp.use_cholesky(1)
    assert gp.use_cholesky(50)
    _, var = gp.predict(torch.randn(3, 2, dtype=DT))
    assert gp.info.solver == "cg"
    # a factor that fits neither in memory nor on disk: PCG
    gp.factor_memory = 1000
    monkeypatch.setattr("shutil.disk_usage", lambda _: type("U", (), {"free": 10})())
    assert not gp.use_cholesky(50)
    with pytest.raises(ValueError, match="exact_solver must be"):
        NTKGP(model, X, torch.sin(X[:, :1]), noise=0.1, exact_solver="lu")


@pytest.mark.cuda
@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_cuda_factor_matches_dense(kernel, on_disk, tmp_path):
    """An NTKOperator on the GPU: kernel blocks, panels (in GPU memory or read back from disk) and
    solves on the device, equal to the dense float64 reference."""
    K = nks.NTKOperator(copy.deepcopy(kernel["model"]).cuda(), kernel["X"].cuda(), backend="structured")
    kw = {"tile": 12, "memory_budget": 30_000, "scratch_dir": tmp_path} if on_disk else {"tile": 12}
    c = TiledCholesky(K, 0.1, **kw)
    B = torch.randn(111, 3, dtype=DT)
    out = c.solve(B.cuda())
    assert out.device.type == "cuda" and c.info.on_disk == on_disk
    assert _rel(out.cpu(), torch.linalg.solve(kernel["K"] + 0.1 * torch.eye(111, dtype=DT), B)) < 1e-10


def test_resume_key_tells_apart_kernels_that_differ_far_from_the_corner(kernel, tmp_path):
    # Two NTKs on data that differ only in samples 34..36 (rows 102..110 with C = 3): the
    # top-left corner of the kernels is identical, the factors are not.
    X2 = kernel["X"].clone()
    X2[34:] += 0.5
    J2 = reference_jacobian(kernel["model"], X2)
    kw = dict(tile=12, memory_budget=30_000, scratch_dir=tmp_path)
    K1 = nks.NTKOperator(kernel["model"], kernel["X"], backend="structured")
    K2 = nks.NTKOperator(kernel["model"], X2, backend="structured")
    assert torch.equal(K1[:64, :64].to_dense(), K2[:64, :64].to_dense())
    B = torch.randn(111, 3, dtype=DT)
    TiledCholesky(K1, 0.1, **kw)
    c2 = TiledCholesky(K2, 0.1, **kw)
    assert c2.info.resumed_tiles == 0
    assert _rel(c2.solve(B), torch.linalg.solve(J2 @ J2.T + 0.1 * torch.eye(111, dtype=DT), B)) < 1e-10
    # The same kernel, built afresh (a copy of the model, the data re-made), does resume.
    K1b = nks.NTKOperator(copy.deepcopy(kernel["model"]), kernel["X"].clone(), backend="structured")
    assert K1b.fingerprint() == K1.fingerprint() != K2.fingerprint()
    TiledCholesky(K1, 0.1, **kw)
    assert TiledCholesky(K1b, 0.1, **kw).info.resumed_tiles == 10  # 111 rows in tiles of 12
    # What else defines the kernel changes the fingerprint: parameter selection, backend, dtype, weights.
    last_layer = nks.NTKOperator(kernel["model"], kernel["X"], params="2", backend="structured")
    assert last_layer.fingerprint() != K1.fingerprint()
    assert K1.with_backend("dense").fingerprint() != K1.fingerprint()
    assert K1.to(torch.float32).fingerprint() != K1.fingerprint()
    moved = copy.deepcopy(kernel["model"])
    with torch.no_grad():
        moved[2].bias[1] += 1e-9
    assert nks.NTKOperator(moved, kernel["X"], backend="structured").fingerprint() != K1.fingerprint()


def test_resume_key_of_generic_operators_covers_every_entry(tmp_path):
    # Dense kernels (no fingerprint method) that differ only in rows/columns 100..110.
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(160, 40, dtype=DT, generator=gen)
    A = J @ J.T
    u = torch.zeros(160, dtype=DT)
    u[100:111] = 1.0
    A2 = A + torch.outer(u, u)
    kw = dict(tile=16, memory_budget=60_000, scratch_dir=tmp_path)
    B = torch.randn(160, 2, dtype=DT, generator=gen)
    for make in (lambda M: M, DenseLinearOperator):
        TiledCholesky(make(A), 0.1, **kw)
        c2 = TiledCholesky(make(A2), 0.1, **kw)
        assert c2.info.resumed_tiles == 0
        assert _rel(c2.solve(B), torch.linalg.solve(A2 + 0.1 * torch.eye(160, dtype=DT), B)) < 1e-10
        assert TiledCholesky(make(A2.clone()), 0.1, **kw).info.resumed_tiles == c2.info.tiles
