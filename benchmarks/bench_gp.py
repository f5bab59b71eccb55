"""NTKGP at scale: posterior mean, fast (Lanczos) and exact (PCG) variances, time and memory.

Default problem: an MLP 784-512-512-10 trained briefly on digits upsampled to 28×28 (see
``bench_solvers.load_inputs``), N = 5,000 training points (N·C = 50,000 rows), 500 test points,
``backend="structured"``, σ² = ``noise_rel`` · mean(diag Θ), prior scale 1.

Stages, each timed and written to the JSON as soon as it ends:

* ``setup``: data, model, brief training;
* ``build``: ``NTKGP(...)`` (the operator and f(X)) and the factors (``K.diagonal()``);
* ``mean``: the preconditioner and the training solve, then the mean at all test points;
* ``fast_variances``: the rank-``fast_rank`` Lanczos cache and the variances at all test points;
* ``exact_variances``: PCG variances at the first ``--exact-points`` test points only (at full
  size all 500 need 5,000 right-hand sides through PCG on a 50,000-row operator), with the time
  per point and an *extrapolated* total for all test points (labelled so);
* ``variance_error``: median / max relative error of fast vs exact on those points.

Peak memory is measured in a separate process: the stages run in a child started with the
``spawn`` method, and the parent reads ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after it
exits (the child also records its own high-water mark after every stage). A child that dies
(e.g. killed for memory) is recorded with its exit code, not raised.

Usage:
    python benchmarks/bench_gp.py --quick --out results/bench/gp_quick.json
    python benchmarks/bench_gp.py --exact-points 6 --out results/bench/gp.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

QUICK = {"n": 500, "n_test": 50, "width": 256, "exact_points": 3, "fast_rank": 50, "rank": 100, "train_steps": 20}
FULL = {"n": 5000, "n_test": 500, "width": 512, "exact_points": 3, "fast_rank": 100, "rank": 100, "train_steps": 100}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"small preset, about a minute on 2 CPU cores: {QUICK}")
    p.add_argument("--n", type=int, default=None, help=f"training points (default {FULL['n']})")
    p.add_argument("--n-test", type=int, default=None, help=f"test points (default {FULL['n_test']})")
    p.add_argument("--exact-points", type=int, default=None, help="exact variances on the first K test points only")
    p.add_argument("--in-dim", type=int, default=784)
    p.add_argument("--width", type=int, default=None, help=f"hidden width (default {FULL['width']})")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--data", choices=["digits", "synthetic"], default="digits")
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--noise-rel", type=float, default=1e-3, help="σ² = noise_rel · mean(diag Θ)")
    p.add_argument("--prior-scale", type=float, default=1.0)
    p.add_argument("--preconditioner", default="nystrom")
    p.add_argument("--rank", type=int, default=None, help="preconditioner rank")
    p.add_argument("--fast-rank", type=int, default=None, help="Lanczos rank of the fast variances")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--block-size", type=int, default=32, help="right-hand-side columns per product / PCG block")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--backend", default="structured")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench/gp.json")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.exact_points = max(0, min(args.exact_points, args.n_test))
    return args


def _maxrss_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


def child(config: dict, out: str) -> None:
    """The measured part: every stage of an NTKGP run, the JSON rewritten after each."""
    import torch

    import ntkscale as nks  # noqa: F401  (import cost is part of the child's memory)
    from bench_solvers import environment, load_inputs, make_mlp, train_briefly, write_json
    from ntkscale.gp import NTKGP

    args = argparse.Namespace(**config)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    path = Path(out)
    result = {
        "benchmark": "gp",
        "config": config,
        "environment": environment(device),
        "stages": [],
        "complete": False,
    }

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def stage(name: str, t0: float, **extra) -> dict:
        sync()
        rec = {"stage": name, "seconds": time.perf_counter() - t0, "maxrss_mib_so_far": _maxrss_mib(), **extra}
        result["stages"].append(rec)
        write_json(path, result)
        shown = {k: v for k, v in extra.items() if not isinstance(v, (list, dict))}
        print(f"{name:16s} {rec['seconds']:9.2f} s  rss {rec['maxrss_mib_so_far']:8.0f} MiB  {shown}", flush=True)
        return rec

    t0 = time.perf_counter()
    X, y, Xt, _, meta = load_inputs(args.n, args.n_test, args.in_dim, args.data, args.seed, args.classes)
    model = make_mlp(args.in_dim, args.width, args.depth, args.classes, args.seed)
    loss = train_briefly(model, X, y, args.train_steps)
    model = model.to(device=device, dtype=dtype).eval()
    X, y, Xt = (t.to(device=device, dtype=dtype) for t in (X, y, Xt))
    stage("setup", t0, data=meta, train_loss=loss)

    t0 = time.perf_counter()
    gp = NTKGP(
        model, X, y, noise=1.0, prior_scale=args.prior_scale, backend=args.backend,
        preconditioner=None if args.preconditioner == "none" else args.preconditioner,
        rank=args.rank, tol=args.tol, max_iter=args.max_iter, fast_rank=args.fast_rank,
        block_size=args.block_size, seed=args.seed,
    )
    diag = gp.K.diagonal()
    gp.noise = args.noise_rel * args.prior_scale * diag.mean().item()  # λ = noise_rel · mean diag
    stage("build", t0, rows=gp.K.shape[0], P=gp.K.num_params, backend=gp.K.backend, noise=gp.noise,
          mean_diag=diag.mean().item())

    t0 = time.perf_counter()
    mean = gp.predict(Xt, return_var=False)
    P = gp.preconditioner()
    info = gp.solve_info
    stage("mean", t0, test_points=Xt.shape[0], preconditioner_seconds=getattr(P, "seconds", 0.0),
          solve_iterations=info.iterations, solve_residual=info.residual_norm.max().item(),
          solve_converged=info.converged, mean_finite=bool(torch.isfinite(mean).all()))

    t0 = time.perf_counter()
    _, fast = gp.predict(Xt, mode="fast")
    stage("fast_variances", t0, test_points=Xt.shape[0], fast_rank=gp.info.fast_rank,
          lanczos_seconds=gp.info.seconds.get("lanczos"), variance_seconds=gp.info.seconds.get("variance"),
          clamped=gp.info.clamped)

    K = args.exact_points
    if K > 0:
        t0 = time.perf_counter()
        _, exact = gp.predict(Xt[:K], mode="exact")
        sec = gp.info.seconds.get("variance", 0.0)
        per_point = sec / K
        stage("exact_variances", t0, exact_points=K, variance_seconds=sec, seconds_per_point=per_point,
              extrapolated_total_seconds_all_test_points=per_point * Xt.shape[0],
              extrapolated_note=f"per-point time x {Xt.shape[0]} test points; not measured",
              block_iterations=gp.info.solve_iterations, converged=gp.info.converged,
              max_residual=gp.info.max_residual, clamped=gp.info.clamped)

        t0 = time.perf_counter()
        f, e = fast[:K], exact
        pos = e > 0
        rel = ((f[pos] - e[pos]).abs() / e[pos]).double()
        stage("variance_error", t0, compared_points=K, compared_entries=int(pos.sum()),
              median_relative_error=rel.median().item() if rel.numel() else None,
              max_relative_error=rel.max().item() if rel.numel() else None,
              fast_below_exact=int((f < e).sum()))
    result["complete"] = True
    write_json(path, result)


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench_solvers import write_json

    out = Path(args.out)
    ctx = mp.get_context("spawn")
    start = time.perf_counter()
    proc = ctx.Process(target=child, args=(vars(args), str(out)))
    proc.start()
    proc.join()
    wall = time.perf_counter() - start
    import json

    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        result = {"benchmark": "gp", "config": vars(args), "stages": [], "complete": False}
    result["peak_rss_mib_child"] = _maxrss_mib(resource.RUSAGE_CHILDREN)
    result["peak_rss_note"] = "ru_maxrss of the child process that ran every stage (spawned, so it shares no memory)"
    result["wall_seconds"] = wall
    result["exitcode"] = proc.exitcode
    if proc.exitcode != 0:
        result["error"] = (
            f"the measured process exited with code {proc.exitcode}"
            + (" (killed: out of memory?)" if proc.exitcode and proc.exitcode < 0 else "")
        )
    write_json(out, result)
    print(f"peak RSS of the measured process: {result['peak_rss_mib_child']:.0f} MiB; wrote {out}")
    return 0 if proc.exitcode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
