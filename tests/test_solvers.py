"""Tests of the matrix-free solvers against dense float64 references.

Test matrices are ``K = J Jᵀ`` with a random ``J`` whose column scales decay like ``j^-decay``
(an empirical-NTK-like spectrum: fast decay, bad conditioning). They are wrapped in a counting
``LinearOperator`` that refuses ``to_dense()``, so every test also proves that the solvers stay
matrix-free and batch their products.

Tolerances, chosen per operation:
* CG solves: ``tol=1e-11`` on problems with condition number ~1e4, so the forward error is
  ≤ cond · tol ≈ 1e-7 < 1e-6 (the asserted bound).
* Extreme eigenvalues: Lanczos with full reorthogonalization to bounds of 1e-10 · λ_max; the
  asserted relative error is 1e-4.
* SLQ log-determinant: the estimate is random; within 4 standard errors, and within 1% with
  100 probes (the probe noise is then ~0.1%).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from unittest import mock

import pytest
import torch
from linear_operator.operators import DenseLinearOperator, LinearOperator

from ntkscale.solvers import (
    ConvergenceWarning,
    PivotedCholeskyPreconditioner,
    build_preconditioner,
    condition_number,
    eigvalsh_extremes,
    lanczos,
    logdet,
    settings,
    solve,
    spectral_density,
)

DTYPE = torch.float64
PRECONDITIONERS = [None, "jacobi", "pivchol", "nystrom"]


class CountingOperator(LinearOperator):
    """A dense symmetric matrix seen only through products, the diagonal and rows.

    Counts ``matmul`` calls (one per batched product) and the columns multiplied, diagonal
    calls and rows fetched; a full ``to_dense()`` fails the test.
    """

    def __init__(self, dense: torch.Tensor, counter: Counter | None = None):
        counter = Counter() if counter is None else counter
        super().__init__(dense, counter=counter)
        self.dense = dense  # shape: (n, n)
        self.counter = counter

    def _matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        self.counter["matmul"] += 1
        self.counter["columns"] += 1 if rhs.dim() == 1 else rhs.shape[-1]
        return self.dense @ rhs

    def _size(self) -> torch.Size:
        return self.dense.shape

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _diagonal(self) -> torch.Tensor:
        self.counter["diagonal"] += 1
        return self.dense.diagonal().clone()

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        if not torch.is_tensor(row_index):
            raise AssertionError(f"only rows by a LongTensor are cheap, got {row_index!r}")
        self.counter["rows"] += row_index.numel()
        return DenseLinearOperator(self.dense[row_index, col_index])

    def to_dense(self) -> torch.Tensor:
        raise AssertionError("a solver called to_dense() on the whole operator")


def ntk_like(n: int, p: int, decay: float, seed: int) -> torch.Tensor:
    """``J Jᵀ`` with ``J`` (n, p) Gaussian, column j scaled by ``10 j^-decay / sqrt(p)``."""
    gen = torch.Generator().manual_seed(seed)
    scales = 10 * torch.arange(1, p + 1, dtype=DTYPE) ** -decay / math.sqrt(p)
    J = torch.randn(n, p, dtype=DTYPE, generator=gen) * scales  # shape: (n, p)
    return J @ J.T


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def well_posed() -> tuple[torch.Tensor, float]:
    """n = 300, noise 1e-2: condition number ~1e4."""
    return ntk_like(300, 300, 1.0, seed=0), 1e-2


@pytest.fixture(scope="module")
def ill_posed() -> tuple[torch.Tensor, float]:
    """n = 400, noise 1e-3: condition number ~1e5, spectrum decaying like an NTK's."""
    return ntk_like(400, 400, 1.0, seed=1), 1e-3


@pytest.fixture(scope="module")
def spread() -> tuple[torch.Tensor, float]:
    """n = 300, p = 600, noise 1e-2: condition number ~1e3, distinct eigenvalues at both ends."""
    return ntk_like(300, 600, 0.5, seed=0), 1e-2


# --------------------------------------------------------------------------------------- CG


@pytest.mark.parametrize("k", [None, 4], ids=["vector", "4rhs"])
@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
def test_solve_matches_dense(well_posed, preconditioner, k):
    Kd, noise = well_posed
    n = Kd.shape[0]
    rhs = randn(n, seed=3) if k is None else randn(n, k, seed=3)  # shape: (n,) or (n, k)
    K = CountingOperator(Kd)
    x, info = solve(K, rhs, noise=noise, preconditioner=preconditioner, tol=1e-11, max_iter=2000, rank=30)
    A = Kd + noise * torch.eye(n, dtype=DTYPE)
    ref = torch.cholesky_solve(rhs.reshape(n, -1), torch.linalg.cholesky(A)).reshape(rhs.shape)
    assert x.shape == rhs.shape and x.dtype == DTYPE
    assert info.converged and bool(info.converged_per_column.all())
    assert info.residual_norm.shape == (1 if k is None else k,)
    assert float(info.residual_norm.max()) <= 1e-11
    assert torch.linalg.norm(x - ref) <= 1e-6 * torch.linalg.norm(ref)
    assert info.preconditioner == preconditioner
    # Batched: one product per iteration for all columns (plus true-residual checks and the sketch).
    sketch = 1 if preconditioner == "nystrom" else 0
    assert K.counter["matmul"] == info.matvecs + sketch
    assert info.matvecs <= info.iterations + 1 + info.restarts
    assert "converged" in str(info)


def test_preconditioners_cut_iterations_and_are_applied(ill_posed):
    Kd, noise = ill_posed
    rhs = randn(Kd.shape[0], 2, seed=4)
    K = CountingOperator(Kd)
    _, plain = solve(K, rhs, noise=noise, tol=1e-6, max_iter=2000)

    nystrom = build_preconditioner(K, "nystrom", noise=noise, rank=50, seed=0)
    with mock.patch.object(nystrom, "apply", wraps=nystrom.apply) as spy:
        _, nys = solve(K, rhs, noise=noise, preconditioner=nystrom, tol=1e-6, max_iter=2000)
    assert spy.call_count >= nys.iterations

    apply = PivotedCholeskyPreconditioner.apply
    with mock.patch.object(PivotedCholeskyPreconditioner, "apply", autospec=True, side_effect=apply) as spy:
        _, piv = solve(K, rhs, noise=noise, preconditioner="pivchol", rank=50, tol=1e-6, max_iter=2000)
    assert spy.call_count >= piv.iterations

    assert plain.converged and nys.converged and piv.converged
    assert nys.preconditioner == "nystrom" and piv.preconditioner == "pivchol"
    # Seeded problem: ~260 plain iterations against ~50-60 preconditioned ones.
    assert 3 * nys.iterations < plain.iterations
    assert 3 * piv.iterations < plain.iterations


def test_nonconvergence_warns_and_names_the_knob(ill_posed):
    Kd, noise = ill_posed
    K = CountingOperator(Kd)
    rhs = randn(Kd.shape[0], seed=5)
    with pytest.warns(ConvergenceWarning, match=r"CG stopped at 5 iterations .* raise max_iter \(now 5\).*'nystrom'"):
        x, info = solve(K, rhs, noise=noise, tol=1e-8, max_iter=5)
    assert not info.converged and info.iterations == 5
    assert float(info.residual_norm[0]) > 1e-8
    match = r"raise max_iter \(now 3\) or raise the preconditioner's rank \(now rank=5"
    with pytest.warns(ConvergenceWarning, match=match):
        _, info = solve(K, rhs, noise=noise, preconditioner="nystrom", rank=5, tol=1e-8, max_iter=3)
    assert not info.converged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = solve(K, rhs, noise=noise, tol=1e-8, max_iter=3, warn=False)
    assert not info.converged


def test_roundoff_floor_is_reported_not_iterated(ill_posed):
    # tol below what float64 can reach at condition number ~1e5: the recursive residual claims
    # convergence, the true one does not; one restart shows no progress and CG stops early.
    Kd, noise = ill_posed
    rhs = randn(Kd.shape[0], 2, seed=4)
    with pytest.warns(ConvergenceWarning, match=r"round-off floor of torch.float64 .*: loosen tol or add noise"):
        _, info = solve(CountingOperator(Kd), rhs, noise=noise, preconditioner="nystrom", rank=50, tol=1e-14)
    assert not info.converged and info.restarts >= 1 and info.iterations < info.max_iter
    assert float(info.residual_norm.max()) < 1e-10


def test_solve_edge_cases(well_posed):
    Kd, noise = well_posed
    n = Kd.shape[0]
    K = CountingOperator(Kd)
    rhs = randn(n, 3, seed=6)
    rhs[:, 1] = 0.0
    x, info = solve(K, rhs, noise=noise, tol=1e-10, max_iter=1000)
    assert info.converged and bool((x[:, 1] == 0).all()) and float(info.residual_norm[1]) == 0.0
    # Starting at the solution: no iteration, one product for the initial residual.
    x2, info2 = solve(K, rhs, noise=noise, tol=1e-8, x0=x)
    assert info2.iterations == 0 and info2.matvecs == 1 and info2.converged
    # Mixed dtypes: computation and result in K's dtype.
    x32, info32 = solve(CountingOperator(Kd.float()), rhs, noise=noise, preconditioner="nystrom", rank=30, tol=1e-3)
    assert x32.dtype == torch.float32 and info32.converged
    # The progress bar runs.
    _, info3 = solve(K, rhs[:, 0], noise=noise, tol=1e-6, max_iter=1000, progress=True)
    assert info3.converged


def test_settings_give_defaults(well_posed):
    Kd, noise = well_posed
    K = CountingOperator(Kd)
    rhs = randn(Kd.shape[0], seed=7)
    with settings.cg_tolerance(1e-2), settings.max_cg_iterations(7):
        _, info = solve(K, rhs, noise=noise, warn=False)
    assert info.tol == 1e-2 and info.max_iter == 7
    with settings.max_cg_iterations(2), pytest.warns(ConvergenceWarning, match="max_iter"):
        _, info = solve(K, rhs, noise=noise)
    assert info.max_iter == 2
    _, info = solve(K, rhs, noise=noise)
    assert info.tol == 1e-4 and info.max_iter == min(Kd.shape[0], 1000)


def test_preconditioner_construction_is_matrix_free():
    Kd = ntk_like(300, 20, 1.0, seed=8)  # rank 20
    K = CountingOperator(Kd)
    piv = build_preconditioner(K, "pivchol", noise=0.0, rank=100)
    # The greedy factor stops once K is explained: rank 20, one row per pivot.
    assert piv.rank == 20 and K.counter["rows"] == 20 and K.counter["matmul"] == 0
    assert piv.residual_trace <= 1e-10 * float(Kd.trace())
    K.counter.clear()
    nys = build_preconditioner(K, "nystrom", noise=1e-3, rank=40, seed=0)
    assert K.counter["matmul"] == 1 and K.counter["columns"] == 40 and nys.rank == 40
    top = torch.linalg.eigvalsh(Kd).flip(0)[:20]
    torch.testing.assert_close(nys.eigvals[:20], top, rtol=1e-8, atol=1e-8 * float(top[0]))
    # P⁻¹ is symmetric positive definite.
    R = randn(300, 5, seed=9)
    for P in (piv, nys, build_preconditioner(K, "jacobi", noise=1e-3)):
        G = R.T @ P.apply(R)
        torch.testing.assert_close(G, G.T)
        assert bool((torch.linalg.eigvalsh(G) > 0).all())


@pytest.mark.parametrize("name", ["jacobi", "pivchol", "nystrom"])
def test_with_noise_equals_a_fresh_build(well_posed, name):
    Kd, _ = well_posed
    K = CountingOperator(Kd)
    base = build_preconditioner(K, name, noise=0.0, rank=30, seed=0)
    K.counter.clear()
    R = randn(Kd.shape[0], 3, seed=13)
    for noise in (1e-3, 0.0):
        moved = base.with_noise(1e-1).with_noise(noise)
        assert not K.counter and moved.noise == noise and base.noise == 0.0
        fresh = build_preconditioner(K, name, noise=noise, rank=30, seed=0)
        torch.testing.assert_close(moved.apply(R), fresh.apply(R))
        K.counter.clear()


# ---------------------------------------------------------------------------------- Lanczos


def test_lanczos_tridiagonalizes(well_posed):
    Kd, noise = well_posed
    n, m = Kd.shape[0], 40
    A = Kd + noise * torch.eye(n, dtype=DTYPE)
    K = CountingOperator(Kd)
    T, Q = lanczos(K, m, noise=noise)
    assert T.shape == (m, m) and Q.shape == (n, m) and K.counter["matmul"] == m
    torch.testing.assert_close(Q.T @ Q, torch.eye(m, dtype=DTYPE), atol=1e-12, rtol=0)
    torch.testing.assert_close(Q.T @ A @ Q, T, atol=1e-10 * float(T.abs().max()), rtol=0)
    K.counter.clear()
    v0 = randn(n, 3, seed=10)
    T, Q = lanczos(K, m, v0=v0, noise=noise)
    assert T.shape == (3, m, m) and Q.shape == (3, n, m) and K.counter["matmul"] == m
    torch.testing.assert_close(Q[2, :, 0], v0[:, 2] / v0[:, 2].norm())
    torch.testing.assert_close(Q[2].T @ A @ Q[2], T[2], atol=1e-10 * float(T.abs().max()), rtol=0)


def test_lanczos_continues_past_an_invariant_subspace():
    # diag(1..5) repeated: a start vector's Krylov space has dimension 5, Lanczos must go on.
    Kd = torch.diag(torch.arange(1.0, 6.0, dtype=DTYPE).repeat(4))
    T, Q = lanczos(CountingOperator(Kd), 12)
    torch.testing.assert_close(Q.T @ Q, torch.eye(12, dtype=DTYPE), atol=1e-12, rtol=0)
    torch.testing.assert_close(Q.T @ Kd @ Q, T, atol=1e-12, rtol=0)


def test_extreme_eigenvalues_and_condition_number(spread):
    Kd, noise = spread
    n = Kd.shape[0]
    A = Kd + noise * torch.eye(n, dtype=DTYPE)
    ref = torch.linalg.eigvalsh(A)  # ascending
    K = CountingOperator(Kd)
    res = eigvalsh_extremes(K, k=3, noise=noise, tol=1e-8)
    assert res.converged and res.iterations < n
    torch.testing.assert_close(res.largest, ref[-3:].flip(0), rtol=1e-4, atol=0)
    torch.testing.assert_close(res.smallest, ref[:3], rtol=1e-4, atol=0)
    assert bool((res.largest_error_bounds <= 1e-8 * ref[-1]).all())
    assert bool((res.smallest_error_bounds <= 1e-8 * ref[-1]).all())
    assert K.counter["matmul"] == res.iterations
    cond = condition_number(K, noise=noise)
    assert math.isclose(cond, float(ref[-1] / ref[0]), rel_tol=1e-4)
    # Rank-deficient K without noise is singular to round-off.
    assert condition_number(CountingOperator(ntk_like(200, 20, 1.0, seed=11))) == math.inf


def test_unconverged_lanczos_warns(well_posed):
    Kd, noise = well_posed
    with pytest.warns(ConvergenceWarning, match=r"Lanczos stopped at 10 iterations .* raise num_iter"):
        res = eigvalsh_extremes(CountingOperator(Kd), k=1, noise=noise, num_iter=10, tol=1e-12)
    assert not res.converged and res.iterations == 10


def test_slq_logdet(well_posed):
    Kd, noise = well_posed
    n = Kd.shape[0]
    exact = float(torch.logdet(Kd + noise * torch.eye(n, dtype=DTYPE)))
    K = CountingOperator(Kd)
    est, se = logdet(K, noise, num_probes=30, num_iter=50, seed=0)
    assert K.counter["matmul"] == 50 and K.counter["columns"] == 50 * 30  # probes batched
    assert abs(est - exact) <= 4 * se
    est, se = logdet(K, noise, num_probes=100, num_iter=50, seed=1)
    assert abs(est - exact) <= 4 * se
    assert abs(est - exact) <= 0.01 * abs(exact)


def test_spectral_density(well_posed):
    Kd, noise = well_posed
    n, probes = Kd.shape[0], 20
    grid, density = spectral_density(CountingOperator(Kd), noise, num_probes=probes, num_iter=50)
    assert grid.shape == density.shape and bool((density >= 0).all())
    assert abs(float(torch.trapezoid(density, grid)) - 1.0) <= 1e-3
    # Its mean is a Hutchinson estimate of trace(A) / n, whose Rademacher variance is
    # 2 Σ_{i≠j} A_ij² / n² per probe: within 4 standard errors.
    A = Kd + noise * torch.eye(n, dtype=DTYPE)
    se = math.sqrt(2 * float(A.square().sum() - A.diagonal().square().sum()) / probes) / n
    mean = float(torch.trapezoid(grid * density, grid))
    assert abs(mean - float(A.trace()) / n) <= 4 * se


# ------------------------------------------------------------------------------- bad input


def _bad_calls():
    Kd = ntk_like(20, 20, 1.0, seed=12)
    K = DenseLinearOperator(Kd)
    b = torch.ones(20, dtype=DTYPE)
    nan = b.clone()
    nan[3] = float("nan")
    rect = DenseLinearOperator(torch.ones(20, 10, dtype=DTYPE))
    return [
        ("noise", lambda: solve(K, b, noise=-1.0), r"noise must be a finite scalar >= 0, got -1.0"),
        ("tol", lambda: solve(K, b, tol=0.0), r"tol must be a finite float > 0, got 0.0"),
        ("max_iter", lambda: solve(K, b, max_iter=0), r"max_iter must be an integer >= 1, got 0"),
        ("length", lambda: solve(K, torch.ones(19, dtype=DTYPE)), r"n = 20 \(K's size\), got shape \(19,\)"),
        ("ndim", lambda: solve(K, torch.ones(20, 2, 2, dtype=DTYPE)), r"got shape \(20, 2, 2\)"),
        ("nan", lambda: solve(K, nan), r"rhs contains NaN or inf \(1 entries\)"),
        ("square", lambda: solve(rect, b), r"square \(n, n\) operator, got shape \(20, 10\)"),
        (
            "name",
            lambda: solve(K, b, preconditioner="ilu"),
            r"unknown preconditioner 'ilu'; expected one of 'jacobi', 'pivchol', 'nystrom'",
        ),
        ("object", lambda: solve(K, b, preconditioner=3), r"or an object with an \.apply\(R\) method, got int"),
        ("rank", lambda: solve(K, b, preconditioner="nystrom", rank=0), r"rank must be an integer >= 1"),
        ("x0", lambda: solve(K, b, x0=torch.ones(20, 1, dtype=DTYPE)), r"x0 must have the shape of rhs \(20,\)"),
        ("setting", lambda: settings.max_cg_iterations(0), r"max_cg_iterations expects an integer >= 1"),
        ("k", lambda: eigvalsh_extremes(K, k=0), r"k must be an integer with 1 <= k <= n = 20"),
        ("eig_square", lambda: eigvalsh_extremes(rect), r"square"),
        ("num_iter", lambda: lanczos(K, 0), r"num_iter must be an integer >= 1"),
        ("v0", lambda: lanczos(K, 3, v0=torch.ones(5, dtype=DTYPE)), r"v0 must be .* \(n,\) or \(n, b\) with n = 20"),
        ("probes", lambda: logdet(K, 0.1, num_probes=0), r"num_probes must be an integer >= 1"),
        ("cond_kw", lambda: condition_number(K, k=2), r"unexpected keywords \['k'\]"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda case: case[0])
def test_bad_input_is_explained(case):
    _, call, match = case
    with pytest.raises(ValueError, match=match):
        call()
