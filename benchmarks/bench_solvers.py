"""Preconditioned CG on an MLP's NTK: Nyström vs pivoted Cholesky vs Jacobi vs plain CG.

The system is the NTK-GP / kernel-regression training solve ``(Θ + σ² I) x = y − f(X)`` with
``Θ`` the empirical NTK of an MLP (default 784-512-512-10) on scikit-learn digits upsampled to
28×28 (synthetic Gaussian inputs with ``--data synthetic``, or when scikit-learn is missing), in
the ``"structured"`` backend, and ``σ² = noise_rel · mean(diag Θ)`` (default 1e-3). For each
preconditioner it records the build time, the solve time, the iterations, the final true
relative residual and the residual history (the recursive residual of every iteration, as the
preconditioner sees it).

Usage:
    python benchmarks/bench_solvers.py --quick --out results/bench/solvers_quick.json
    python benchmarks/bench_solvers.py --n 2000 --rank 500 --out results/bench/solvers.json

The JSON (with the environment: torch version, threads, device, CPU) is rewritten after every
preconditioner, so a run that stops keeps what it finished. Products are taken at most
``--rhs-block`` columns at a time (the Nyström sketch multiplies by ``rank`` columns), which bounds
the memory of a structured product.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (the benchmarks' shared helpers, beside this file)

import ntkscale as nks  # noqa: E402
from ntkscale.gp import ColumnBlockedOperator  # noqa: E402
from ntkscale.solvers import build_preconditioner, solve  # noqa: E402

QUICK = {"n": 300, "width": 256, "rank": 100, "max_iter": 1000, "train_steps": 20}
FULL = {"n": 2000, "width": 512, "rank": 500, "max_iter": 1000, "train_steps": 50}


# -- shared with bench_gp.py --------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """What the numbers were measured on: ``_common.environment()`` plus the CPU model and device."""
    env = _common.environment()
    try:
        with open("/proc/cpuinfo") as fh:
            env["cpu"] = next(
                (line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), platform.processor()
            )
    except OSError:
        env["cpu"] = platform.processor()
    env.update(ntkscale=getattr(nks, "__version__", "?"), device=str(device), platform=platform.platform())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def load_inputs(
    n: int, n_test: int, in_dim: int, data: str, seed: int, classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Inputs ``(n + n_test, in_dim)`` and one-hot labels; digits upsampled to ``in_dim`` pixels.

    Digits (1797 images of 8×8) are bilinearly upsampled to ``sqrt(in_dim)²`` pixels and
    standardized; when more samples are asked for than there are, the extra ones are shifted
    (±2 pixels) and slightly noised copies. Labels are taken modulo ``classes``. Returns
    ``X, y, X_test, y_test, meta``.
    """
    gen = torch.Generator().manual_seed(seed)
    total = n + n_test
    side = int(round(math.sqrt(in_dim)))
    meta: dict = {"data": data}
    img = labels = None
    if data == "digits":
        if side * side != in_dim:
            meta["data"] = f"synthetic (in_dim {in_dim} is not a square: digits need side² pixels)"
        else:
            try:
                from sklearn.datasets import load_digits

                d = load_digits()
                img = torch.tensor(d.images, dtype=torch.float32)[:, None]  # (1797, 1, 8, 8)
                labels = torch.tensor(d.target)
            except ImportError:
                meta["data"] = "synthetic (scikit-learn missing)"
    if img is not None:
        img = nn.functional.interpolate(img, size=(side, side), mode="bilinear", align_corners=False)
        perm = torch.randperm(img.shape[0], generator=gen)
        img, labels = img[perm], labels[perm]
        reps = math.ceil(total / img.shape[0])
        parts, lab = [img], [labels]
        for _ in range(reps - 1):
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            shifted = torch.roll(img, shifts=shift, dims=(2, 3))
            parts.append(shifted + 0.05 * shifted.std() * torch.randn(shifted.shape, generator=gen))
            lab.append(labels)
        X = torch.cat(parts)[:total].reshape(total, -1)
        labels = torch.cat(lab)[:total]
        meta["augmented_copies"] = max(0, total - img.shape[0])
        X = (X - X.mean()) / X.std()
    else:
        centers = torch.randn(10, in_dim, generator=gen)
        labels = torch.randint(0, 10, (total,), generator=gen)
        X = centers[labels] + torch.randn(total, in_dim, generator=gen)
        X = X / math.sqrt(2.0)
    y = nn.functional.one_hot(labels % classes, classes).float()
    return X[:n], y[:n], X[n:], y[n:], meta


def make_mlp(in_dim: int, width: int, depth: int, C: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, C))
    return nn.Sequential(*layers)


def train_briefly(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-3, batch: int = 256
) -> float:
    """``steps`` Adam steps on the MSE to one-hot targets (mini-batches); returns the last loss."""
    if steps <= 0:
        return float("nan")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (min(batch, X.shape[0]),), generator=gen)
        opt.zero_grad()
        loss = ((model(X[idx]) - y[idx]) ** 2).mean()
        loss.backward()
        opt.step()
    return loss.item()


write_json = _common.write_json  # atomic: a stopped run never leaves a half-written file


# -- this benchmark -----------------------------------------------------------------------------


class _Recorder:
    """Wraps a preconditioner (or none) and records ``‖r‖ / ‖b‖`` at every application.

    PCG applies the preconditioner to the initial residual and then once per iteration, so the
    record is the recursive residual history. With ``inner=None`` the identity is applied: plain
    CG, step for step.
    """

    def __init__(self, inner, n: int, bnorm: float):
        self.inner, self.n, self.bnorm = inner, n, bnorm
        self.name = getattr(inner, "name", None) or "none"
        self.rank = getattr(inner, "rank", None)
        self.history: list[float] = []

    def apply(self, R: torch.Tensor) -> torch.Tensor:
        self.history.append(torch.linalg.vector_norm(R).item() / self.bnorm)
        return R if self.inner is None else self.inner.apply(R)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"small preset, about a minute on 2 CPU cores: {QUICK}")
    p.add_argument("--n", type=int, default=None, help=f"training samples (N·C rows; default {FULL['n']})")
    p.add_argument("--in-dim", type=int, default=784)
    p.add_argument("--width", type=int, default=None, help=f"hidden width (default {FULL['width']})")
    p.add_argument("--depth", type=int, default=2, help="hidden layers")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--data", choices=["digits", "synthetic"], default="digits")
    p.add_argument("--train-steps", type=int, default=None, help="Adam steps before the kernel is taken (0: at init)")
    p.add_argument("--noise-rel", type=float, default=1e-3, help="σ² = noise_rel · mean(diag Θ)")
    p.add_argument("--rank", type=int, default=None, help=f"Nyström / pivoted-Cholesky rank (default {FULL['rank']})")
    p.add_argument("--tol", type=float, default=1e-4, help="relative residual tolerance")
    p.add_argument("--max-iter", type=int, default=None, help=f"CG iteration cap (default {FULL['max_iter']})")
    p.add_argument(
        "--preconditioners", default="nystrom,pivchol,jacobi,none", help="comma-separated, in the order run"
    )
    p.add_argument("--rhs-block", type=int, default=64, help="most right-hand-side columns per product")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--backend", default="structured")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench/solvers.json")
    return _common.apply_preset(p.parse_args(argv), QUICK, FULL)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    result: dict = {
        "benchmark": "solvers",
        "config": vars(args),
        "environment": environment(device),
        "runs": [],
        "complete": False,
    }

    X, y, _, _, meta = load_inputs(args.n, 0, args.in_dim, args.data, args.seed, args.classes)
    result["config"]["data_used"] = meta
    model = make_mlp(args.in_dim, args.width, args.depth, args.classes, args.seed)
    t0 = time.perf_counter()
    result["train_loss"] = train_briefly(model, X, y, args.train_steps)
    result["train_seconds"] = time.perf_counter() - t0
    model = model.to(device=device, dtype=dtype).eval()
    X, y = X.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)

    t0 = time.perf_counter()
    K = nks.NTKOperator(model, X, backend=args.backend)
    diag = K.diagonal()  # builds and caches the per-layer factors
    _sync(device)
    setup = time.perf_counter() - t0
    Kb = ColumnBlockedOperator(K, args.rhs_block)
    noise = args.noise_rel * diag.mean().item()
    with torch.no_grad():
        rhs = (y - model(X)).reshape(-1)
    bnorm = torch.linalg.vector_norm(rhs).item()
    v = torch.randn(K.shape[0], generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    for _ in range(2):  # warm-up: first products pay one-time costs
        K @ v
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        K @ v
        _sync(device)
        times.append(time.perf_counter() - t0)
    result["problem"] = {
        "rows": K.shape[0],
        "N": args.n,
        "C": K.num_outputs,
        "P": K.num_params,
        "backend": K.backend,
        "dtype": args.dtype,
        "noise": noise,
        "mean_diag": diag.mean().item(),
        "setup_seconds": setup,
        "matvec_seconds_median": sorted(times)[2],
    }
    print(
        f"NTK: {K.shape[0]} rows, P = {K.num_params}, noise = {noise:.3g}, one matvec {sorted(times)[2]:.4f} s",
        flush=True,
    )
    write_json(out, result)

    for name in [s.strip() for s in args.preconditioners.split(",") if s.strip()]:
        pname = None if name == "none" else name
        run: dict = {"preconditioner": name, "rank": args.rank if name in ("nystrom", "pivchol") else None}
        try:
            t0 = time.perf_counter()
            P = build_preconditioner(Kb, pname, noise=noise, rank=args.rank, seed=args.seed)
            _sync(device)
            run["build_seconds"] = time.perf_counter() - t0
            rec = _Recorder(P, K.shape[0], bnorm)
            t0 = time.perf_counter()
            _, info = solve(Kb, rhs, noise=noise, preconditioner=rec, tol=args.tol, max_iter=args.max_iter, warn=False)
            _sync(device)
            run.update(
                solve_seconds=time.perf_counter() - t0,
                iterations=info.iterations,
                matvecs=info.matvecs,
                converged=info.converged,
                final_relative_residual=info.residual_norm.max().item(),
                restarts=info.restarts,
                residual_history=rec.history,
                # first iteration whose recursive residual is at or below each level (None: never)
                iterations_to={
                    f"{lvl:.0e}": next((i for i, r in enumerate(rec.history) if r <= lvl), None)
                    for lvl in (1e-1, 1e-2, 1e-3, 1e-4)
                },
            )
            run["total_seconds"] = run["build_seconds"] + run["solve_seconds"]
        except torch.OutOfMemoryError as err:  # a recorded result, not a crash
            run.update(error="out of memory", detail=str(err)[:500])
        except MemoryError as err:
            run.update(error="out of memory", detail=str(err)[:500])
        result["runs"].append(run)
        write_json(out, result)
        if "error" in run:
            print(f"{name:8s} {run['error']}", flush=True)
        else:
            print(
                f"{name:8s} rank={run['rank']!s:5s} build {run['build_seconds']:7.2f} s  solve "
                f"{run['solve_seconds']:7.2f} s  iterations {run['iterations']:5d}  residual "
                f"{run['final_relative_residual']:.1e}  converged={run['converged']}",
                flush=True,
            )
    result["complete"] = True
    write_json(out, result)
    print(f"wrote {out}")
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
