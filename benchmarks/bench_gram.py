"""Benchmark: the full Gram matrix K (N·C × N·C) by ntkscale vs the torch.func Jacobian contraction.

The reference method is the one in the torch.func NTK tutorial: explicit per-sample Jacobians by
``vmap(jacrev)``, then ``einsum('Naf,Mbf->NMab')`` per parameter tensor, summed. It needs
N·C·P numbers for the Jacobian; ntkscale's structured backend needs per-layer factors and GEMMs.
Each method runs in a fresh process (peak resident-set growth measured there); a method that runs
out of memory is recorded as such.

    python benchmarks/bench_gram.py --out results/bench/gram.json                # N=1000, C=10, widths 512 and 2048
    python benchmarks/bench_gram.py --quick --out results/bench/gram_quick.json
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

from _common import environment, mlp, peak_during, print_table, run_isolated, write_json


def _setup(n, widths):
    torch.manual_seed(0)
    model = mlp(widths)
    X = torch.randn(n, widths[0])
    return model, X


def ntkscale_gram(n: int, widths: list[int], backend: str) -> dict:
    import ntkscale as nks

    model, X = _setup(n, widths)
    out = {}

    def run():
        K = nks.NTKOperator(model, X, backend=backend)
        out["K"] = K.to_dense()

    rec = peak_during(run)
    rec["shape"] = list(out["K"].shape)
    rec["checksum"] = float(out["K"].double().diagonal().sum())
    return rec


def jacobian_contraction_gram(n: int, widths: list[int]) -> dict:
    from torch.func import functional_call, jacrev, vmap

    model, X = _setup(n, widths)
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = {}

    def fnet_single(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    def run():
        jac = vmap(jacrev(fnet_single), (None, 0))(params, X)
        jac = [j.flatten(2) for j in jac.values()]
        out["K"] = torch.stack([torch.einsum("Naf,Mbf->NMab", j, j) for j in jac]).sum(0)

    rec = peak_during(run)
    rec["shape"] = list(out["K"].shape)
    rec["checksum"] = float(out["K"].double().diagonal(dim1=0, dim2=1).diagonal().sum())
    return rec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--widths", type=int, nargs="+", default=[512, 2048], help="hidden widths to sweep")
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--outputs", type=int, default=10)
    ap.add_argument("--backend", default="structured")
    ap.add_argument("--skip-reference-above", type=int, default=None,
                    help="record the reference as not run above this width (its Jacobian alone "
                         "needs N·C·P·4 bytes; the default tries it and records the out-of-memory)")
    ap.add_argument("--quick", action="store_true", help="N=200, widths 128 and 256")
    ap.add_argument("--out", default="results/bench/gram.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.widths = 200, [128, 256]
    doc = {"benchmark": "gram", "config": vars(args), "environment": environment(), "runs": []}
    for w in tqdm(args.widths, desc="bench gram", unit="width"):
        widths = [args.d_in, w, w, args.outputs]
        P = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
        rec = {"width": w, "P": P, "jacobian_bytes": args.n * args.outputs * P * 4}
        rec["ntkscale"] = run_isolated(ntkscale_gram, args.n, widths, args.backend)
        if args.skip_reference_above and w > args.skip_reference_above:
            rec["jacobian_contraction"] = {"status": "not run"}
        else:  # an allocation beyond the machine's memory fails at once and is recorded as oom
            rec["jacobian_contraction"] = run_isolated(jacobian_contraction_gram, args.n, widths)
        a, b = rec["ntkscale"], rec["jacobian_contraction"]
        if "seconds" in a and "seconds" in b:
            rec["speedup"] = b["seconds"] / a["seconds"]
            rec["memory_ratio"] = a["peak_growth_bytes"] / b["peak_growth_bytes"]
            rec["checksums_agree"] = abs(a["checksum"] - b["checksum"]) <= 1e-3 * abs(b["checksum"])
        doc["runs"].append(rec)
        write_json(args.out, doc)
    print_table([_row(r) for r in doc["runs"]])
    return doc


def _row(rec: dict) -> dict:
    a, b = rec["ntkscale"], rec["jacobian_contraction"]

    def side(r):
        if "seconds" not in r:
            return r.get("status", "-"), "-"
        return f"{r['seconds']:.3g}", f"{r['peak_growth_bytes'] / 2**20:.0f}"

    (ta, ma), (tb, mb) = side(a), side(b)
    return {"width": rec["width"], "P": rec["P"], "ntkscale s": ta, "ntkscale MiB": ma,
            "torch.func s": tb, "torch.func MiB": mb,
            "speedup": f"{rec['speedup']:.1f}x" if "speedup" in rec else "-",
            "agree": rec.get("checksums_agree", "-")}


if __name__ == "__main__":
    main()
