"""Benchmark: time and peak memory of ``kernels.infinite_ntk`` for an N × N kernel.

Each size runs in a fresh process; the peak resident-set growth during the call is measured over
the resident set just before it (the inputs already allocated). The kernel itself takes
``N² · 4`` bytes (float32); the tiles add a fixed amount (``block_size`` entries in float64 times
a few temporaries), so ``peak_beyond_kernel_bytes`` should not grow with N.

    python benchmarks/bench_infinite_kernel.py --out results/bench/infinite_kernel.json
    python benchmarks/bench_infinite_kernel.py --quick --out results/bench/infinite_kernel_quick.json
"""

from __future__ import annotations

import argparse

import torch

from _common import apply_preset, environment, peak_during, run_isolated, write_json


def measure(n: int, d: int, depth: int, activation: str) -> dict:
    import ntkscale as nks

    torch.manual_seed(0)
    X = torch.randn(n, d)
    rec = peak_during(lambda: nks.kernels.infinite_ntk(X, depth=depth, activation=activation))
    kernel_bytes = n * n * 4
    rec.update(N=n, d=d, depth=depth, activation=activation, kernel_bytes=kernel_bytes,
               peak_beyond_kernel_bytes=rec["peak_growth_bytes"] - kernel_bytes)
    return rec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (about a minute on 2 cores)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--activation", default="relu")
    ap.add_argument("--out", default="results/bench/infinite_kernel.json")
    args = apply_preset(ap.parse_args(argv), quick=dict(sizes=[2000, 8000]), full=dict(sizes=[5000, 20000]))
    rows = []
    for n in args.sizes:
        rec = run_isolated(measure, n, args.d, args.depth, args.activation)
        rec.setdefault("N", n)
        rows.append(rec)
        print(f"N={n}: {rec.get('seconds', float('nan')):.1f} s, kernel {n * n * 4 / 2**20:.0f} MiB, "
              f"beyond it {rec.get('peak_beyond_kernel_bytes', float('nan')) / 2**20:.0f} MiB")
    doc = {"benchmark": "infinite_kernel", "environment": environment(), "config": vars(args), "rows": rows}
    write_json(args.out, doc)
    return doc


if __name__ == "__main__":
    main()
