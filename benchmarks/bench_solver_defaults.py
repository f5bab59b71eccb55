"""Default Nyström PCG vs plain CG, side by side, as a user calls them.

The system is the kernel-regression training solve ``(Θ + σ² I) x = y − f(X)`` with ``Θ`` the
empirical NTK of an MLP (default 20-256-256-10, N = 800 so N·C = 8,000) after a few Adam steps,
``σ² = noise_rel · mean(diag Θ)`` (default 1e-3), float32, tol 1e-3. The two calls compared are

    solve(K, rhs, noise=σ², preconditioner="nystrom", tol=tol)   # default (adaptive) rank
    solve(K, rhs, noise=σ², tol=tol)                              # plain CG

alternated ``--repeats`` times in one process (fair on a shared machine: compare the ratios).
Each Nyström time includes building the preconditioner. The JSON records, per call, the
iterations, the rank chosen, build and total seconds, the final residual, and the medians and
ratios (plain ÷ Nyström).

Usage:
    python benchmarks/bench_solver_defaults.py --out benchmarks/results/cpu/solver_defaults.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from bench_solvers import environment, load_inputs, make_mlp, train_briefly  # noqa: E402

import ntkscale as nks  # noqa: E402
from ntkscale.solvers import solve  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=800, help="training samples (N·C rows)")
    p.add_argument("--in-dim", type=int, default=20)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--data", choices=["digits", "synthetic"], default="synthetic")
    p.add_argument("--train-steps", type=int, default=50)
    p.add_argument("--noise-rel", type=float, default=1e-3, help="σ² = noise_rel · mean(diag Θ)")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--backend", default="structured")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/cpu/solver_defaults.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    X, y, _, _, meta = load_inputs(args.n, 0, args.in_dim, args.data, args.seed, args.classes)
    model = make_mlp(args.in_dim, args.width, args.depth, args.classes, args.seed)
    train_loss = train_briefly(model, X, y, args.train_steps)
    model = model.to(dtype=dtype).eval()
    X, y = X.to(dtype), y.to(dtype)
    K = nks.NTKOperator(model, X, backend=args.backend)
    diag = K.diagonal()  # builds the backend's cached factors before any timing
    noise = args.noise_rel * diag.mean().item()
    with torch.no_grad():
        rhs = (y - model(X)).reshape(-1)
    K @ rhs  # warm-up
    result: dict = {
        "benchmark": "solver_defaults",
        "config": vars(args) | {"data_used": meta},
        "environment": environment(torch.device("cpu")),
        "problem": {
            "rows": K.shape[0],
            "P": K.num_params,
            "backend": K.backend,
            "noise": noise,
            "train_loss": train_loss,
        },
        "runs": {"nystrom_default": [], "plain_cg": []},
        "complete": False,
    }
    calls = {
        "nystrom_default": lambda: solve(K, rhs, noise=noise, preconditioner="nystrom", tol=args.tol, warn=False),
        "plain_cg": lambda: solve(K, rhs, noise=noise, tol=args.tol, warn=False),
    }
    for rep in range(args.repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            _, info = call()
            seconds = time.perf_counter() - t0
            result["runs"][name].append(
                {
                    "iterations": info.iterations,
                    "matvecs": info.matvecs,
                    "rank": info.preconditioner_rank,
                    "build_seconds": info.preconditioner_seconds,
                    "total_seconds": seconds,
                    "converged": info.converged,
                    "final_relative_residual": info.residual_norm.max().item(),
                }
            )
            print(
                f"[{rep + 1}/{args.repeats}] {name:16s} iterations {info.iterations:4d}  rank "
                f"{info.preconditioner_rank!s:5s} build {info.preconditioner_seconds:6.2f} s  total "
                f"{seconds:6.2f} s  converged={info.converged}",
                flush=True,
            )
            _common.write_json(args.out, result)
    med = {
        name: {
            key: statistics.median(r[key] for r in runs) for key in ("iterations", "build_seconds", "total_seconds")
        }
        for name, runs in result["runs"].items()
    }
    result["median"] = med
    result["ratios"] = {
        "iterations_plain_over_nystrom": med["plain_cg"]["iterations"] / med["nystrom_default"]["iterations"],
        "total_seconds_plain_over_nystrom": med["plain_cg"]["total_seconds"]
        / med["nystrom_default"]["total_seconds"],
    }
    result["complete"] = True
    _common.write_json(args.out, result)
    print(
        f"plain ÷ Nyström(default rank): iterations {result['ratios']['iterations_plain_over_nystrom']:.2f}×, "
        f"total time {result['ratios']['total_seconds_plain_over_nystrom']:.2f}× -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
