"""Variances from pathwise posterior samples against the exact ones: time and accuracy.

The problem of ``bench_gp.py`` (an MLP 784-512-512-10 trained briefly on upsampled digits,
``backend="structured"``, σ² = ``noise_rel`` · mean(diag Θ), prior scale 1). After the mean
(preconditioner and training solve, shared by both routes and timed apart):

* ``exact``: ``gp.predict(Xt, mode="exact")`` — the tiled float64 Cholesky factor at these sizes
  (``exact_solver="auto"``), including the factorization;
* ``sample``: ``gp.predict(Xt, mode="sample", num_samples=S)`` — prior samples by batched JVPs,
  one PCG solve with S right-hand sides (the same preconditioner), one cross-kernel product.

Records both times, their ratio, and the median / max relative error of the sampled variances
against the exact ones, beside the Monte Carlo expectation: the median of ``|χ²_S/S − 1|`` is
about ``0.674 · √(2/S)``.

Usage:
    python benchmarks/bench_gp_samples.py --out results/bench/gp_samples.json          # full size
    python benchmarks/bench_gp_samples.py --quick --out results/bench/gp_samples_quick.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_solvers import environment, load_inputs, make_mlp, train_briefly  # noqa: E402

import _common  # noqa: E402
from ntkscale.gp import NTKGP  # noqa: E402

QUICK = {"n": 200, "n_test": 100, "width": 128, "rank": 100, "train_steps": 50}
FULL = {"n": 5000, "n_test": 500, "width": 512, "rank": 500, "train_steps": 100}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small preset (N·C = 2,000): {QUICK}")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--rank", type=int, default=None, help="preconditioner rank")
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--noise-rel", type=float, default=1e-3)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--factor-memory", type=float, default=2.0, help="GiB for the Cholesky factorization")
    p.add_argument("--cg-points", type=int, default=2,
                   help="exact variances by PCG on this many test points too (time extrapolated to all)")
    p.add_argument("--sample-solver", choices=["auto", "cg"], default="auto",
                   help="the samples' solve: 'auto' (the factor when cheaper, as for exact variances) or 'cg'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench/gp_samples.json")
    return _common.apply_preset(p.parse_args(argv), QUICK, FULL)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    doc = {"benchmark": "gp_samples", "config": vars(args), "environment": environment(torch.device("cpu")),
           "complete": False}
    X, y, Xt, _, meta = load_inputs(args.n, args.n_test, 784, "digits", args.seed, 10)
    model = make_mlp(784, args.width, 2, 10, args.seed)
    doc["train_loss"] = train_briefly(model, X, y, args.train_steps)
    model.eval()
    gp = NTKGP(model, X, y, noise=1.0, backend="structured", rank=args.rank, tol=args.tol, max_iter=1000,
               seed=args.seed, factor_memory=int(args.factor_memory * 2**30), progress=True)
    gp.noise = args.noise_rel * gp.K.diagonal().mean().item()
    doc["rows"], doc["params"], doc["noise"] = gp.n, gp.K.num_params, gp.noise

    t0 = time.perf_counter()
    gp.predict(Xt, return_var=False)
    doc["mean_seconds"] = time.perf_counter() - t0
    doc["mean_solve_iterations"] = gp.solve_info.iterations
    _common.write_json(out, doc)
    print(f"mean: {doc['mean_seconds']:.1f} s ({doc['mean_solve_iterations']} PCG iterations)", flush=True)

    S = args.num_samples
    saved, gp.exact_solver = gp.exact_solver, args.sample_solver
    t0 = time.perf_counter()
    _, var_s = gp.predict(Xt, mode="sample", num_samples=S, seed=args.seed)
    doc["sample_seconds"] = time.perf_counter() - t0
    gp.exact_solver = saved
    si = gp.info
    doc["sample_solver"] = si.solver
    doc["sample_stages"] = si.seconds
    doc["sample_solve_iterations"] = si.solve_iterations
    doc["sample_converged"] = si.converged
    doc["variance_relative_error_reported"] = si.variance_relative_error
    _common.write_json(out, doc)
    print(f"sample (S = {S}): {doc['sample_seconds']:.1f} s {si.seconds}", flush=True)

    gp.posterior.close()  # the exact route pays for its own factor
    t0 = time.perf_counter()
    _, var_e = gp.predict(Xt, mode="exact")
    doc["exact_seconds"] = time.perf_counter() - t0
    doc["exact_solver"] = gp.info.solver
    doc["exact_stages"] = gp.info.seconds
    print(f"exact ({gp.info.solver}): {doc['exact_seconds']:.1f} s", flush=True)

    if args.cg_points > 0:
        k = min(args.cg_points, Xt.shape[0])
        saved, gp.exact_solver = gp.exact_solver, "cg"
        t0 = time.perf_counter()
        _, var_cg = gp.predict(Xt[:k], mode="exact")
        sec = time.perf_counter() - t0
        gp.exact_solver = saved
        doc["exact_cg"] = {"points": k, "seconds": sec, "extrapolated_seconds_all_points": sec / k * Xt.shape[0],
                           "block_iterations": gp.info.solve_iterations,
                           "max_rel_diff_vs_exact": ((var_cg - var_e[:k]).abs().max() / var_e[:k].abs().max()).item()}
        print(f"exact by PCG on {k} points: {sec:.1f} s (x{Xt.shape[0] / k:.0f} for all points)", flush=True)

    pos = var_e > 0
    rel = ((var_s[pos] - var_e[pos]).abs() / var_e[pos]).double()
    doc["compared_entries"] = int(pos.sum())
    doc["median_relative_error"] = rel.median().item()
    doc["max_relative_error"] = rel.max().item()
    doc["expected_median_relative_error"] = 0.674 * math.sqrt(2 / S)
    doc["time_ratio_sample_over_exact"] = doc["sample_seconds"] / doc["exact_seconds"]
    doc["complete"] = True
    _common.write_json(out, doc)
    print(f"median rel err {doc['median_relative_error']:.3f} (expected ≈ {doc['expected_median_relative_error']:.3f}), "
          f"time ratio sample/exact {doc['time_ratio_sample_over_exact']:.3f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
