"""Benchmark: peak memory of one autodiff matvec at N = 5,000 and N = 50,000.

Each size runs in a fresh process; the peak resident-set growth during ``K @ v`` is measured
over the resident set just before it (data, model, operator and vector already allocated), and
the N·C-sized output vector is subtracted. Chunking bounds the rest: the ratio of the two peaks
should stay near 1.

    python benchmarks/bench_memory.py --out results/bench/memory.json
"""

from __future__ import annotations

import argparse

import torch

from tqdm.auto import tqdm

from _common import environment, mlp, peak_during, print_table, run_isolated, write_json


def measure(n: int, widths: list[int], backend: str) -> dict:
    import ntkscale as nks

    torch.manual_seed(0)
    model = mlp(widths)
    X = torch.randn(n, widths[0])
    C = widths[-1]
    K = nks.NTKOperator(model, X, backend=backend)
    v = torch.randn(n * C)
    rec = peak_during(lambda: K @ v)
    vec_bytes = n * C * 4
    rec.update(N=n, chunk_size=K.chunk_size, vector_bytes=vec_bytes,
               peak_beyond_vectors_bytes=rec["peak_growth_bytes"] - vec_bytes)
    return rec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--widths", type=int, nargs="+", default=[784, 1024, 1024, 10])
    ap.add_argument("--backend", default="autodiff")
    ap.add_argument("--out", default="results/bench/memory.json")
    args = ap.parse_args(argv)
    runs = [run_isolated(measure, n, args.widths, args.backend)
            for n in tqdm(args.sizes, desc="bench memory", unit="size")]
    doc = {"benchmark": "memory", "config": vars(args), "environment": environment(), "runs": runs}
    ok = [r for r in runs if "peak_beyond_vectors_bytes" in r]
    if len(ok) == len(runs) >= 2:
        doc["ratio_largest_over_smallest"] = ok[-1]["peak_beyond_vectors_bytes"] / ok[0]["peak_beyond_vectors_bytes"]
    write_json(args.out, doc)
    print_table([{"N": r.get("N"), "chunk": r.get("chunk_size"),
                  "peak beyond vectors MiB": (f"{r['peak_beyond_vectors_bytes'] / 2**20:.1f}"
                                              if "peak_beyond_vectors_bytes" in r else r.get("status")),
                  "seconds": r.get("seconds")} for r in runs])
    ratio = doc.get("ratio_largest_over_smallest")
    print(f"peak ratio N={args.sizes[-1]} / N={args.sizes[0]}: " + (f"{ratio:.2f}" if ratio else "-"))
    return doc


if __name__ == "__main__":
    main()
