"""Benchmark: does ``backend="auto"`` pick the fastest backend, on the models people use?

For each model of the sweep (MLPs from tiny to wide, small CNNs with and without BatchNorm, a
ResNet-18-shaped CNN on CIFAR-shaped inputs at N = 256, transformer models on token ids and on
image patches) every backend that can run is timed side by side in one process:

* ``first_s``: the first product of a fresh operator (factor pass, explicit Jacobian, kernel
  load or compile included);
* ``product_s``: the median of later products, the backends interleaved round by round so that
  load from other processes hits them alike.

A backend that fails is recorded with its error (``status: "error"``), as is one skipped because
its explicit Jacobian would not fit (``dense``). The score of a backend is the time of a workload
of ``--products`` products (a CG solve): ``setup + products · product_s`` with ``setup = first_s -
product_s``; ``auto`` is scored against the fastest by that and by the per-product time alone.

    python benchmarks/bench_auto.py --out results/bench/auto.json
    python benchmarks/bench_auto.py --quick --out results/bench/auto_quick.json
    python benchmarks/bench_auto.py --cases resnet18 transformer --repeats 3
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from _common import environment, interleaved, is_oom, mlp, print_table, write_json
from _models import EmbedLNGelu, PatchTransformer, TokenTransformer, resnet18, small_cnn

import ntkscale as nks
from ntkscale.backends import cost

BACKENDS = ("autodiff", "structured", "cuda", "keops", "dense")
DENSE_MAX_BYTES = 2 * 2**30  # explicit Jacobians beyond this are not attempted


def _images(n):
    return torch.randn(n, 3, 32, 32)


def _tokens(n, seq=16, vocab=100):
    return torch.randint(0, vocab, (n, seq))


# name -> (description, model factory, data factory, N, N in the quick preset)
def _vectors(d):
    return lambda n: torch.randn(n, d)


def _mlp_case(widths, n, n_quick):
    name = "MLP " + "-".join(map(str, widths))
    return name, lambda: mlp(widths), _vectors(widths[0]), n, n_quick


CASES = {
    "mlp_tiny": _mlp_case([20, 64, 64, 10], 64, 64),
    "mlp_small": _mlp_case([64, 256, 256, 1], 1024, 256),
    "mlp_784": _mlp_case([784, 1024, 1024, 10], 1024, 128),
    "mlp_wide": _mlp_case([64, 2048, 2048, 1], 256, 128),
    "mlp_wider": _mlp_case([64, 4096, 4096, 1], 1024, None),
    "mlp_wide_c10": _mlp_case([64, 2048, 2048, 10], 256, None),
    "cnn": ("CNN 3x3 convs 32-64-64, CIFAR", lambda: small_cnn(10, 32), _images, 256, 32),
    "cnn_bn": ("CNN 32-64-64 + BatchNorm, CIFAR", lambda: small_cnn(10, 32, batchnorm=True),
               _images, 256, None),
    "resnet18": ("ResNet-18 (torchvision layout), CIFAR", lambda: resnet18(10), _images, 256, None),
    "transformer": ("TransformerEncoderLayer d64, 16 tokens", TokenTransformer, _tokens, 256, 64),
    "vit": ("ViT-style 8x8 patches, d64", lambda: PatchTransformer(), _images, 256, None),
    "embed_ln_gelu": ("Embedding+LayerNorm+GELU, 16 tokens", lambda: EmbedLNGelu(), _tokens, 256, 64),
}


def _workload(first: float, per: float, products: int) -> float:
    return max(first - per, 0.0) + products * per


def run_case(name: str, args, bar=None) -> dict:
    desc, make_model, make_data, n_full, n_quick = CASES[name]
    n = args.n or (n_quick if args.quick else n_full)
    torch.manual_seed(0)
    model = make_model()
    X = make_data(n)
    P = sum(p.numel() for p in model.parameters())
    rec: dict = {"case": name, "model": desc, "N": n, "P": P}
    t0 = time.perf_counter()
    try:
        auto = nks.NTKOperator(model, X, backend="auto")
    except Exception as err:
        rec["auto"] = None
        rec["auto_error"] = f"{type(err).__name__}: {err}"[:300]
        auto = None
    rec["auto_decision_s"] = time.perf_counter() - t0
    if auto is not None:
        rec["auto"] = auto.backend
        est = auto.cost_estimates
        rec["C"] = est.get("C")
        rec["estimates"] = {k: est.get(k) for k in ("setup_s", "product_s", "total_s", "cannot_run")}
    rec["C"] = rec.get("C") or model(X[:1]).shape[-1]
    C = rec["C"]
    ops, results = {}, {}
    v = torch.randn(n * C)
    for b in args.backends:
        if b == "keops" and n > args.keops_max_n:
            results[b] = {"status": "skipped", "detail": f"N > --keops-max-n {args.keops_max_n}"}
            continue
        if b == "dense" and n * C * P * 4 > DENSE_MAX_BYTES:
            results[b] = {"status": "skipped",
                          "detail": f"explicit Jacobian {n * C * P * 4 / 2**30:.1f} GiB"}
            continue
        if bar is not None:
            bar.set_postfix_str(f"{name}: {b} first product")
        try:
            t0 = time.perf_counter()
            op = nks.NTKOperator(model, X, backend=b)
            op @ v
            results[b] = {"first_s": time.perf_counter() - t0}
            ops[b] = op
        except Exception as err:  # recorded, the sweep goes on
            results[b] = {"status": "oom" if is_oom(err) else "error",
                          "detail": f"{type(err).__name__}: {err}"[:300]}
    # slow ones are timed once more rather than `repeats` times
    slow = {b for b in ops if results[b]["first_s"] > args.max_seconds}
    if bar is not None:
        bar.set_postfix_str(f"{name}: {args.repeats} interleaved rounds")
    fast = {b: (lambda op=op: op @ v) for b, op in ops.items() if b not in slow}
    times = interleaved(fast, repeats=args.repeats, warmup=0) if fast else {}
    if slow:
        times.update(interleaved({b: (lambda op=ops[b]: op @ v) for b in slow}, repeats=1, warmup=0))
    for b, t in times.items():
        results[b]["product_s"] = t["median_s"]
        results[b]["repeats"] = t["repeats"]
        results[b]["workload_s"] = _workload(results[b]["first_s"], t["median_s"], args.products)
    rec["results"] = results
    ok = {b: r for b, r in results.items() if "product_s" in r}
    if ok:
        rec["fastest_product"] = min(ok, key=lambda b: ok[b]["product_s"])
        rec["fastest_workload"] = min(ok, key=lambda b: ok[b]["workload_s"])
        pick = ok.get(rec.get("auto"))
        best_p = ok[rec["fastest_product"]]["product_s"]
        best_w = ok[rec["fastest_workload"]]["workload_s"]
        rec["auto_within_10pct_product"] = pick is not None and pick["product_s"] <= 1.1 * best_p
        rec["auto_within_10pct_workload"] = pick is not None and pick["workload_s"] <= 1.1 * best_w
        rec["auto_slowdown_workload"] = pick["workload_s"] / best_w if pick else None
        # what auto may pick under its memory rules (dense only while its Jacobians are small, or
        # when nothing else runs): the backends its cost model did not rule out
        ruled_out = rec.get("estimates", {}).get("cannot_run", {})
        eligible = {b: r for b, r in ok.items() if b not in ruled_out} or ok
        rec["fastest_eligible"] = min(eligible, key=lambda b: eligible[b]["workload_s"])
        best_e = eligible[rec["fastest_eligible"]]["workload_s"]
        rec["auto_within_10pct_eligible"] = pick is not None and pick["workload_s"] <= 1.1 * best_e
    return rec


def _row(rec: dict, backends) -> dict:
    row = {"case": rec["case"], "N": rec["N"], "C": rec.get("C"), "P": rec["P"]}
    for b in backends:
        r = rec["results"].get(b, {})
        if "product_s" in r:
            row[b] = f"{1e3 * r['product_s']:.3g} ({r['first_s']:.2g}s)"
        else:
            row[b] = r.get("status", "-")
    row["auto"] = rec.get("auto") or "error"
    row["fastest"] = rec.get("fastest_workload", "-")
    if rec.get("fastest_eligible") not in (None, row["fastest"]):
        row["fastest"] += f" ({rec['fastest_eligible']} within memory rules)"
    slow = rec.get("auto_slowdown_workload")
    row["auto/best"] = f"{slow:.2f}" if slow else "-"
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=None)
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--n", type=int, default=None, help="samples (default: per case)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; quick 3)")
    ap.add_argument("--products", type=int, default=cost.EXPECTED_PRODUCTS,
                    help="products in the scored workload (default: the cost model's assumption)")
    ap.add_argument("--max-seconds", type=float, default=8.0,
                    help="a backend whose first product takes longer is timed once more only")
    ap.add_argument("--keops-max-n", type=int, default=None,
                    help="time KeOps only up to this N (default 256; quick 0): on a CPU it takes "
                         "seconds to minutes per product beyond, and compiles each new formula")
    ap.add_argument("--quick", action="store_true", help="a few small cases (about a minute)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default="results/bench/auto.json")
    args = ap.parse_args(argv)
    if args.cases is None:
        args.cases = [c for c, spec in CASES.items() if spec[4] is not None or not args.quick]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.keops_max_n is None:
        args.keops_max_n = 0 if args.quick else 256
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    doc = {"benchmark": "auto", "config": vars(args), "environment": environment(),
           "extension_built": cost.extension_status().built, "runs": []}
    nks.NTKOperator(mlp([4, 8, 1]), torch.randn(8, 4), backend="structured") @ torch.randn(8)  # warm-up
    bar = tqdm(args.cases, desc="bench auto", unit="case", disable=args.no_progress)
    for name in bar:
        try:
            rec = run_case(name, args, bar)
        except Exception as err:  # recorded, the sweep goes on
            rec = {"case": name, "status": "oom" if is_oom(err) else "error",
                   "detail": f"{type(err).__name__}: {err}"[:300], "results": {}}
        doc["runs"].append(rec)
        scored = [r for r in doc["runs"] if "auto_within_10pct_workload" in r]
        if scored:
            for key in ("workload", "product", "eligible"):
                hits = sum(r[f"auto_within_10pct_{key}"] for r in scored)
                doc[f"auto_within_10pct_{key}"] = hits / len(scored)
            doc["scored_cases"] = len(scored)
        write_json(args.out, doc)
    bar.close()
    print(f"per-product ms (first product s); workload = first + {args.products - 1} products")
    print_table([_row(r, args.backends) for r in doc["runs"] if "results" in r and "N" in r])
    nan = float("nan")
    print(f"auto within 10% of the fastest in {doc.get('auto_within_10pct_workload', nan):.2f} of "
          f"{doc.get('scored_cases', 0)} cases by workload "
          f"({doc.get('auto_within_10pct_eligible', nan):.2f} among the backends its memory rules "
          f"allow; {doc.get('auto_within_10pct_product', nan):.2f} by per-product time alone)")
    return doc


if __name__ == "__main__":
    main()
