"""``ntkscale.distributed`` on two gloo processes against one process on all the data.

Two processes are spawned once for the module (127.0.0.1 only, a free port, a 20 s process-group
timeout). Each holds an uneven contiguous shard (7 and 6 of 13 samples) and computes products,
solves, spectra and GP posterior variances on the sharded operator; then both go through the
failure cases in turn (bad shards at construction, a bad right-hand side, an exception inside one
rank's product, and finally a rank that dies). The parent checks everything against the plain
single-process operator on all 13 samples (float64, 1e-10) and against dense references.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch

import ntkscale as nks

N, N0, D, C, M = 13, 7, 3, 2, 5  # samples, rank 0's share, features, outputs, test inputs
NOISE = 0.1
TIMEOUT_S = 20
# the GP layer: the same settings in one process and on two ranks
GP_KW = dict(noise=0.05, prior_scale=2.0, backend="autodiff", dtype=torch.float64, tol=1e-12, max_iter=500,
             fast_rank=12, num_probes=4, num_iter=N * C, exact_solver="cg")


class _Net(torch.nn.Module):
    """An MLP whose forward can be told to raise (to fail inside one rank's product)."""

    def __init__(self, flatten: bool = False):
        super().__init__()
        self.flatten = flatten
        self.boom = False
        self.body = torch.nn.Sequential(
            torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, C)
        )

    def forward(self, x):
        if self.boom:
            raise RuntimeError("boom: this rank's network failed")
        return self.body(x.flatten(1) if self.flatten else x)


def _problem(flatten: bool = False):
    torch.manual_seed(0)
    model = _Net(flatten).double()
    X = torch.randn(N, D, dtype=torch.float64)
    Y = torch.randn(N, C, dtype=torch.float64)
    X_test = torch.randn(M, D, dtype=torch.float64)
    V = torch.randn(N * C, 3, dtype=torch.float64)
    return model, X, Y, X_test, V


def _shard(rank: int) -> slice:
    return slice(0, N0) if rank == 0 else slice(N0, N)


def _expect_error(fn) -> dict:
    start = time.perf_counter()
    try:
        fn()
    except Exception as err:  # recorded for the parent to check
        return {"type": type(err).__name__, "message": str(err), "seconds": time.perf_counter() - start}
    return {"type": None, "message": "no error", "seconds": time.perf_counter() - start}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from ntkscale.distributed import NTKOperator

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    res: dict = {}
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=2,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )
        model, X, Y, X_test, V = _problem()
        sl = _shard(rank)
        rows = slice(sl.start * C, sl.stop * C)
        K = NTKOperator(model, X[sl], dtype=torch.float64, backend="autodiff")
        Ks = NTKOperator(model, X[sl], dtype=torch.float64, backend="structured")
        res["shape"], res["global_size"], res["row_offset"] = tuple(K.shape), K.global_size, K.row_offset
        res["matvec"] = K @ V[rows, 0]
        res["matmat"] = K @ V[rows]
        res["matmat_structured"] = Ks @ V[rows]
        res["diag"] = K.diagonal()
        res["dense_rows"] = K.dense_rows()
        y = Y[sl].reshape(-1)
        res["solve"], info = nks.solve(K, y, noise=NOISE, tol=1e-12, max_iter=500)
        res["solve_iterations"] = info.iterations
        res["solve_nystrom"], info = nks.solve(K, y, noise=NOISE, tol=1e-12, max_iter=500, preconditioner="nystrom", rank=8)
        res["solve_nystrom_iterations"] = info.iterations
        res["solve_adaptive"], info = nks.solve(K, y, noise=NOISE, tol=1e-12, max_iter=500, preconditioner="nystrom")
        res["solve_adaptive_rank"] = info.preconditioner_rank
        res["cond"] = nks.condition_number(K, noise=NOISE, tol=1e-10)
        ext = nks.eigvalsh_extremes(K, k=2, noise=NOISE, tol=1e-10)
        res["largest"], res["smallest"] = ext.largest, ext.smallest
        res["logdet"] = nks.logdet(K, noise=NOISE, num_probes=4, num_iter=N * C)[0]
        # NTK-GP posterior: mean Θ*X α and variance diag Θ** - diag Θ*X (Θ + σ²I)⁻¹ ΘX*
        alpha, _ = nks.solve(K, y, noise=NOISE, tol=1e-12, max_iter=500)
        res["mean"] = K.cross_matmul(X_test, alpha)
        cross = K.cross(X_test).to_dense()  # shape: (N_r*C, M*C), this rank's rows
        res["cross"] = cross
        Z, _ = nks.solve(K, cross, noise=NOISE, tol=1e-12, max_iter=500)
        prior = nks.NTKOperator(model, X_test, dtype=torch.float64).diagonal()
        res["var"] = prior - nks.solvers.reductions(K).dot(cross, Z)

        # -- the GP layer on the sharded operator: KernelGP with this rank's cross-kernel columns,
        #    and the NTK-GP adapter on this rank's shard, called as in one process ---------------
        post = nks.gp.KernelGP(K, y, NOISE, 1.0, tol=1e-12, max_iter=500, fast_rank=N * C, rank=8)
        Ksx = K.cross(X_test).mT  # shape: (M*C, N_r*C)
        res["kgp_mean"] = post.mean(Ksx)
        res["kgp_var"] = post.variance(Ksx, prior)
        res["kgp_fast"] = post.variance(Ksx, prior, mode="fast")
        res["kgp_gp_lml"] = post.log_marginal_likelihood(kind="gp")
        gp = nks.distributed.NTKGP(model, X[sl], Y[sl], **GP_KW)
        res["gp_repr"] = repr(gp)
        res["gp_mean"], res["gp_var"] = gp.predict(X_test)
        res["gp_rank"], res["gp_info_rank"] = gp.preconditioner_rank, gp.info.preconditioner_rank
        res["gp_solver"] = gp.info.solver
        res["gp_fast"] = gp.predict(X_test, mode="fast")[1]
        res["gp_samples"] = gp.sample(X_test, num_samples=3, seed=5)
        res["gp_samples_unseeded"] = gp.sample(X_test, num_samples=2)  # one seed shared by the ranks
        res["gp_lml"] = gp.log_marginal_likelihood()
        res["gp_lml_gp"] = gp.log_marginal_likelihood(kind="gp")
        res["gp_alpha"] = gp.representer_weights()
        res["gp_fit"] = gp.fit_hyperparameters(grid_size=5, refine_steps=3, update=False)
        res["gp_cholesky"] = _expect_error(lambda: gp.cholesky())
        res["gp_cholesky_ctor"] = _expect_error(
            lambda: nks.distributed.NTKGP(model, X[sl], Y[sl], **{**GP_KW, "exact_solver": "cholesky"})
        )
        res["gp_bad_cross"] = _expect_error(lambda: post.mean(nks.NTKOperator(model, X_test, X, dtype=torch.float64)))

        # -- failures that every rank survives (the group stays usable) ----------------------
        Xbad = X[sl].clone()
        if rank == 1:
            Xbad[2, 1] = float("nan")
        res["nan_shard"] = _expect_error(lambda: NTKOperator(model, Xbad))
        fmodel = _problem(flatten=True)[0]
        Xshape = X[sl] if rank == 0 else X[sl].unsqueeze(-1)  # (6, 3, 1): the flattening model takes it
        res["shape_shard"] = _expect_error(lambda: NTKOperator(fmodel, Xshape))
        other = _problem()[0]
        if rank == 1:
            with torch.no_grad():
                other.body[0].weight[0, 0] += 1e-3
        res["weights_shard"] = _expect_error(lambda: NTKOperator(other, X[sl]))
        swapped = _problem()[0]
        if rank == 1:  # the same numbers in another order: sums alone would not tell
            with torch.no_grad():
                swapped.body[0].weight.copy_(swapped.body[0].weight.flip(0))
        res["swapped_weights_shard"] = _expect_error(lambda: NTKOperator(swapped, X[sl]))
        vbad = V[rows, 0].clone()
        if rank == 1:
            vbad[0] = float("nan")
        res["nan_rhs"] = _expect_error(lambda: K @ vbad)
        res["k_mismatch"] = _expect_error(lambda: K @ (V[rows, :2] if rank == 0 else V[rows]))
        res["pivchol"] = _expect_error(lambda: nks.solve(K, y, noise=NOISE, preconditioner="pivchol"))
        Kb = NTKOperator(model, X[sl], dtype=torch.float64, backend="autodiff")
        if rank == 1:
            model.boom = True
        res["raising_rank"] = _expect_error(lambda: Kb @ V[rows, 0])
        model.boom = False
        res["after_failures"] = K @ V[rows, 0]  # the group still works

        # -- a rank that dies: the other one gets an error, not a hang ------------------------
        if rank == 1:
            torch.save(res, path)
            os._exit(0)
        time.sleep(1.0)
        res["dead_rank"] = _expect_error(lambda: nks.solve(K, y, noise=NOISE, tol=1e-12, max_iter=500))
    except Exception:
        res["crash"] = traceback.format_exc()
    torch.save(res, path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, "a distributed test process hung past 120 s"
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, d in enumerate(res):
        assert "crash" not in d, f"rank {r} crashed:\n{d.get('crash')}"
    return res


@pytest.fixture(scope="module")
def reference():
    model, X, Y, X_test, V = _problem()
    K = nks.NTKOperator(model, X, dtype=torch.float64, backend="dense")
    dense = K.to_dense()
    A = dense + NOISE * torch.eye(N * C, dtype=torch.float64)
    y = Y.reshape(-1)
    cross = nks.NTKOperator(model, X, X_test, dtype=torch.float64, backend="dense").to_dense()
    prior = nks.NTKOperator(model, X_test, dtype=torch.float64, backend="dense").diagonal()
    Ka = nks.NTKOperator(model, X, dtype=torch.float64, backend="autodiff")  # one process, all data
    ext = nks.eigvalsh_extremes(Ka, k=2, noise=NOISE, tol=1e-10)
    post = nks.gp.KernelGP(Ka, Y.reshape(-1), NOISE, 1.0, tol=1e-12, max_iter=500, fast_rank=N * C, rank=8)
    Ksx = nks.NTKOperator(model, X_test, X, dtype=torch.float64, backend="autodiff")
    gp = nks.NTKGP(model, X, Y, **GP_KW)
    gp_mean, gp_var = gp.predict(X_test)
    return {
        "V": V,
        "dense": dense,
        "A": A,
        "y": y,
        "solve": torch.linalg.solve(A, y),
        "eig": torch.linalg.eigvalsh(A),
        "cross": cross,
        "mean": cross.T @ torch.linalg.solve(A, y),
        "var": prior - (cross * torch.linalg.solve(A, cross)).sum(0),
        "one_process": {
            "solve": nks.solve(Ka, y, noise=NOISE, tol=1e-12, max_iter=500)[0],
            "nystrom": nks.solve(Ka, y, noise=NOISE, tol=1e-12, max_iter=500, preconditioner="nystrom", rank=8),
            "adaptive": nks.solve(Ka, y, noise=NOISE, tol=1e-12, max_iter=500, preconditioner="nystrom"),
            "cond": nks.condition_number(Ka, noise=NOISE, tol=1e-10),
            "largest": ext.largest,
            "smallest": ext.smallest,
            "logdet": nks.logdet(Ka, noise=NOISE, num_probes=4, num_iter=N * C)[0],
            "kgp_mean": post.mean(Ksx),
            "kgp_var": post.variance(Ksx, prior),
            "kgp_fast": post.variance(Ksx, prior, mode="fast"),
            "kgp_gp_lml": post.log_marginal_likelihood(kind="gp"),
            "gp_mean": gp_mean,
            "gp_var": gp_var,
            "gp_rank": gp.preconditioner_rank,
            "gp_fast": gp.predict(X_test, mode="fast")[1],
            "gp_samples": gp.sample(X_test, num_samples=3, seed=5),
            "gp_lml": gp.log_marginal_likelihood(),
            "gp_lml_gp": gp.log_marginal_likelihood(kind="gp"),
            "gp_alpha": gp.representer_weights(),
            "gp_fit": gp.fit_hyperparameters(grid_size=5, refine_steps=3, update=False),
        },
    }


def _gather(ranks, key):
    return torch.cat([ranks[0][key], ranks[1][key]])


def _close(a, b, rtol=1e-10):
    scale = b.abs().max().clamp_min(1e-300)
    assert (a - b).abs().max() <= rtol * scale, f"max error {((a - b).abs().max() / scale).item():.2e}"


def test_shards_and_layout(ranks):
    assert ranks[0]["shape"] == (N0 * C, N0 * C) and ranks[1]["shape"] == ((N - N0) * C, (N - N0) * C)
    assert ranks[0]["global_size"] == ranks[1]["global_size"] == N * C
    assert (ranks[0]["row_offset"], ranks[1]["row_offset"]) == (0, N0 * C)


def test_products_match_one_process(ranks, reference):
    dense, V = reference["dense"], reference["V"]
    _close(_gather(ranks, "matvec"), dense @ V[:, 0])
    _close(_gather(ranks, "matmat"), dense @ V)
    _close(_gather(ranks, "matmat_structured"), dense @ V)
    _close(_gather(ranks, "diag"), dense.diagonal())
    _close(_gather(ranks, "dense_rows"), dense)
    _close(_gather(ranks, "cross"), reference["cross"])


def test_solve_matches_one_process(ranks, reference):
    one = reference["one_process"]
    _close(_gather(ranks, "solve"), one["solve"])
    _close(_gather(ranks, "solve"), reference["solve"], rtol=1e-9)
    x_ny, info_ny = one["nystrom"]
    _close(_gather(ranks, "solve_nystrom"), x_ny)
    assert ranks[0]["solve_nystrom_iterations"] == ranks[1]["solve_nystrom_iterations"] == info_ny.iterations
    assert ranks[0]["solve_iterations"] == ranks[1]["solve_iterations"]
    x_ad, info_ad = one["adaptive"]  # the adaptive Nyström rank: the same sketch on any number of ranks
    _close(_gather(ranks, "solve_adaptive"), x_ad)
    assert ranks[0]["solve_adaptive_rank"] == ranks[1]["solve_adaptive_rank"] == info_ad.preconditioner_rank


def test_spectrum_matches_one_process(ranks, reference):
    one, eig = reference["one_process"], reference["eig"]
    for r in ranks:  # replicated results: the same on both ranks
        assert abs(r["cond"] - one["cond"]) <= 1e-10 * one["cond"]
        _close(r["largest"], one["largest"])
        _close(r["smallest"], one["smallest"])
        assert abs(r["logdet"] - one["logdet"]) <= 1e-10 * abs(one["logdet"])
    kappa = (eig[-1] / eig[0]).item()
    assert abs(ranks[0]["cond"] - kappa) <= 1e-8 * kappa
    _close(ranks[0]["largest"], eig[-2:].flip(0), rtol=1e-9)
    _close(ranks[0]["smallest"], eig[:2], rtol=1e-9)


def test_posterior_matches_one_process(ranks, reference):
    for r in ranks:
        _close(r["mean"], reference["mean"])
        _close(r["var"], reference["var"], rtol=1e-9)
    _close(ranks[0]["var"], ranks[1]["var"], rtol=1e-12)
    assert bool((ranks[0]["var"] > 0).all())


def test_gp_layer_matches_one_process(ranks, reference):
    """KernelGP on the sharded operator (each rank passing its columns of the cross-kernel):
    mean, exact (PCG) and fast variances and the GP evidence of one process on all the data."""
    one = reference["one_process"]
    for r in ranks:
        _close(r["kgp_mean"], one["kgp_mean"])
        _close(r["kgp_mean"], reference["mean"], rtol=1e-9)  # and the dense algebra
        _close(r["kgp_var"], one["kgp_var"])
        _close(r["kgp_var"], reference["var"], rtol=1e-9)
        _close(r["kgp_fast"], one["kgp_fast"])
        assert abs(r["kgp_gp_lml"] - one["kgp_gp_lml"]) <= 1e-10 * abs(one["kgp_gp_lml"])


def test_distributed_ntkgp_matches_one_process(ranks, reference):
    """``nks.distributed.NTKGP`` on each rank's shard, called as ``nks.NTKGP`` on all the data."""
    one = reference["one_process"]
    for r in ranks:
        assert r["gp_repr"].startswith("distributed.NTKGP(rank=")
        _close(r["gp_mean"], one["gp_mean"])
        _close(r["gp_var"], one["gp_var"])
        assert r["gp_solver"] == "cg"  # exact variances by PCG ("auto" never factors a sharded K)
        _close(r["gp_fast"], one["gp_fast"])
        _close(r["gp_samples"], one["gp_samples"])
        for kind in ("gp_lml", "gp_lml_gp"):
            assert abs(r[kind] - one[kind]) <= 1e-10 * abs(one[kind])
        for a, b in zip(r["gp_fit"], one["gp_fit"]):  # the fitted (noise, prior_scale)
            assert abs(a - b) <= 1e-8 * abs(b)
        assert r["gp_rank"] == r["gp_info_rank"] == one["gp_rank"] is not None  # adaptive Nyström rank
    _close(_gather(ranks, "gp_alpha").reshape(-1), one["gp_alpha"].reshape(-1))
    _close(ranks[0]["gp_samples_unseeded"], ranks[1]["gp_samples_unseeded"], rtol=1e-12)


def test_cholesky_routes_refused_when_sharded(ranks):
    for r in ranks:
        for case in ("gp_cholesky", "gp_cholesky_ctor"):
            assert r[case]["type"] == "ValueError", r[case]
            assert "sharded" in r[case]["message"] and "exact_solver='cg'" in r[case]["message"]
        assert r["gp_bad_cross"]["type"] == "ValueError"
        assert "this rank's" in r["gp_bad_cross"]["message"] and "K.cross(X_test).mT" in r["gp_bad_cross"]["message"]


@pytest.mark.parametrize(
    "case, words",
    [
        ("nan_shard", ["rank 1", "NaN"]),
        ("shape_shard", ["per-sample shape", "rank 0: (3,)", "rank 1: (3, 1)"]),
        ("weights_shard", ["rank 1 has different weights"]),
        ("swapped_weights_shard", ["rank 1 has different weights", "body.0.weight"]),
    ],
)
def test_bad_shard_is_an_error_on_every_rank(ranks, case, words):
    for r in ranks:
        err = r[case]
        assert err["type"] == "ShardError", err
        for w in words:
            assert w in err["message"], err["message"]


def test_bad_vector_or_raising_rank_stops_every_rank(ranks):
    assert ranks[1]["nan_rhs"]["type"] == "ValueError" and "NaN" in ranks[1]["nan_rhs"]["message"]
    assert ranks[0]["nan_rhs"]["type"] == "DistributedError" and "[1]" in ranks[0]["nan_rhs"]["message"]
    for r in ranks:
        assert "different numbers of right-hand sides" in r["k_mismatch"]["message"]
        assert r["pivchol"]["type"] == "TypeError" and "cannot be indexed" in r["pivchol"]["message"]
    assert ranks[1]["raising_rank"]["type"] == "RuntimeError" and "boom" in ranks[1]["raising_rank"]["message"]
    assert ranks[0]["raising_rank"]["type"] == "DistributedError"
    assert "raised during the NTK product" in ranks[0]["raising_rank"]["message"]
    _close(ranks[0]["after_failures"], ranks[0]["matvec"], rtol=0.0)


def test_dead_rank_is_an_error_not_a_hang(ranks):
    err = ranks[0]["dead_rank"]
    assert err["type"] == "DistributedError", err
    assert "another rank died" in err["message"]
    assert err["seconds"] < TIMEOUT_S + 10


def test_one_rank_group_in_process(tmp_path):
    """World size 1 (no spawn): the sharded operator is the plain one, survives linear_operator's
    rebuilds (``.double()``, ``K * 2``), and the solvers find its group inside composed operators."""
    import torch.distributed as dist

    from ntkscale.distributed import NTKOperator

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        model, X, Y, X_test, V = _problem()
        K = NTKOperator(model.float(), X.float())
        K64 = K.double()
        assert isinstance(K64, NTKOperator) and K64.dtype == torch.float64 and K64.process_group is not None
        # the float32 snapshot, exactly, in float64
        dense = nks.NTKOperator(model, X.float().double(), dtype=torch.float64, backend="dense").to_dense()
        _close(K64 @ V, dense @ V)
        red = nks.solvers.reductions(K64 * 2.0)
        assert red.group is K64.process_group and red.n == N * C
        x, info = nks.solve(K64 * 2.0, Y.reshape(-1), noise=NOISE, tol=1e-12, max_iter=500)
        _close(x, torch.linalg.solve(2 * dense + NOISE * torch.eye(N * C, dtype=torch.float64), Y.reshape(-1)), 1e-9)
        assert K64.stats.products > 0 and K64.stats.allreduce_bytes > 0
        with pytest.raises(TypeError, match="cannot be indexed"):
            K64[0, 0]
        with pytest.raises(TypeError, match="dense_rows"):
            K64.to_dense()
    finally:
        dist.destroy_process_group()
