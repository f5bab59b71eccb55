"""The solver's defaults: the adaptive Nyström rank, and singular kernels named instead of iterated.

References are dense float64: eigenvalues from ``torch.linalg.eigvalsh``, solutions from
``torch.linalg.solve`` / the pseudo-inverse, and the NTK from an explicit Jacobian.
"""

from __future__ import annotations

import pytest
import torch
from linear_operator.operators import DenseLinearOperator
from torch import nn

import ntkscale as nks
from ntkscale.solvers import NystromPreconditioner, SingularKernelError, build_preconditioner, solve

from .cases import reference_jacobian
from .test_solvers import CountingOperator, ntk_like, randn

DT = torch.float64


# ------------------------------------------------------------------------ adaptive Nyström rank


def test_adaptive_rank_reuses_products_and_matches_the_spectrum():
    Kd = ntk_like(400, 400, 1.0, seed=3)
    K = CountingOperator(Kd)
    noise = 1e-4 * float(Kd.diagonal().mean())
    P = build_preconditioner(K, "nystrom", noise=noise, seed=0)
    assert P.adaptive and P.stages[0] == 32 and P.stages == sorted(set(P.stages)) and P.rank == P.stages[-1]
    assert all(b <= 2 * a for a, b in zip(P.stages, P.stages[1:]))  # doubling, a last stage cut short
    # Every sketch column is multiplied by K once: one batched product per stage.
    assert K.counter["matmul"] == len(P.stages) and K.counter["columns"] == P.rank
    # It stopped for a stated reason: the tail reached 10 × noise, or the cost cap ½ sqrt(1 + λ1/noise).
    lam = P.eigvals
    budget = int(torch.ceil(0.5 * torch.sqrt(1 + lam[0] / noise)))
    assert float(lam[-1]) <= 10 * noise or P.rank >= min(budget, 1000)
    # The basis is orthonormal and the leading Nyström eigenvalues are K's.
    torch.testing.assert_close(P.U.T @ P.U, torch.eye(P.rank, dtype=DT), atol=1e-8, rtol=0)
    top = torch.linalg.eigvalsh(Kd).flip(0)[:10]
    # Nyström never overestimates (K̂ ≼ K); at rank 256 of 400 the top ten are within 6e-4,
    # as for a fixed-rank build at the same rank.
    assert bool((lam[:10] <= top * (1 + 1e-10)).all())
    torch.testing.assert_close(lam[:10], top, rtol=2e-3, atol=0)
    # A solve with the default reports the rank it chose and beats plain CG by far.
    rhs = randn(400, seed=4)
    x, info = solve(K, rhs, noise=noise, preconditioner="nystrom", tol=1e-7)
    _, plain = solve(K, rhs, noise=noise, tol=1e-7, max_iter=400, warn=False)
    assert info.converged and info.preconditioner_rank == P.rank and info.preconditioner_seconds > 0
    assert info.iterations * 3 < plain.iterations
    ref = torch.linalg.solve(Kd + noise * torch.eye(400, dtype=DT), rhs)
    assert float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref)) < 1e-5


def test_adaptive_rank_stops_at_the_tail_for_a_low_rank_kernel():
    Kd = ntk_like(300, 40, 1.0, seed=5)  # rank 40
    noise = 1e-3
    P = NystromPreconditioner(DenseLinearOperator(Kd), noise=noise)
    # 32 columns miss part of the spectrum; 64 capture all of it, so the tail is 0 ≤ 10 noise.
    assert P.stages == [32, 64] and float(P.eigvals[-1]) <= 10 * noise
    torch.testing.assert_close(P.eigvals[:40], torch.linalg.eigvalsh(Kd).flip(0)[:40], rtol=1e-7, atol=1e-9)


def test_adaptive_rank_respects_max_rank_and_explicit_rank_is_fixed():
    Kd = ntk_like(400, 400, 0.5, seed=6)
    K = CountingOperator(Kd)
    P = build_preconditioner(K, "nystrom", noise=1e-8, max_rank=100)
    assert P.stages == [32, 64, 100] and K.counter["columns"] == 100
    K.counter.clear()
    fixed = build_preconditioner(K, "nystrom", noise=1e-8, rank=50)
    assert not fixed.adaptive and fixed.rank == 50 and K.counter["matmul"] == 1
    # Without noise there is nothing to aim at: the fixed default rank.
    assert build_preconditioner(K, "nystrom", noise=0.0).rank == 100
    # The explicit rank is reported too, and no rank for Jacobi or none.
    _, info = solve(K, randn(400, seed=1), noise=1e-2, preconditioner="nystrom", rank=20, tol=1e-3)
    assert info.preconditioner_rank == 20
    _, info = solve(K, randn(400, seed=1), noise=1e-2, preconditioner="jacobi", tol=1e-3)
    assert info.preconditioner_rank is None
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        build_preconditioner(K, "nystrom", noise=1e-2, max_rank=0)


# ------------------------------------------------------------------------ singular kernels


def _small_ntk(dtype=DT):
    """An MLP with P = 50 parameters on N = 40 samples, C = 2: the NTK is 80 × 80 of rank ≤ 50."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    X = torch.randn(40, 3, dtype=dtype)
    K = nks.NTKOperator(model, X, backend="structured")
    J = reference_jacobian(model, X)  # shape: (80, 50)
    return K, J


@pytest.mark.parametrize("preconditioner", [None, "jacobi", "pivchol", "nystrom"])
def test_singular_ntk_without_noise_is_named(preconditioner):
    K, J = _small_ntk()
    assert K.num_params == 50 and K.shape == (80, 80) and torch.linalg.matrix_rank(J) <= 50
    rhs = randn(80, seed=2)  # not in the range of J Jᵀ
    with pytest.raises(SingularKernelError, match=r"rank is at most P = 50 .* < N·C = 80") as err:
        solve(K, rhs, noise=0.0, preconditioner=preconditioner, tol=1e-6)
    msg = str(err.value)
    assert "noise > 0" in msg and "raise max_iter" not in msg
    assert err.value.rank_bound == 50 and err.value.n == 80 and err.value.iterations < 80
    # With noise > 0 the same system solves, against a dense float64 reference.
    noise = 1e-3
    x, info = solve(K, rhs, noise=noise, preconditioner=preconditioner, tol=1e-10, max_iter=2000)
    ref = torch.linalg.solve(J @ J.T + noise * torch.eye(80, dtype=DT), rhs)
    assert info.converged
    torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


def test_singular_generic_operator_is_named_without_a_rank_bound():
    _, J = _small_ntk()
    K = DenseLinearOperator(J @ J.T)  # exposes no num_params
    with pytest.raises(SingularKernelError, match=r"singular to working precision .*noise > 0") as err:
        solve(K, randn(80, seed=2), noise=0.0, tol=1e-6)
    assert err.value.rank_bound is None and err.value.iterations < 80


def test_consistent_singular_system_still_solves():
    # A right-hand side in the range of K is no breakdown: CG from 0 stays in the range and
    # converges (its nonzero spectrum spans ~1e8, so tol 1e-4), checked against the dense J Jᵀ.
    K, J = _small_ntk()
    Kd = J @ J.T
    rhs = Kd @ randn(80, seed=3)
    x, info = solve(K, rhs, noise=0.0, tol=1e-4)
    assert info.converged
    assert float(torch.linalg.norm(Kd @ x - rhs) / torch.linalg.norm(rhs)) < 1e-4


def test_full_rank_kernel_without_noise_is_not_called_singular():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(DT)  # P = 98 > N·C = 20
    X = torch.randn(10, 3, dtype=DT)
    K = nks.NTKOperator(model, X, backend="structured")
    J = reference_jacobian(model, X)
    rhs = randn(20, seed=5)
    x, info = solve(K, rhs, noise=0.0, tol=1e-10, max_iter=200)  # condition number ~1.5e4
    assert info.converged
    torch.testing.assert_close(x, torch.linalg.solve(J @ J.T, rhs), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["hilbert8", "spd_kappa3e7"])
def test_ill_conditioned_nonsingular_system_without_noise_is_solved(kind):
    """CG's recursive residual jumps far above the smallest it reached on ill-conditioned systems
    that are not singular; that alone must not be taken for a singular kernel."""
    if kind == "hilbert8":
        i = torch.arange(8, dtype=DT)
        A = 1.0 / (i[:, None] + i[None, :] + 1)  # κ ≈ 1.5e10
        b = torch.ones(8, dtype=DT)
    else:
        g = torch.Generator().manual_seed(0)
        Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=DT))
        A = (Q * torch.logspace(0, -7.5, 200, dtype=DT)) @ Q.T
        A = (A + A.T) / 2
        b = torch.randn(200, generator=g, dtype=DT)
    x, info = solve(DenseLinearOperator(A), b, noise=0.0, tol=1e-6, max_iter=20_000)
    assert info.converged
    assert float(torch.linalg.norm(A @ x - b) / torch.linalg.norm(b)) < 1e-5
