"""Benchmark: peak memory of building the operator and of one matvec, at N = 5,000 and 50,000.

Each size runs ``--repeats`` times (default 3), each run in a fresh process; the resident set of a
fresh process varies by tens of MB between runs, so the ratios use the median run of each size
(all runs are kept in the JSON). Two peaks are measured as resident-set growth over the
resident set just before each step: building ``NTKOperator(model, X)`` (X already allocated:
what the build needs beyond the data — its checks and probes), and one ``K @ v`` (data, model,
operator and vector allocated; the N·C-sized output is subtracted). Chunking bounds both, so the
ratio of the largest to the smallest size should stay near 1.

With ``--factors`` the structured backend's factor cache is measured instead: the peak growth
of the first product (which builds the factors) over ``K.factor_bytes()``.

    python benchmarks/bench_memory.py --out benchmarks/results/cpu/memory.json
    python benchmarks/bench_memory.py --factors --sizes 20000 --out benchmarks/results/cpu/memory_factors.json
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
    held = []
    build = peak_during(lambda: held.append(nks.NTKOperator(model, X, backend=backend)))
    K = held[0]
    v = torch.randn(n * C)
    rec = peak_during(lambda: K @ v)
    vec_bytes = n * C * 4
    rec.update(N=n, chunk_size=K.chunk_size, backend=K.backend, vector_bytes=vec_bytes,
               data_bytes=X.numel() * X.element_size(),
               peak_beyond_vectors_bytes=rec["peak_growth_bytes"] - vec_bytes,
               build_peak_growth_bytes=build["peak_growth_bytes"], build_seconds=build["seconds"])
    return rec


def measure_factors(n: int, widths: list[int], backend: str) -> dict:
    import ntkscale as nks

    torch.manual_seed(0)
    model = mlp(widths)
    X = torch.randn(n, widths[0])
    K = nks.NTKOperator(model, X, backend=backend)
    factor_bytes = K.factor_bytes()
    v = torch.randn(n * widths[-1])
    rec = peak_during(lambda: K @ v)
    rec.update(N=n, chunk_size=K.chunk_size, backend=K.backend, factor_bytes=factor_bytes,
               peak_over_factor_bytes=rec["peak_growth_bytes"] / factor_bytes)
    return rec


def _median_run(runs: list[dict]) -> dict:
    """The run of median matvec peak among repeats of one size, with the medians of both peaks
    and the spread of the matvec peak."""
    if not runs or "peak_beyond_vectors_bytes" not in runs[0]:
        return runs[0] if runs else {}
    peaks = sorted(r["peak_beyond_vectors_bytes"] for r in runs)
    builds = sorted(r["build_peak_growth_bytes"] for r in runs)
    mid = len(runs) // 2
    rep = dict(min(runs, key=lambda r: abs(r["peak_beyond_vectors_bytes"] - peaks[mid])))
    rep.update(repeats=len(runs), peak_beyond_vectors_bytes=peaks[mid], build_peak_growth_bytes=builds[mid],
               peak_beyond_vectors_range_bytes=[peaks[0], peaks[-1]])
    return rep


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--widths", type=int, nargs="+", default=[784, 1024, 1024, 10])
    ap.add_argument("--backend", default=None, help="default: autodiff (structured with --factors)")
    ap.add_argument("--factors", action="store_true", help="measure the structured factor cache")
    ap.add_argument("--repeats", type=int, default=3, help="fresh-process runs per size (medians)")
    ap.add_argument("--out", default="results/bench/memory.json")
    args = ap.parse_args(argv)
    if args.factors:
        args.backend = args.backend or "structured"
        runs = [run_isolated(measure_factors, n, args.widths, args.backend)
                for n in tqdm(args.sizes, desc="bench memory", unit="size")]
        doc = {"benchmark": "memory-factors", "config": vars(args), "environment": environment(),
               "runs": runs}
        write_json(args.out, doc)
        print_table([{"N": r.get("N"), "factor MiB": _mib(r.get("factor_bytes")),
                      "peak growth MiB": _mib(r.get("peak_growth_bytes")),
                      "peak / factors": r.get("peak_over_factor_bytes"), "status": r.get("status", "ok")}
                     for r in runs])
        return doc
    args.backend = args.backend or "autodiff"
    # each size measured --repeats times, alternating sizes, each in a fresh process: the resident
    # set of a fresh process varies by tens of MB from run to run; the ratios use the medians
    plan = [n for _ in range(args.repeats) for n in args.sizes]
    all_runs = [run_isolated(measure, n, args.widths, args.backend)
                for n in tqdm(plan, desc="bench memory", unit="run")]
    runs = [_median_run([r for r in all_runs if r.get("N") == n and "peak_beyond_vectors_bytes" in r]
                        or [r for r in all_runs if r.get("N") == n][:1]) for n in args.sizes]
    doc = {"benchmark": "memory", "config": vars(args), "environment": environment(), "runs": runs,
           "all_runs": all_runs}
    ok = [r for r in runs if "peak_beyond_vectors_bytes" in r]
    if len(ok) == len(runs) >= 2:
        doc["ratio_largest_over_smallest"] = ok[-1]["peak_beyond_vectors_bytes"] / ok[0]["peak_beyond_vectors_bytes"]
        doc["build_ratio_largest_over_smallest"] = ok[-1]["build_peak_growth_bytes"] / max(1, ok[0]["build_peak_growth_bytes"])
        both = [r["build_peak_growth_bytes"] + r["peak_beyond_vectors_bytes"] for r in (ok[0], ok[-1])]
        doc["build_plus_matvec_ratio_largest_over_smallest"] = both[1] / both[0]
    write_json(args.out, doc)
    print_table([{"N": r.get("N"), "chunk": r.get("chunk_size"), "data MiB": _mib(r.get("data_bytes")),
                  "build peak MiB": _mib(r.get("build_peak_growth_bytes")),
                  "matvec peak beyond vectors MiB": _mib(r.get("peak_beyond_vectors_bytes")),
                  "seconds": r.get("seconds"), "status": r.get("status", "ok")} for r in runs])
    for key, what in (("ratio_largest_over_smallest", "matvec"),
                      ("build_ratio_largest_over_smallest", "build"),
                      ("build_plus_matvec_ratio_largest_over_smallest", "build + matvec")):
        if doc.get(key) is not None:
            print(f"{what} peak ratio N={args.sizes[-1]} / N={args.sizes[0]}: {doc[key]:.2f}")
    return doc


if __name__ == "__main__":
    main()
