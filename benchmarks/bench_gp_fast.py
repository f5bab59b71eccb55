"""How accurate are the fast (Lanczos / LOVE) variances, against rank and against λ?

One trained MLP (default 784-512-512-10 on upsampled digits, N = 2,000 training points:
N·C = 20,000 rows, ``backend="structured"``) and 50 test points. For each ``λ = noise_rel ·
mean(diag Θ)`` the exact variances come from the tiled float64 Cholesky factor
(``NTKGP(exact_solver="cholesky")``); the fast variances at every rank come from *one* Lanczos
basis of ``Θ`` with ``max(ranks)`` steps (Krylov spaces are shift-invariant and the first ``r``
steps of a run are the ``r``-step run, so the library's cache ``R = Q_r W`` of every ``(λ, r)``
comes from it), with ``Z = Θ*X Q`` formed once: ``Θ*X R = Z_r W`` with ``W = Q_rᵀ R``, so no
product with the kernel per ``(λ, r)``. One ``(λ, r)`` is recomputed through
``gp.predict(mode="fast")`` as a check.

Records, per ``(λ, r)``: median and max relative error of fast vs exact, and the median ratio of
prior to exact posterior variance (how much the data shrank the uncertainty). Writes JSON and a
figure (median relative error against rank, one line per λ).

Usage:
    python benchmarks/bench_gp_fast.py --out results/bench/gp_fast.json
    python benchmarks/bench_gp_fast.py --quick --out results/bench/gp_fast_quick.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_solvers import environment, load_inputs, make_mlp, train_briefly  # noqa: E402

import _common  # noqa: E402
from ntkscale.gp import NTKGP  # noqa: E402

QUICK = {"n": 300, "n_test": 20, "width": 256, "ranks": [25, 50, 100, 200], "train_steps": 20}
FULL = {"n": 2000, "n_test": 50, "width": 512, "ranks": [100, 250, 500, 1000], "train_steps": 100}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small preset: {QUICK}")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--ranks", type=int, nargs="+", default=None)
    p.add_argument("--noise-rel", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0])
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--factor-memory", type=float, default=2.0, help="GiB for the Cholesky factorization")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench/gp_fast.json")
    return _common.apply_preset(p.parse_args(argv), QUICK, FULL)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    doc = {"benchmark": "gp_fast", "config": vars(args), "environment": environment(torch.device("cpu")),
           "results": [], "complete": False}
    X, y, Xt, _, meta = load_inputs(args.n, args.n_test, 784, "digits", args.seed, 10)
    model = make_mlp(784, args.width, 2, 10, args.seed)
    doc["train_loss"] = train_briefly(model, X, y, args.train_steps)
    model.eval()
    gp = NTKGP(model, X, y, noise=1.0, backend="structured", exact_solver="cholesky",
               factor_memory=int(args.factor_memory * 2**30), fast_rank=max(args.ranks), progress=True)
    mean_diag = gp.K.diagonal().mean().item()
    M, C = Xt.shape[0], gp.num_outputs

    t0 = time.perf_counter()
    gp.noise = args.noise_rel[0] * mean_diag
    _, check_fast = gp.predict(Xt, mode="fast")  # builds the basis with max(ranks) steps
    basis = gp.posterior.lanczos_basis()
    T, Q = basis.T, basis.Q
    Ksx = gp.kernel(Xt, gp.X)
    Z = torch.cat([(Ksx @ Q[:, sl].to(Ksx.dtype).contiguous()).detach() for sl in
                   (slice(s, s + 64) for s in range(0, Q.shape[1], 64))], dim=1).double()  # (M C, m)
    prior = gp.kernel(Xt).to(torch.float64).diagonal().detach()
    doc["lanczos_steps"] = T.shape[0]
    doc["basis_seconds"] = time.perf_counter() - t0
    doc["mean_diag"] = mean_diag
    print(f"basis: {T.shape[0]} Lanczos steps, Z = Θ*X Q in {doc['basis_seconds']:.1f} s", flush=True)

    for i, rel_noise in enumerate(args.noise_rel):
        lam = rel_noise * mean_diag
        gp.noise = lam
        t0 = time.perf_counter()
        _, exact = gp.predict(Xt, mode="exact")
        exact = exact.reshape(-1).double()
        exact_seconds = time.perf_counter() - t0
        for r in args.ranks:
            m = min(r, T.shape[0])
            R = gp.posterior.fast_factor(lam, r)  # the library's fast-variance factor, Q[:, :m] W
            W = (Q[:, :m].mT @ R).double()  # float64 basis
            fast = (prior - (Z[:, :m] @ W).square().sum(1)).clamp_min(0) * gp.prior_scale
            pos = exact > 0
            err = (fast[pos] - exact[pos]).abs() / exact[pos]
            rec = {"noise_rel": rel_noise, "lambda": lam, "rank": m, "median_relative_error": err.median().item(),
                   "max_relative_error": err.max().item(), "fast_below_exact": int((fast < exact * (1 - 1e-6)).sum()),
                   "prior_over_exact_median": (prior[pos] * gp.prior_scale / exact[pos]).median().item(),
                   "exact_seconds": exact_seconds}
            if i == 0 and m == min(max(args.ranks), T.shape[0]):  # the library's own fast path
                rec["check_vs_predict_fast"] = ((check_fast.reshape(-1).double() - fast).abs().max()
                                                / fast.abs().max()).item()
            doc["results"].append(rec)
            print(f"noise_rel {rel_noise:8.0e}  rank {m:5d}  median rel err {rec['median_relative_error']:9.3g}  "
                  f"max {rec['max_relative_error']:9.3g}  prior/exact {rec['prior_over_exact_median']:8.3g}", flush=True)
        _common.write_json(out, doc)
    doc["complete"] = True
    _common.write_json(out, doc)
    figure(doc, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def figure(doc: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for rel_noise in doc["config"]["noise_rel"]:
        rows = [r for r in doc["results"] if r["noise_rel"] == rel_noise]
        ax.plot([r["rank"] for r in rows], [r["median_relative_error"] for r in rows], "o-",
                label=f"λ = {rel_noise:g} · mean diag Θ")
    ax.axhline(0.05, color="gray", ls="--", lw=1, label="5 %")
    ax.set(xscale="log", yscale="log", xlabel="Lanczos rank r",
           ylabel="median |fast − exact| / exact",
           title=f"Fast variances, N·C = {doc['config']['n'] * 10:,}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
