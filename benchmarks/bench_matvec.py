"""Benchmark: one NTK matvec against one training step on the same data, side by side.

MLP 784-1024-1024-10 on N = 4096 samples, float32 (the defaults): times, in one process and
interleaved round by round, a forward+backward training step (MSE), the autodiff matvec with 1
and 8 right-hand sides — linearized (the default within ``factor_budget``; its first product,
which records the graphs, timed separately) and recomputed (the fallback beyond ``memory_budget``) —
and the structured matvec with 1 and 8 right-hand sides (its one-off factor pass timed
separately). Writes JSON with the ratios and the environment.

Each timed call's floating-point operations are also counted once (``torch``'s
``FlopCounterMode``: matrix products, the work that sets these times) and reported as multiples of
the training step's: the arithmetic floor of each ratio, whatever the efficiency of the kernels.

    python benchmarks/bench_matvec.py --out results/bench/matvec.json
    python benchmarks/bench_matvec.py --quick --out results/bench/matvec_quick.json
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import environment, interleaved, mlp, write_json

import ntkscale as nks


def count_flops(fn) -> int:
    """Floating-point operations of one call of ``fn`` (torch's operation-level counter)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--widths", type=int, nargs="+", default=[784, 1024, 1024, 10])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="N=512, widths 784-256-256-10, 3 repeats")
    ap.add_argument("--out", default="results/bench/matvec.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.widths, args.repeats = 512, [784, 256, 256, 10], 3
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = mlp(args.widths).to(dev)
    X = torch.randn(args.n, args.widths[0], device=dev)
    y = torch.randn(args.n, args.widths[-1], device=dev)
    C = args.widths[-1]

    def train_step():
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(X), y)
        loss.backward()

    K_ad = nks.NTKOperator(model, X, backend="autodiff")
    # the recomputed fallback: same chunks, no room for the linearization
    K_rc = nks.NTKOperator(model, X, backend="autodiff", chunk_size=K_ad.chunk_size, memory_budget=1)
    K_st = nks.NTKOperator(model, X, backend="structured")
    v = torch.randn(args.n * C, device=dev)
    V8 = torch.randn(args.n * C, 8, device=dev)
    t0 = time.perf_counter()
    K_st @ v  # the one-off factor pass (one forward, C batched backward passes)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    K_ad @ v  # the first product: one forward and one recorded backward, then the JVP
    first = time.perf_counter() - t0
    calls = {
        "train_step": train_step,
        "autodiff_1": lambda: K_ad @ v,
        "autodiff_8": lambda: K_ad @ V8,
        "recomputed_1": lambda: K_rc @ v,
        "recomputed_8": lambda: K_rc @ V8,
        "structured_1": lambda: K_st @ v,
        "structured_8": lambda: K_st @ V8,
    }
    flops = {name: count_flops(f) for name, f in calls.items()}
    t = interleaved(calls, repeats=args.repeats)
    m = {k: r["median_s"] for k, r in t.items()}
    doc = {
        "benchmark": "matvec",
        "config": {"N": args.n, "widths": args.widths, "dtype": "float32", "device": str(dev),
                   "chunk_size_autodiff": K_ad.chunk_size,
                   "linearization_bytes": K_ad.factor_bytes()},
        "environment": environment(),
        "times": t,
        "structured_factor_pass_s": setup,
        "autodiff_first_product_s": first,
        "ratios": {
            "autodiff_1_over_train_step": m["autodiff_1"] / m["train_step"],
            "autodiff_8_over_train_step": m["autodiff_8"] / m["train_step"],
            "autodiff_8_over_autodiff_1": m["autodiff_8"] / m["autodiff_1"],
            "autodiff_first_over_train_step": first / m["train_step"],
            "recomputed_1_over_train_step": m["recomputed_1"] / m["train_step"],
            "recomputed_8_over_train_step": m["recomputed_8"] / m["train_step"],
            "structured_1_over_train_step": m["structured_1"] / m["train_step"],
            "autodiff_1_over_structured_1": m["autodiff_1"] / m["structured_1"],
            "structured_8_over_train_step": m["structured_8"] / m["train_step"],
            "structured_8_over_structured_1": m["structured_8"] / m["structured_1"],
        },
        "flops": flops,
        "flop_ratios": {f"{k}_over_train_step": flops[k] / flops["train_step"]
                        for k in calls if k != "train_step"},
        "auto_backend": nks.NTKOperator(model, X).backend,
    }
    write_json(args.out, doc)
    for k, r in doc["ratios"].items():
        print(f"{k:32s} {r:6.2f}")
    for k, r in doc["flop_ratios"].items():
        print(f"flops {k:26s} {r:6.2f}")
    return doc


if __name__ == "__main__":
    main()
