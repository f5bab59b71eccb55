"""Benchmark: kernel-space NTK product implementations against the weight-space form.

For an MLP-like factor set -- ``--layers`` Linear layers with ``d = o = width``, ``C`` outputs,
``k`` right-hand sides -- time ``K(X, X) V`` with ``N1 = N2 = N`` by

* ``torch``  -- :func:`ntkscale.reductions.core.kernel_space_matmul_reference`,
* ``keops``  -- the pykeops reduction (skipped when pykeops is missing),
* ``cpp``    -- the compiled C++ twin (CPU runs only),
* ``cuda``   -- the fused CUDA kernel (GPU runs only),
* ``weight`` -- the weight-space form: ``U_l = Σ_{j,c'} V[j,c'] G2[j,c'] ⊗ A2[j]`` (GEMM),
  then ``out = Σ_l G1 U_l A1ᵀ`` (GEMMs),

on a grid of ``N`` and widths. Each case reports the median (and min) of ``--repeats`` timed
runs after ``--warmup`` untimed ones (which also absorb JIT compilation), synchronizing the GPU
around each run; on CUDA also the peak allocated memory of the case (in-process, after
``torch.cuda.reset_peak_memory_stats``). Out-of-memory is recorded as ``status="oom"``, other
failures as ``status="error"``; an impl that exceeded ``--max-case-seconds`` is skipped at the
larger sizes that follow. Results, with the environment (torch version, device, threads, dtype,
TF32), are written to ``--out`` as JSON after every case, so an interrupted sweep keeps its
results.

Examples::

    python benchmarks/bench_kernel_space.py --quick --out results/bench_kernel_space_quick.json
    python benchmarks/bench_kernel_space.py --device cuda --tf32 off --out results/ks_gpu.json
    python benchmarks/bench_kernel_space.py --n 1024 --widths 512 2048 --impls torch cpp weight
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import environment, is_oom, sync, write_json

from ntkscale.reductions import kernel_space_matmul

ALL_IMPLS = ("torch", "keops", "cpp", "cuda", "weight")
FULL_N = (256, 1024, 4096)
FULL_WIDTHS = (256, 512, 1024, 2048, 4096, 8192)
QUICK_N = (256, 1024)
QUICK_WIDTHS = (256, 1024)


def weight_space_matmul(A1, G1, A2, G2, V):
    """Weight-space form of the same product (all GEMMs).

    Per layer: ``W = Σ_c' G2[:, c'] ⊗ V[:, c']`` (N2, o, k); ``U = Wᵀ A2`` (o k, d);
    ``T = U A1ᵀ`` (o k, N1); ``out[i] += G1[i] T[:, :, i]``.
    """
    N1, C, k = A1[0].shape[0], G1[0].shape[1], V.shape[2]
    N2 = A2[0].shape[0]
    out = V.new_zeros((N1, C, k))
    for a1, g1, a2, g2 in zip(A1, G1, A2, G2):
        o = g1.shape[2]
        W = torch.bmm(g2.transpose(1, 2), V).reshape(N2, o * k)  # (N2, o*k)
        U = W.T @ a2  # (o*k, d)
        T = (U @ a1.T).reshape(o, k, N1).permute(2, 0, 1)  # (N1, o, k)
        out = torch.baddbmm(out, g1, T)
    return out


def make_factors(N, width, C, layers, dtype, device, seed=0):
    """Random MLP-like factors: A (N, width) ~ 1/√width, G (N, C, width) ~ 1/√width."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    scale = 1.0 / math.sqrt(width)
    A = [(torch.randn(N, width, generator=g) * scale).to(device=device, dtype=dtype)
         for _ in range(layers)]
    G = [(torch.randn(N, C, width, generator=g) * scale).to(device=device, dtype=dtype)
         for _ in range(layers)]
    return A, G


def flops(impl, N, width, C, k, layers):
    """Multiply-add count x2 of each form (for reading the table, not used in timing)."""
    d = o = width
    if impl == "weight":
        per = 2 * N * C * o * k + 2 * N * o * k * d * 2 + 2 * N * C * o * k
    elif impl == "cuda":  # fused S W: the s tile is recomputed for each 64-wide column tile
        per = 2 * N * C * o * k + 2 * N * N * (d * -(-(o * k) // 64) + o * k) + 2 * N * C * o * k
    else:  # torch / cpp / keops sum over j before contracting with G1
        per = 2 * N * C * o * k + 2 * N * N * (d + o * k) + 2 * N * C * o * k
    return per * layers


def run_case(impl, A, G, V, device, repeats, warmup, max_case_seconds):
    if impl == "weight":
        fn = lambda: weight_space_matmul(A, G, A, G, V)  # noqa: E731
    else:
        fn = lambda: kernel_space_matmul(A, G, A, G, V, impl=impl)  # noqa: E731
    rec = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = None
        for _ in range(max(1, warmup)):
            sync()
            out = fn()
            sync()
        rec["first_s"] = time.perf_counter() - t0  # warm-up incl. any JIT compilation
        times = []
        for q in range(repeats):
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t)
            if sum(times) > max_case_seconds and q >= 0:
                break
    rec["times_s"] = times
    rec["median_s"] = statistics.median(times)
    rec["min_s"] = min(times)
    if device.type == "cuda":
        rec["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    return out, rec


def _environment(device, dtype, tf32) -> dict:
    """``_common.environment()`` plus this benchmark's device, dtype, TF32 and pykeops version."""
    env = environment()
    env.update(device=str(device), dtype=str(dtype).replace("torch.", ""), tf32=tf32, cuda_version=torch.version.cuda)
    try:
        import pykeops

        env["pykeops"] = pykeops.__version__
    except ImportError:
        env["pykeops"] = None
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true",
                   help=f"small preset: N {QUICK_N}, widths {QUICK_WIDTHS}, 3 repeats")
    p.add_argument("--n", type=int, nargs="+", default=None, help=f"N values (default {FULL_N})")
    p.add_argument("--widths", type=int, nargs="+", default=None,
                   help=f"layer widths d = o (default {FULL_WIDTHS})")
    p.add_argument("--impls", nargs="+", default=list(ALL_IMPLS), choices=ALL_IMPLS)
    p.add_argument("--C", type=int, default=10, help="network outputs (default 10)")
    p.add_argument("--k", type=int, default=1, help="right-hand sides (default 1)")
    p.add_argument("--layers", type=int, default=3, help="Linear layers (default 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 5; quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--tf32", default="off", choices=("on", "off"),
                   help="allow TF32 in torch matmuls on Ampere+ GPUs (default off)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--max-case-seconds", type=float, default=60.0,
                   help="stop repeating a case after this long, and skip the impl at larger "
                        "sizes once one case exceeded it (default 60)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available())
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    Ns = args.n or (QUICK_N if args.quick else FULL_N)
    widths = args.widths or (QUICK_WIDTHS if args.quick else FULL_WIDTHS)
    repeats = args.repeats or (3 if args.quick else 5)

    impls = []
    for impl in args.impls:
        if impl == "cuda" and device.type != "cuda":
            print("skip cuda: not a CUDA run", file=sys.stderr)
        elif impl == "cpp" and device.type != "cpu":
            print("skip cpp: the C++ twin runs on CPU tensors", file=sys.stderr)
        elif impl == "keops" and not _has_keops():
            print("skip keops: pykeops is not installed", file=sys.stderr)
        else:
            impls.append(impl)

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "kernel_space",
        "env": _environment(device, dtype, args.tf32),
        "config": {"N": list(Ns), "widths": list(widths), "impls": impls, "C": args.C,
                   "k": args.k, "layers": args.layers, "repeats": repeats,
                   "warmup": args.warmup, "max_case_seconds": args.max_case_seconds},
        "results": [],
    }
    too_slow: dict[str, tuple[int, int]] = {}
    for N in Ns:
        for width in widths:
            try:
                A, G = make_factors(N, width, args.C, args.layers, dtype, device)
                V = torch.randn(N, args.C, args.k, generator=torch.Generator().manual_seed(1),
                                dtype=torch.float64).to(device=device, dtype=dtype)
            except Exception as err:  # noqa: BLE001 - recorded, not raised
                status = "oom" if is_oom(err) else "error"
                for impl in impls:
                    doc["results"].append({"impl": impl, "N": N, "width": width,
                                           "status": status, "message": str(err)[:300]})
                write_json(out_path, doc)
                continue
            ref = None
            for impl in impls:
                rec = {"impl": impl, "N": N, "width": width, "C": args.C, "k": args.k,
                       "layers": args.layers,
                       "flops": flops(impl, N, width, args.C, args.k, args.layers)}
                if impl in too_slow:
                    rec.update(status="skipped",
                               message=f"exceeded --max-case-seconds at N, width = "
                                       f"{too_slow[impl]}")
                    doc["results"].append(rec)
                    continue
                try:
                    out, timing = run_case(impl, A, G, V, device, repeats, args.warmup,
                                           args.max_case_seconds)
                    rec.update(status="ok", **timing)
                    if ref is None:
                        ref = out
                    else:
                        scale = ref.abs().max().clamp_min(1e-30)
                        rec["rel_diff_vs_first"] = float((out - ref).abs().max() / scale)
                    del out
                    if timing["first_s"] + sum(timing["times_s"]) > args.max_case_seconds:
                        too_slow[impl] = (N, width)
                except Exception as err:  # noqa: BLE001 - recorded, not raised
                    rec.update(status="oom" if is_oom(err) else "error",
                               message=str(err)[:300])
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                doc["results"].append(rec)
                _print(rec)
                write_json(out_path, doc)
            del A, G, V, ref
            if device.type == "cuda":
                torch.cuda.empty_cache()
    write_json(out_path, doc)
    print(f"wrote {out_path}")
    return doc


def _has_keops():
    try:
        import pykeops  # noqa: F401
    except ImportError:
        return False
    return True


def _print(rec):
    if rec["status"] == "ok":
        gfs = rec["flops"] / rec["median_s"] / 1e9
        extra = f"  diff {rec['rel_diff_vs_first']:.1e}" if "rel_diff_vs_first" in rec else ""
        print(f"N={rec['N']:5d} width={rec['width']:5d} {rec['impl']:6s} "
              f"median {rec['median_s'] * 1e3:9.2f} ms  ({gfs:7.1f} GFLOP/s){extra}", flush=True)
    else:
        print(f"N={rec['N']:5d} width={rec['width']:5d} {rec['impl']:6s} {rec['status']}: "
              f"{rec.get('message', '')[:120]}", flush=True)


if __name__ == "__main__":
    main()
