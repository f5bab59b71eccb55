"""Digits MLP classifier: the MAP network vs the linearized-Laplace (GGN) predictive.

scikit-learn's digits (8x8 images, 10 classes), split into train / validation / test. An MLP
(64-128-128-10, ReLU) is trained with Adam to (near) zero training error — the regime where a
network is overconfident. ``nks.NTKClassifierGP`` builds the GGN linearized Laplace around it;
``prior_scale`` (s²) is chosen on the validation split by the probit predictive's NLL over a
log grid (the preconditioner is re-shifted, not rebuilt, per s²). On the test split it records
accuracy, NLL, Brier score and ECE (15 bins) of the MAP network, the probit predictive and the
Monte Carlo predictive (1,000 samples), and the time of each predictive for the whole test set.

Usage:
    python benchmarks/bench_classifier.py --out benchmarks/results/cpu/classifier.json
    python benchmarks/bench_classifier.py --quick --out /tmp/classifier_quick.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import ntkscale as nks  # noqa: E402
from ntkscale import metrics  # noqa: E402
from ntkscale.data import digits  # noqa: E402

QUICK = {"n_train": 300, "n_val": 150, "n_test": 200, "width": 64, "epochs": 100, "grid": [1e-3, 1e-2, 1e-1]}
FULL = {"n_train": 1000, "n_val": 297, "n_test": 500, "width": 128, "epochs": 300,
        "grid": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small preset: {QUICK}")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="full-batch Adam steps")
    p.add_argument("--grid", type=float, nargs="+", default=None, help="prior_scale values tried on validation")
    p.add_argument("--num-samples", type=int, default=1000, help="MC samples per test point")
    p.add_argument("--rank", type=int, default=100, help="Nyström preconditioner rank")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/cpu/classifier.json")
    return _common.apply_preset(p.parse_args(argv), QUICK, FULL)


def scores(probs: torch.Tensor, y: torch.Tensor) -> dict:
    return {
        "accuracy": metrics.accuracy(probs, y),
        "nll": metrics.nll(probs, y, eps=1e-12),
        "brier": metrics.brier_score(probs, y),
        "ece": metrics.expected_calibration_error(probs, y, bins=15),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    ds = digits(n_train=args.n_train + args.n_val, n_test=args.n_test, seed=args.seed, one_hot=False)
    X, y = ds.X_train.to(dtype), ds.y_train
    Xtr, ytr, Xval, yval = X[: args.n_train], y[: args.n_train], X[args.n_train :], y[args.n_train :]
    Xte, yte = ds.X_test.to(dtype), ds.y_test
    w = args.width
    net = _common.mlp([64, w, w, 10]).to(dtype)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(Xtr), ytr).backward()
        opt.step()
    train_s = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        train_acc = metrics.accuracy(torch.softmax(net(Xtr), -1), ytr)

    t0 = time.perf_counter()
    clf = nks.NTKClassifierGP(net, Xtr, ytr, prior_scale=args.grid[0], rank=args.rank, backend="structured")
    build_s = time.perf_counter() - t0

    val = []
    for s2 in args.grid:
        clf.prior_scale = s2
        t0 = time.perf_counter()
        p = clf.predict(Xval, link="probit")
        val.append({"prior_scale": s2, "seconds": time.perf_counter() - t0, **scores(p, yval)})
        print(f"validation s²={s2:.0e}: NLL {val[-1]['nll']:.4f}  ECE {val[-1]['ece']:.4f}  ({val[-1]['seconds']:.1f} s)")
    best = min(val, key=lambda r: r["nll"])
    clf.prior_scale = best["prior_scale"]

    results = {}
    t0 = time.perf_counter()
    p_map = clf.predict_map(Xte)
    results["map"] = {"seconds": time.perf_counter() - t0, **scores(p_map, yte)}
    t0 = time.perf_counter()
    mean, cov = clf.predict_logits(Xte)
    logits_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    p_probit = nks.gp.classification.probabilities(mean, cov, link="probit")
    probit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    p_mc = nks.gp.classification.probabilities(mean, cov, link="mc", num_samples=args.num_samples, seed=args.seed)
    mc_s = time.perf_counter() - t0
    results["laplace_probit"] = {"seconds": logits_s + probit_s, "logit_covariance_seconds": logits_s, **scores(p_probit, yte)}
    results["laplace_mc"] = {"seconds": logits_s + mc_s, "logit_covariance_seconds": logits_s,
                             "num_samples": args.num_samples, **scores(p_mc, yte)}
    for name, r in results.items():
        print(f"test {name:15s} acc {r['accuracy']:.4f}  NLL {r['nll']:.4f}  Brier {r['brier']:.4f}  "
              f"ECE {r['ece']:.4f}  time {r['seconds']:.2f} s")

    doc = {
        "benchmark": "classifier",
        "config": {k: v for k, v in vars(args).items()},
        "environment": _common.environment(),
        "model": {"widths": [64, w, w, 10], "params": sum(p.numel() for p in net.parameters()),
                  "train_seconds": train_s, "train_accuracy": train_acc},
        "N_times_C": args.n_train * 10,
        "build_seconds": build_s,
        "validation": val,
        "chosen_prior_scale": best["prior_scale"],
        "test": results,
        "complete": True,
    }
    _common.write_json(args.out, doc)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
