"""Benchmark: the data-sharded NTK matvec on 1 and 2 gloo processes (this machine, 127.0.0.1).

MLP 784-512-512-10 on N = 4096 samples, float32 (the defaults), one thread per process. For each
world size the samples are split into contiguous shards; every process times the distributed
matvec (``ntkscale.distributed.NTKOperator``, autodiff and structured backends, 1 right-hand
side) with a barrier before each repeat, and reads from ``K.stats`` how much of the time went to
the collectives (the small check and the all-reduce of the P-vector, including waiting for the
slower rank). A bare all-reduce of P floats is timed beside it. A single-process
``ntkscale.NTKOperator`` with 1 thread is the baseline the speedup is measured against.

    python benchmarks/bench_distributed.py --out results/bench/distributed.json
    python benchmarks/bench_distributed.py --quick --out results/bench/distributed_quick.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import apply_preset, environment, mlp, write_json  # noqa: E402


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(args):
    torch.manual_seed(0)
    model = mlp(args.widths)
    X = torch.randn(args.n, args.widths[0])
    v = torch.randn(args.n * args.widths[-1])
    return model, X, v


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    import torch.distributed as dist

    import ntkscale as nks
    from ntkscale.distributed import NTKOperator

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=300),
        )
        model, X, v = _data(args)
        C = args.widths[-1]
        bounds = [round(i * args.n / world) for i in range(world + 1)]
        lo, hi = bounds[rank], bounds[rank + 1]
        out: dict = {"rank": rank, "samples": hi - lo}
        for backend in args.backends:
            K = NTKOperator(model, X[lo:hi], backend=backend)
            vr = v[lo * C : hi * C]
            K @ vr  # warm-up (and the structured backend's one-off factor pass)
            K.reset_stats()
            times = []
            for _ in range(args.repeats):
                dist.barrier()
                t0 = time.perf_counter()
                K @ vr
                times.append(time.perf_counter() - t0)
            s = K.stats
            out[backend] = {
                "matvec_median_s": statistics.median(times),
                "matvec_min_s": min(times),
                "local_s_per_matvec": s.local_seconds / s.products,
                "allreduce_s_per_matvec": s.allreduce_seconds / s.products,
                "allreduce_share": s.allreduce_share,
                "allreduce_bytes_per_matvec": s.allreduce_bytes // s.products,
            }
        P = sum(p.numel() for p in model.parameters())
        buf = torch.randn(P)
        bare = []
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            bare.append(time.perf_counter() - t0)
        out["bare_allreduce_median_s"] = statistics.median(bare)
        out["P"] = P
        if world == 1 and rank == 0:  # the single-process operator, same thread count
            for backend in args.backends:
                K1 = nks.NTKOperator(model, X, backend=backend)
                K1 @ v
                t = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    K1 @ v
                    t.append(time.perf_counter() - t0)
                out[f"single_process_{backend}_median_s"] = statistics.median(t)
        dist.destroy_process_group()
        queue.put(out)
    except Exception as err:  # reported, not hung
        queue.put({"rank": rank, "error": f"{type(err).__name__}: {err}"})


def run(world: int, args) -> list[dict]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=args.timeout) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"world size {world}: {errors}")
    return sorted(results, key=lambda r: r["rank"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--widths", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--backends", nargs="+", default=["autodiff", "structured"])
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--quick", action="store_true", help="N=512, widths 784-128-128-10, 3 repeats")
    ap.add_argument("--out", default="results/bench/distributed.json")
    args = apply_preset(
        ap.parse_args(argv),
        quick={"n": 512, "widths": [784, 128, 128, 10], "repeats": 3},
        full={"n": 4096, "widths": [784, 512, 512, 10], "repeats": 5},
    )
    per_world = {w: run(w, args) for w in (1, 2)}  # a 2-core machine busy with other work shares
    # its cores between the two ranks: compare local_s_per_matvec at 1 and 2 ranks to see it
    summary = {}
    for backend in args.backends:
        one = per_world[1][0][backend]["matvec_median_s"]
        two = max(r[backend]["matvec_median_s"] for r in per_world[2])
        summary[backend] = {
            "single_process_s": per_world[1][0][f"single_process_{backend}_median_s"],
            "one_rank_s": one,
            "two_ranks_s": two,
            "speedup_1_to_2": one / two,
            "local_s_per_matvec_1_rank": per_world[1][0][backend]["local_s_per_matvec"],
            "local_s_per_matvec_2_ranks": max(r[backend]["local_s_per_matvec"] for r in per_world[2]),
            "allreduce_share_2_ranks": max(r[backend]["allreduce_share"] for r in per_world[2]),
        }
    doc = {
        "benchmark": "distributed",
        "config": {"N": args.n, "widths": args.widths, "dtype": "float32", "process_group": "gloo",
                   "threads_per_process": 1, "repeats": args.repeats},
        "environment": {**environment(), "load_average_1_5_15min": os.getloadavg()},
        "per_world_size": {str(w): r for w, r in per_world.items()},
        "summary": summary,
    }
    write_json(args.out, doc)
    for backend, s in summary.items():
        print(
            f"{backend:10s} 1 rank {s['one_rank_s'] * 1e3:8.1f} ms   2 ranks {s['two_ranks_s'] * 1e3:8.1f} ms   "
            f"speedup {s['speedup_1_to_2']:.2f}x   all-reduce share (2 ranks) {s['allreduce_share_2_ranks']:.1%}"
        )
    return doc


if __name__ == "__main__":
    main()
