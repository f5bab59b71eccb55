"""NTKGP at scale: posterior mean, fast (Lanczos) and exact variances, time and memory.

Default problem: an MLP 784-512-512-10 trained briefly on digits upsampled to 28×28 (see
``bench_solvers.load_inputs``), N = 5,000 training points (N·C = 50,000 rows), 500 test points,
``backend="structured"``, σ² = ``noise_rel`` · mean(diag Θ), prior scale 1.

Stages, each timed and written to the JSON as soon as it ends:

* ``setup``: data, model, brief training;
* ``build``: ``NTKGP(...)`` (the operator and f(X)) and the factors (``K.diagonal()``);
* ``mean``: the preconditioner and the training solve, then the mean at all test points;
* ``fast_variances``: the rank-``fast_rank`` Lanczos cache and the variances at all test points;
* ``exact_variances``: exact variances at the first ``--exact-points`` test points (default all)
  with ``--exact-solver`` (default ``auto``: at full size the tiled float64 Cholesky factor of
  ``Θ + λI``, out of core past ``--factor-memory``; ``cg`` is batched PCG, about 144 s per test
  point at full size on 2 cores, so use it with a few ``--exact-points``), with the factor's
  tiles, disk use and time split; the mean from the factor is compared with the PCG mean;
* ``variance_error``: median / max relative error of fast vs exact on those points.

Peak memory is measured in a separate process: the stages run in a child started with the
``spawn`` method, and the parent reads ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after it
exits (the child also records its own high-water mark after every stage). A child that dies
(e.g. killed for memory) is recorded with its exit code, not raised.

Usage:
    python benchmarks/bench_gp.py --quick --out results/bench/gp_quick.json
    python benchmarks/bench_gp.py --out results/bench/gp.json
    python benchmarks/bench_gp.py --exact-solver cg --exact-points 2 --out results/bench/gp_cg.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (the benchmarks' shared helpers, beside this file)

QUICK = {"n": 500, "n_test": 50, "width": 256, "exact_points": 3, "fast_rank": 50, "rank": 100, "train_steps": 20}
FULL = {"n": 5000, "n_test": 500, "width": 512, "exact_points": 500, "fast_rank": 500, "rank": 500, "train_steps": 100}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"small preset, about a minute on 2 CPU cores: {QUICK}")
    p.add_argument("--n", type=int, default=None, help=f"training points (default {FULL['n']})")
    p.add_argument("--n-test", type=int, default=None, help=f"test points (default {FULL['n_test']})")
    p.add_argument("--exact-points", type=int, default=None, help="exact variances on the first K test points only")
    p.add_argument("--exact-solver", choices=["auto", "cg", "cholesky"], default="auto")
    p.add_argument("--factor-memory", type=float, default=2.0, help="GiB the Cholesky factorization may hold")
    p.add_argument("--scratch-dir", default=None, help="directory for the factor (kept: a rerun resumes)")
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
    args = _common.apply_preset(p.parse_args(argv), QUICK, FULL)
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
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in extra.items() if not isinstance(v, (list, dict)))
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
        block_size=args.block_size, seed=args.seed, exact_solver=args.exact_solver,
        factor_memory=int(args.factor_memory * 2**30), scratch_dir=args.scratch_dir, progress=True,
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
        mean_exact, exact = gp.predict(Xt[:K], mode="exact")
        pi = gp.info
        sec = pi.seconds.get("variance", 0.0)
        extra = {}
        if pi.solver == "cg":
            extra = dict(block_iterations=pi.solve_iterations, converged=pi.converged,
                         max_residual=pi.max_residual)
            if K < Xt.shape[0]:
                extra["extrapolated_total_seconds_all_test_points"] = sec / K * Xt.shape[0]
                extra["extrapolated_note"] = f"per-point time x {Xt.shape[0]} test points; not measured"
        else:
            fi = pi.factor
            extra = dict(factor_seconds=pi.seconds.get("factor"), factor_tiles=fi.tiles, factor_tile_rows=fi.tile,
                         factor_on_disk=fi.on_disk, factor_gib=fi.factor_bytes / 2**30,
                         factor_split_seconds=fi.seconds, resumed_tiles=fi.resumed_tiles,
                         mean_vs_pcg_mean_rel=((mean_exact - mean[:K]).abs().max()
                                               / mean_exact.abs().max()).item())
        stage("exact_variances", t0, exact_points=K, solver=pi.solver, variance_seconds=sec,
              seconds_per_point=(time.perf_counter() - t0) / K, clamped=pi.clamped, **extra)

        t0 = time.perf_counter()
        f, e = fast[:K], exact
        pos = e > 0
        rel = ((f[pos] - e[pos]).abs() / e[pos]).double()
        fast_sec = next(r["seconds"] for r in result["stages"] if r["stage"] == "fast_variances")
        exact_rec = result["stages"][-1]
        stage("variance_error", t0, compared_points=K, compared_entries=int(pos.sum()),
              median_relative_error=rel.median().item() if rel.numel() else None,
              max_relative_error=rel.max().item() if rel.numel() else None,
              fast_below_exact=int((f < e).sum()),
              exact_over_fast_time_per_point=(exact_rec["seconds"] / K) / (fast_sec / Xt.shape[0]),
              prior_over_exact_median=((gp.kernel(Xt[:K]).diagonal().reshape(K, -1) * gp.prior_scale)[pos]
                                       / e[pos]).median().item())
    result["complete"] = True
    write_json(path, result)


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench_solvers import write_json

    out = Path(args.out)
    ctx = mp.get_context("spawn")
    start = time.perf_counter()
    proc = ctx.Process(target=child, args=(vars(args), str(out)))
    # stopping this process (Ctrl-C, kill) stops the measured one too: never leave it running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    proc.start()
    try:
        proc.join()
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
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
