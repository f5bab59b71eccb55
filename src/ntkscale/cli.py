"""The ``ntkscale`` command line: ``demo``, ``info``, ``experiment``, ``bench``.

Examples:
    ntkscale demo --out results/demo        # the main job on built-in data, under a minute on CPU
    ntkscale demo --quick --out /tmp/demo   # the same in seconds, on a small preset
    ntkscale info                           # versions, CUDA, threads
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import sys
from importlib import metadata
from typing import Sequence

__all__ = ["main", "build_parser", "bench_suites"]

EXPERIMENTS = ("regression1d", "conditioning", "bandits", "continual")


def _version() -> str:
    from . import __version__

    return __version__


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect_info() -> dict:
    """Versions of ntkscale and its dependencies, CUDA availability and thread counts.

    Optional packages (pykeops, ninja, matplotlib, scikit-learn) are looked up by their installed
    metadata, without importing them.
    """
    import torch

    info: dict = {
        "ntkscale": _version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    for dist in ("linear_operator", "gpytorch", "pykeops", "ninja", "numpy", "matplotlib", "scikit-learn"):
        info[dist] = _dist_version(dist)
    cuda = torch.cuda.is_available()
    info["cuda_available"] = cuda
    info["torch_cuda_build"] = torch.version.cuda or "none (CPU build)"
    if cuda:
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["threads"] = torch.get_num_threads()
    info["interop_threads"] = torch.get_num_interop_threads()
    return info


def _cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        if value is None:
            value = "not installed"
        elif isinstance(value, list):
            value = ", ".join(value)
        print(f"{key:<{width}}  {value}")
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` (None: unchanged) for the block, then restored."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .demo import DEFAULT, QUICK, run_demo

    cfg = QUICK if args.quick else DEFAULT
    overrides = {
        k: v
        for k, v in {
            "n_train": args.n_train,
            "n_test": args.n_test,
            "steps": args.steps,
            "rank": args.rank,
            "seed": args.seed,
            "noise_rel": args.noise_rel,
        }.items()
        if v is not None
    }
    cfg = replace(cfg, **overrides)
    with _torch_threads(args.threads):
        run_demo(args.out, cfg, progress=not args.no_progress, figure=not args.no_figure)
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    if args.name not in EXPERIMENTS:
        print(
            f"ntkscale experiment: unknown study {args.name!r}; the studies are "
            f"{', '.join(EXPERIMENTS)}",
            file=sys.stderr,
        )
        return 2
    from .experiments import ExperimentError

    try:
        mod = importlib.import_module(f"ntkscale.experiments.{args.name}")
    except ImportError as err:  # a missing dependency, named in the message
        print(f"ntkscale experiment {args.name}: {err}", file=sys.stderr)
        return 2
    try:
        with _torch_threads(args.threads):
            mod.run(
                quick=args.quick,
                out=args.out,
                seed=args.seed,
                device=args.device,
                data_dir=args.data_dir,
                fresh=args.fresh,
                progress=not args.no_progress,
                figures=not args.no_figure,
            )
    except ExperimentError as err:
        print(f"ntkscale experiment {args.name}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _benchmark_scripts() -> list[str]:
    """The benchmark scripts of a source checkout (``benchmarks/bench_*.py``), if this is one."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    return sorted(str(p) for p in root.glob("bench_*.py")) if root.is_dir() else []


def bench_suites() -> dict[str, str]:
    """The benchmark suites of this checkout: name (``bench_NAME.py``) -> script path."""
    from pathlib import Path

    return {Path(p).stem.removeprefix("bench_"): p for p in _benchmark_scripts()}


# script stem -> arguments of its small preset (the memory benchmark has sizes instead)
_BENCH_QUICK = {"memory": ["--sizes", "2000", "20000"]}
_BENCH_DEVICE = ("matvec", "crossover", "kernel_space", "gp", "solvers")


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _cmd_bench(args: argparse.Namespace) -> int:
    import subprocess
    import time
    from pathlib import Path

    suites = bench_suites()
    if not suites:
        print(
            "ntkscale bench: the benchmarks live in benchmarks/ of the source repository; this "
            "installation has none (run `make bench` in a checkout)",
            file=sys.stderr,
        )
        return 2
    wanted = list(dict.fromkeys([*(args.suites or []), *(args.only or [])]))
    unknown = [n for n in wanted if n not in suites]
    if unknown:
        print(
            f"ntkscale bench: unknown suite{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; the suites are: {', '.join(suites)}",
            file=sys.stderr,
        )
        return 2
    chosen = [n for n in suites if not wanted or n in wanted]
    rows = []
    start = time.perf_counter()
    for k, name in enumerate(chosen, 1):
        script = suites[name]
        out = f"{args.out}/{name}.json"
        cmd = [sys.executable, script, "--out", out]
        if args.quick:
            cmd += _BENCH_QUICK.get(name, ["--quick"])
        if args.device != "cpu" and name in _BENCH_DEVICE:
            cmd += ["--device", args.device]
        print(f"[{k}/{len(chosen)}] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=Path(script).parents[1]).returncode
        took = time.perf_counter() - t0
        status = "ok" if rc == 0 else f"failed (exit {rc})"
        print(f"[{k}/{len(chosen)}] {name}: {status} in {_fmt_seconds(took)}; "
              f"{_fmt_seconds(time.perf_counter() - start)} so far\n", flush=True)
        rows.append((name, status, _fmt_seconds(took), out if rc == 0 else "-"))
    head = ("suite", "status", "time", "JSON")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    print(f"ntkscale bench: {len(chosen)} suite{'s' if len(chosen) > 1 else ''} in "
          f"{_fmt_seconds(time.perf_counter() - start)}")
    for r in (head, tuple("-" * w for w in widths), *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    failed = [r[0] for r in rows if r[1] != "ok"]
    if failed:
        print(f"ntkscale bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ntkscale`` command."""
    parser = argparse.ArgumentParser(
        prog="ntkscale",
        description="The empirical neural tangent kernel as a lazy, matrix-free linear operator.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="train an MLP on digits and compare it with its NTK kernel-regression predictor",
        description=(
            "Train a small MLP on scikit-learn's digits, build its NTK as a matrix-free operator, "
            "solve the kernel regression by CG with and without preconditioners, and predict with "
            "the cross-kernel. Prints a table; writes demo.json and demo.png into --out."
        ),
    )
    p.add_argument("--out", default="results/demo", help="output folder (default: results/demo)")
    p.add_argument("--quick", action="store_true", help="a small preset that runs in seconds")
    p.add_argument("--n-train", type=int, help="training samples (default 500; quick 100)")
    p.add_argument("--n-test", type=int, help="test samples (default 500; quick 100)")
    p.add_argument("--steps", type=int, help="training steps (default 300; quick 60)")
    p.add_argument("--rank", type=int, help="rank of the Nyström preconditioner (default 100; quick 30)")
    p.add_argument("--noise-rel", type=float, help="σ² relative to the NTK's mean diagonal (default 0.1)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--threads", type=_positive_int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-figure", action="store_true", help="write no PNG (no matplotlib needed)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("info", help="versions, CUDA availability and threads")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "experiment",
        help=f"run a study: {', '.join(EXPERIMENTS)}",
        description=(
            "Run a study's sweep: results.json (config, environment, rows) and PNG figures go to "
            "--out, a table is printed. An interrupted sweep resumes where it stopped when run "
            "again with the same --out. Without --quick the full preset runs, sized for one GPU."
        ),
    )
    p.add_argument("name", metavar="NAME", help=f"one of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--quick", action="store_true", help="the CPU preset (minutes)")
    p.add_argument("--out", default=None, help="output folder (default: results/NAME)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)")
    p.add_argument("--data-dir", default=None, help="folder of data sets already on disk (MNIST, CIFAR-10)")
    p.add_argument("--fresh", action="store_true", help="discard results already in --out and start over")
    p.add_argument("--threads", type=_positive_int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-figure", action="store_true", help="write no PNG (no matplotlib needed)")
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser("bench", help="run the benchmark suite")
    p.add_argument("--device", default="cpu", help="device to benchmark on (default: cpu)")
    p.add_argument("--out", default="results/bench", help="output folder (default: results/bench)")
    p.add_argument("--quick", action="store_true", help="the small preset of every benchmark")
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help="run only these suites, e.g. `ntkscale bench peers` (the same as --only)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these suites (e.g. matvec gram; an unknown name lists the suites)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ntkscale`` command.

    Args:
        argv: the arguments after the program name; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 for a usage error or a command not available.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if getattr(args, "out", "") is None and args.command == "experiment":
        args.out = f"results/{args.name}"
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
