"""The demo: a trained MLP on digits against its NTK kernel-regression predictor.

Run as ``ntkscale demo --out DIR`` (or :func:`run_demo`). It

1. trains a small MLP on scikit-learn's digits by regression onto one-hot targets;
2. builds the empirical NTK at the trained weights, ``K = nks.NTKOperator(model, X_train)``
   (never formed: every product is a VJP and a JVP over the data);
3. solves ``(K + σ² I) α = y − f(X_train)`` by CG, without a preconditioner and with the
   Jacobi and randomized Nyström ones, counting iterations;
4. predicts ``f(X_test) + Θ(X_test, X_train) α`` with the cross-kernel operator;
5. prints a table, and writes ``demo.json`` (numbers and environment) and ``demo.png`` into
   the output folder.

Rows of the operator are ordered ``(sample, output)``: the right-hand side is
``(y − f(X)).reshape(-1)`` for ``y`` of shape (N, C).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["DemoConfig", "run_demo", "QUICK", "DEFAULT"]


@dataclass
class DemoConfig:
    """Sizes and knobs of the demo.

    Attributes:
        n_train: training samples of digits (N; the operator is N·10 square).
        n_test: test samples.
        widths: hidden layer widths of the MLP (64 inputs, 10 outputs around them).
        steps: Adam steps on the mean squared error to one-hot targets.
        batch_size: minibatch size of training.
        lr: Adam learning rate.
        noise_rel: σ² relative to the mean of the NTK's diagonal (its average eigenvalue), so
            the regularization means the same thing whatever the network's scale.
        preconditioners: the CG runs to compare (``None`` for plain CG).
        rank: rank of the Nyström preconditioner.
        tol: relative residual tolerance of CG.
        max_iter: iteration cap of CG.
        seed: seed of the split, the initialization and the minibatches.
    """

    n_train: int = 500
    n_test: int = 500
    widths: tuple[int, ...] = (256, 256)
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    noise_rel: float = 0.1
    preconditioners: tuple[str | None, ...] = (None, "jacobi", "nystrom")
    rank: int = 100
    tol: float = 1e-4
    max_iter: int = 1000
    seed: int = 0


DEFAULT = DemoConfig()
QUICK = DemoConfig(n_train=100, n_test=100, widths=(64, 64), steps=60, rank=30, max_iter=400)


def _mlp(d_in: int, widths: tuple[int, ...], d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(d_in, w), nn.ReLU()]
        d_in = w
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def _metrics(pred: Tensor, Y: Tensor) -> dict:
    """Accuracy (argmax against the one-hot target) and MSE (mean over all entries)."""
    return {
        "accuracy": (pred.argmax(1) == Y.argmax(1)).float().mean().item(),
        "mse": torch.mean((pred - Y) ** 2).item(),
    }


def _environment() -> dict:
    from . import __version__

    return {
        "ntkscale": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "device": "cpu",
    }


def _history(info) -> list[float] | None:
    """The largest relative residual per CG iteration, where the solver records one."""
    hist = getattr(info, "residual_history", None)
    if hist is None or len(hist) == 0:
        return None
    h = torch.as_tensor(hist if torch.is_tensor(hist) else [torch.as_tensor(r).max() for r in hist])
    return [float(r) for r in h.reshape(h.shape[0], -1).max(1).values]


def _name(pc: str | None) -> str:
    return "none" if pc is None else pc


def run_demo(
    out: str | os.PathLike | None = "results/demo",
    config: DemoConfig | None = None,
    progress: bool = True,
    verbose: bool = True,
    figure: bool = True,
) -> dict:
    """Run the demo and write ``demo.json`` and ``demo.png`` into ``out``.

    Args:
        out: output folder (created); ``None`` writes nothing.
        config: sizes and knobs; default :data:`DEFAULT` (:data:`QUICK` is a seconds-long one).
        progress: show tqdm bars for training.
        verbose: print the table.
        figure: write the PNG (needs matplotlib).

    Returns:
        The numbers written to ``demo.json``: ``config``, ``environment``, ``noise``,
        ``metrics`` (train/test accuracy and MSE of the net and of the NTK predictor),
        ``solves`` (per preconditioner: iterations, matvecs, residual, converged, seconds),
        ``timings`` (seconds per stage) and ``files``.

    Raises:
        ImportError: scikit-learn (or, with ``figure=True``, matplotlib) is not installed.
    """
    from . import NTKOperator, solve
    from .data import digits

    cfg = config or DEFAULT
    timings: dict[str, float] = {}
    torch.manual_seed(cfg.seed)

    t0 = time.perf_counter()
    ds = digits(n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed, one_hot=True)
    Xtr, Ytr, Xte, Yte = ds.X_train, ds.y_train, ds.X_test, ds.y_test  # shapes: (N, 64), (N, 10)
    timings["data"] = time.perf_counter() - t0

    # 1. Train the network: regression onto one-hot targets.
    t0 = time.perf_counter()
    model = _mlp(ds.num_features, tuple(cfg.widths), ds.num_outputs)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    bs = min(cfg.batch_size, cfg.n_train)
    bar = tqdm(range(cfg.steps), desc="train MLP", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, cfg.n_train, (bs,), generator=gen)
        loss = torch.mean((model(Xtr[idx]) - Ytr[idx]) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(mse=f"{loss.item():.4f}", refresh=False)
    bar.close()
    model.eval()
    timings["train"] = time.perf_counter() - t0

    with torch.no_grad():
        f_tr, f_te = model(Xtr), model(Xte)  # shapes: (N, 10), (M, 10)

    # 2. The NTK at the trained weights, matrix-free.
    t0 = time.perf_counter()
    K = NTKOperator(model, Xtr)
    timings["operator"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean_diag = K.diagonal().mean().item()  # cached by the operator; Jacobi reuses it
    timings["diagonal"] = time.perf_counter() - t0
    noise = cfg.noise_rel * mean_diag

    # 3. (K + σ² I) α = y − f(X), rows ordered (sample, output).
    rhs = (Ytr - f_tr).reshape(-1)  # shape: (N*C,)
    solves: dict[str, dict] = {}
    alphas: dict[str, Tensor] = {}
    for pc in cfg.preconditioners:
        t0 = time.perf_counter()
        alpha, info = solve(
            K,
            rhs,
            noise=noise,
            preconditioner=pc,
            tol=cfg.tol,
            max_iter=cfg.max_iter,
            rank=cfg.rank,
            warn=False,
        )
        seconds = time.perf_counter() - t0
        timings[f"solve[{_name(pc)}]"] = seconds
        solves[_name(pc)] = {
            "iterations": int(info.iterations),
            "matvecs": int(getattr(info, "matvecs", -1)),
            "residual_norm": float(info.residual_norm.max().item()),
            "converged": bool(info.converged),
            "seconds": seconds,
            "rank": cfg.rank if pc in ("nystrom", "pivchol") else None,
            "residual_history": _history(info),
        }
        alphas[_name(pc)] = alpha

    # 4. Predict with the cross-kernel. α comes from the Nyström solve when it converged, else
    # from the solve with the smallest residual.
    if solves.get("nystrom", {}).get("converged"):
        best = "nystrom"
    else:
        best = min(solves, key=lambda k: (not solves[k]["converged"], solves[k]["residual_norm"]))
    alpha = alphas[best]
    t0 = time.perf_counter()
    Ks = NTKOperator(model, Xte, Xtr)
    with torch.no_grad():
        ntk_te = f_te + (Ks @ alpha).reshape_as(f_te)
        # On the training data K α = rhs − σ² α, so no further product is needed.
        ntk_tr = f_tr + (rhs - noise * alpha).reshape_as(f_tr)
    timings["predict"] = time.perf_counter() - t0

    metrics = {
        "net": {"train": _metrics(f_tr, Ytr), "test": _metrics(f_te, Yte)},
        "ntk": {"train": _metrics(ntk_tr, Ytr), "test": _metrics(ntk_te, Yte)},
        "test_agreement": (ntk_te.argmax(1) == f_te.argmax(1)).float().mean().item(),
        "alpha_from": best,
    }
    if len(alphas) > 1:
        ref = alphas[best]
        metrics["alpha_rel_diff"] = {
            k: (torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()
            for k, a in alphas.items()
        }

    result = {
        "config": asdict(cfg),
        "environment": _environment(),
        "operator": {
            "shape": list(K.shape),
            "num_params": K.num_params,
            "backend": K.backend,
            "mean_diagonal": mean_diag,
        },
        "noise": noise,
        "metrics": metrics,
        "solves": solves,
        "timings": timings,
        "files": {},
    }
    result["config"]["preconditioners"] = [_name(p) for p in cfg.preconditioners]

    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if figure:
            png = out / "demo.png"
            _figure(result, png)
            result["files"]["figure"] = str(png)
        js = out / "demo.json"
        result["files"]["json"] = str(js)
        js.write_text(json.dumps(result, indent=2) + "\n")
    if verbose:
        print(format_table(result))
    return result


def format_table(result: dict) -> str:
    """The demo's numbers as a plain-text table."""
    m, s, t = result["metrics"], result["solves"], result["timings"]
    op = result["operator"]
    lines = [
        f"NTK operator: {op['shape'][0]} x {op['shape'][1]} over P={op['num_params']:,} parameters, "
        f"backend={op['backend']}; σ² = {result['noise']:.4g} "
        f"({result['config']['noise_rel']:g} x mean diagonal {op['mean_diagonal']:.4g})",
        "",
        f"{'predictor':<22}{'train acc':>10}{'test acc':>10}{'train MSE':>11}{'test MSE':>10}",
    ]
    for key, label in (("net", "trained net f(x)"), ("ntk", "NTK regression")):
        r = m[key]
        lines.append(
            f"{label:<22}{r['train']['accuracy']:>10.3f}{r['test']['accuracy']:>10.3f}"
            f"{r['train']['mse']:>11.4f}{r['test']['mse']:>10.4f}"
        )
    lines.append(f"test predictions that agree: {m['test_agreement']:.3f} (α from CG with {m['alpha_from']})")
    lines += ["", f"{'CG preconditioner':<22}{'iters':>7}{'matvecs':>9}{'residual':>11}{'conv':>6}{'seconds':>9}"]
    for name, r in s.items():
        label = name + (f" (rank {r['rank']})" if r.get("rank") else "")
        lines.append(
            f"{label:<22}{r['iterations']:>7}{r['matvecs']:>9}{r['residual_norm']:>11.2e}"
            f"{'yes' if r['converged'] else 'NO':>6}{r['seconds']:>9.2f}"
        )
    lines += ["", "wall time: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items())]
    files = result.get("files") or {}
    if files:
        lines.append("wrote: " + ", ".join(files.values()))
    return "\n".join(lines)


def _figure(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "the demo's figure needs matplotlib; install it with: pip install 'ntkscale[experiments]'"
        ) from err

    solves, m, t = result["solves"], result["metrics"], result["timings"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    ax = axes[0]
    if all(r.get("residual_history") for r in solves.values()):
        for i, (name, r) in enumerate(solves.items()):
            ax.semilogy(r["residual_history"], label=name, color=colors[i % len(colors)])
        ax.axhline(result["config"]["tol"], color="gray", ls=":", lw=1, label="tol")
        ax.set_xlabel("CG iteration")
        ax.set_ylabel("relative residual")
        ax.legend(frameon=False)
    else:
        names = list(solves)
        iters = [solves[n]["iterations"] for n in names]
        bars = ax.bar(names, iters, color=[colors[i % len(colors)] for i in range(len(names))])
        for b, n in zip(bars, names):
            r = solves[n]
            ax.annotate(
                f"{r['residual_norm']:.0e}" + ("" if r["converged"] else "\n(not conv.)"),
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center", va="bottom", fontsize=8,
            )
        ax.set_ylabel("CG iterations to tol")
        ax.set_xlabel("preconditioner")
    ax.set_title(f"CG on (K + σ²I) α = y − f(X), N·C = {result['operator']['shape'][0]}", fontsize=10)

    ax = axes[1]
    groups = ["train", "test"]
    width = 0.38
    for i, (key, label) in enumerate((("net", "trained net"), ("ntk", "NTK regression"))):
        vals = [m[key][g]["accuracy"] for g in groups]
        xs = [j + (i - 0.5) * width for j in range(len(groups))]
        bars = ax.bar(xs, vals, width, label=label, color=colors[(i + 3) % len(colors)])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    lo = min(m[k][g]["accuracy"] for k in ("net", "ntk") for g in groups)
    ax.set_ylim(max(0.0, math.floor((lo - 0.05) * 20) / 20), 1.08)
    ax.set_ylabel("accuracy (digits)")
    ax.set_title("net vs its NTK predictor")
    ax.legend(frameon=False, loc="upper center", ncol=2, fontsize=8)

    ax = axes[2]
    names = list(t)
    ax.barh(names, [t[n] for n in names], color=colors[5 % len(colors)])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("wall time per stage")

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
