"""Benchmark: kernel-space vs weight-space (structured) NTK matvecs, and what ``auto`` picks.

MLP d_in-w-w-C on N samples, for N in {256, 1024, 4096} and widths w in 256…8192 (defaults).
Per configuration the per-layer factors are computed once and shared; then one matvec (one
right-hand side) is timed, interleaved, for the structured backend (GEMMs in weight space), the
csrc kernel (``cuda``: the CUDA kernel on a GPU, its C++ twin on a CPU) and KeOps (when
installed). ``backend="auto"`` is asked for its choice on the same model and data, and scored
against the measured times. JSON is rewritten after every configuration.

    python benchmarks/bench_crossover.py --out results/bench/crossover.json
    python benchmarks/bench_crossover.py --quick --out results/bench/crossover_quick.json
    python benchmarks/bench_crossover.py --device cuda --tf32 off --out $OUT/crossover_gpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from _common import environment, interleaved, is_oom, mlp, print_table, write_json

import ntkscale as nks


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--outputs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tf32", choices=["on", "off"], default="off")
    ap.add_argument("--impls", nargs="+", default=["structured", "cuda", "keops"])
    ap.add_argument("--max-seconds", type=float, default=10.0,
                    help="an implementation slower than this per matvec is skipped at larger sizes")
    ap.add_argument("--quick", action="store_true", help="N in {256, 1024}, widths {256, 2048}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--rescore", metavar="JSON", default=None,
                    help="no timing: ask the current cost model about the configurations of a "
                         "recorded run and score its picks against that run's times")
    ap.add_argument("--out", default="results/bench/crossover.json")
    args = ap.parse_args(argv)
    if args.rescore:
        return rescore(args.rescore)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n, args.widths = [256, 1024], [256, 2048]
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    impls = [i for i in args.impls if i != "keops" or importlib.util.find_spec("pykeops") is not None]
    doc = {"benchmark": "crossover", "config": vars(args), "impls": impls,
           "environment": environment(), "runs": []}
    too_slow: set[str] = set()
    warm = nks.NTKOperator(mlp([4, 8, 1]).to(dev), torch.randn(8, 4, device=dev), backend="structured")
    warm @ torch.randn(8, device=dev)  # thread pools and lazy initialization, outside the timings
    configs = [(n, w) for n in args.n for w in args.widths]
    bar = tqdm(configs, desc="bench crossover", unit="config", disable=args.no_progress)
    for n, w in bar:
        bar.set_postfix_str(f"N={n} width={w}")
        torch.manual_seed(0)
        model = mlp([args.d_in, w, w, args.outputs]).to(dev)
        X = torch.randn(n, args.d_in, device=dev)
        rec = {"N": n, "width": w, "C": args.outputs}
        try:
            auto = nks.NTKOperator(model, X, backend="auto")
            rec["auto"] = auto.backend
            rec["estimates"] = auto.cost_estimates.get("cost", {})
            base = auto.with_backend("structured")
            v = torch.randn(base.shape[0], device=dev)
            t0 = time.perf_counter()
            base @ v  # factor pass, shared by all structured-family backends
            rec["factor_pass_s"] = time.perf_counter() - t0
            timed = [i for i in impls if i not in too_slow]
            if rec["auto"] not in timed:  # score auto's pick even when it is not a compared impl
                timed.append(rec["auto"])
            ops = {i: base.with_backend(i) for i in timed}
            # warm-up (compiles kernels, JITs KeOps formulas) and accuracy against structured
            outs = {i: op @ v for i, op in ops.items()}
            times = interleaved({i: (lambda op=op: op @ v) for i, op in ops.items()},
                                repeats=args.repeats, warmup=0)
            rec["times"] = {i: t["median_s"] for i, t in times.items()}
            ref = outs.get("structured")
            if ref is not None:
                rec["max_rel_diff"] = {
                    i: float((out - ref).abs().max() / ref.abs().max()) for i, out in outs.items()
                }
            too_slow |= {i for i, t in rec["times"].items() if t > args.max_seconds}
            fastest = min(rec["times"], key=rec["times"].get)
            rec["fastest"] = fastest
            picked = rec["times"].get(rec["auto"])
            rec["auto_correct"] = rec["auto"] == fastest
            rec["auto_within_10pct"] = picked is not None and picked <= 1.1 * rec["times"][fastest]
        except Exception as err:  # recorded, the sweep goes on
            rec["status"] = "oom" if is_oom(err) else "error"
            rec["detail"] = f"{type(err).__name__}: {err}"[:300]
        doc["runs"].append(rec)
        scored = [r for r in doc["runs"] if "auto_correct" in r]
        if scored:
            doc["auto_accuracy"] = sum(r["auto_correct"] for r in scored) / len(scored)
            doc["auto_within_10pct"] = sum(r["auto_within_10pct"] for r in scored) / len(scored)
        write_json(args.out, doc)
        del model, X
    bar.close()
    rows = []
    for r in doc["runs"]:
        row = {"N": r["N"], "width": r["width"]}
        for i in impls:
            t = r.get("times", {}).get(i)
            row[f"{i} ms"] = f"{1e3 * t:.3g}" if t is not None else r.get("status", "-")
        row.update(auto=r.get("auto"), fastest=r.get("fastest"),
                   within_10pct=r.get("auto_within_10pct"))
        rows.append(row)
    print_table(rows)
    acc, within = doc.get("auto_accuracy"), doc.get("auto_within_10pct")
    if acc is not None:
        print(f"auto picked the fastest in {acc:.2f} of {len(rows)} configurations; "
              f"within 10% of it in {within:.2f}")
    return doc


def rescore(path: str) -> dict:
    """Re-ask ``auto`` (the cost model as it is now) about a recorded run, with the recorded
    thread count, and score its picks against the recorded per-product times."""
    doc = json.loads(Path(path).read_text())
    cfg = doc["config"]
    torch.set_num_threads(doc["environment"]["threads"])
    rows = []
    for r in tqdm(doc["runs"], desc="rescore", unit="config"):
        if "times" not in r:
            continue
        torch.manual_seed(0)
        model = mlp([cfg["d_in"], r["width"], r["width"], cfg["outputs"]])
        pick = nks.NTKOperator(model, torch.randn(r["N"], cfg["d_in"]), backend="auto").backend
        t = r["times"]
        fastest = min(t, key=t.get)
        rows.append({"N": r["N"], "width": r["width"], "recorded auto": r.get("auto"), "auto now": pick,
                     "fastest": fastest, "exact": pick == fastest,
                     "within_10pct": pick in t and t[pick] <= 1.1 * t[fastest]})
    print_table(rows)
    n = len(rows)
    out = {"configurations": n, "auto_accuracy": sum(r["exact"] for r in rows) / n,
           "auto_within_10pct": sum(r["within_10pct"] for r in rows) / n}
    print(f"{path}: auto now picks the fastest in {out['auto_accuracy']:.2f} of {n} configurations, "
          f"within 10% in {out['auto_within_10pct']:.2f}")
    return out


if __name__ == "__main__":
    main()
