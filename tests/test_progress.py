"""Progress bars are shown on long work when asked, with the right totals, and never otherwise."""

from __future__ import annotations

import re

import torch

import ntkscale as nks
from ntkscale.solvers import TiledCholesky

from .cases import make


def _kernel():
    model, X, Xt = make("mlp-C3", n=30, m=7)
    return model, X, Xt, nks.NTKOperator(model, X, backend="structured")


def test_cg_progress_counts_every_iteration(capsys):
    _, _, _, K = _kernel()
    rhs = torch.randn(K.shape[0], dtype=torch.float64)
    x, info = nks.solve(K, rhs, noise=1e-3, preconditioner=None, tol=1e-8, max_iter=500, progress=True)
    err = capsys.readouterr().err
    assert "CG" in err and "residual=" in err
    # the bar's last refresh shows every iteration against the cap
    counts = [int(m) for m in re.findall(r"(\d+)/500", err)]
    assert info.iterations > 1 and max(counts) == info.iterations
    nks.solve(K, rhs, noise=1e-3, preconditioner=None, tol=1e-8, max_iter=500)
    assert capsys.readouterr().err == ""  # off by default


def test_gp_variance_progress_over_blocks(capsys):
    model, X, Xt, _ = _kernel()
    y = torch.randn(X.shape[0], 3, dtype=torch.float64)
    gp = nks.NTKGP(model, X, y, noise=0.1, exact_solver="cg", block_size=6, progress=True)
    gp.predict(Xt)
    err = capsys.readouterr().err
    assert "exact variances" in err
    assert "/4" in err  # 7 test points, 2 per block of 6 rows (C = 3): 4 blocks
    gp_quiet = nks.NTKGP(model, X, y, noise=0.1, exact_solver="cg", block_size=6)
    gp_quiet.predict(Xt)
    assert "variances" not in capsys.readouterr().err


def test_cholesky_progress_over_tiles(capsys):
    _, _, _, K = _kernel()
    TiledCholesky(K, noise=0.1, tile=30, progress=True)  # 90 rows in tiles of 30
    err = capsys.readouterr().err
    assert "Cholesky tiles" in err and "/3" in err
    TiledCholesky(K, noise=0.1, tile=30)
    assert capsys.readouterr().err == ""
