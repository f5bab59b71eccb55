"""Shared pieces of the benchmarks: environment record, timing, peak memory in a child process."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def environment() -> dict:
    """What the numbers were measured on."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["tf32"] = torch.backends.cuda.matmul.allow_tf32
    return env


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict:
    """Median and min wall time of ``fn`` (device synchronized around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict:
    """Time several functions side by side, alternating them in each round (fair under noise)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "repeats": repeats} for k, v in times.items()}


def _rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process from /proc (Linux)."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory failure (host or device)."""
    if isinstance(err, MemoryError):
        return True
    oom_cls = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(err, oom_cls):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _child(target, args, queue):
    try:
        queue.put(("ok", target(*args)))
    except Exception as err:  # recorded, not raised: one failing case must not end the sweep
        queue.put(("oom" if is_oom(err) else "error", f"{type(err).__name__}: {err}"[:500]))


def run_isolated(target, *args, timeout: float = 3600) -> dict:
    """Run ``target(*args)`` in a fresh (spawned) process; returns its dict or a status record."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(target, args, queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        return {"status": "timeout"}
    if queue.empty():
        return {"status": "oom" if proc.exitcode in (-9, 137) else "error", "exitcode": proc.exitcode}
    status, value = queue.get()
    return value if status == "ok" else {"status": status, "detail": value}


def peak_during(fn: Callable[[], object]) -> dict:
    """Peak RSS growth while ``fn`` runs, over the RSS just before it (call in a fresh process)."""
    import gc

    gc.collect()
    before, peak_before = _rss_bytes()
    reset = False
    try:  # Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        pass
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    _, peak = _rss_bytes()
    return {
        "rss_before_bytes": before,
        "peak_bytes": peak,
        "peak_growth_bytes": peak - before,
        "peak_reset": reset,
        "peak_before_bytes": peak_before,
        "seconds": seconds,
    }


def apply_preset(args, quick: dict, full: dict):
    """Fill the arguments left at ``None`` from the ``--quick`` or the full preset; returns ``args``."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def write_json(path: str | os.PathLike, doc: dict) -> None:
    """Write ``doc`` atomically (a stopped run leaves the previous complete file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(path)


def mlp(widths, activation=torch.nn.ReLU) -> torch.nn.Sequential:
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), activation()]
    return torch.nn.Sequential(*layers[:-1])


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as an aligned plain-text table (columns: the keys of the first row)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    print(format_table(rows, columns), flush=True)
