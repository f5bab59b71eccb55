"""``continual``: does a wider network forget less? Forgetting against width, in two regimes.

NTK theory's promise for continual learning: the wider a network, the less its parameters and its
tangent kernel move while it learns a task (lazy training), so the less a new task overwrites
what earlier tasks needed. Earlier work saw wider networks forget less when each task got a small
fixed training budget; Wenger, Dangel and Kristiadi report that the reduction disappears once
each task is trained to high accuracy. This study measures both regimes on the same task
sequences and, per width, how far the network actually moved.

Tasks (:func:`task_sequence`) come from scikit-learn's 8×8 digits with one train/test split shared
by every task, and ten shared output classes (domain-incremental learning):

* ``"permuted"``: task 0 is the original images, task k ≥ 1 a fixed random permutation of the 64
  pixels, drawn from the seed;
* ``"rotated"``: task k is every image rotated by ``k · max_angle / (T − 1)`` degrees (bilinear
  interpolation, zero background), task 0 unrotated.

Each task's inputs are standardized per pixel by its own training split. Both families are
deterministic given the seed (and the split is the seed's).

For each configuration (family, width, regime, seed) an MLP of ``depth`` hidden layers of
``width`` units (:class:`ntkscale.models.MLP`, ReLU, ``parametrization``) is trained on the tasks
in order by mini-batch SGD on the cross-entropy (step ``lr = 5``, batches of 64: in NTK
parametrization one step size suits every width; about one epoch is 20 steps):

* ``high_accuracy``: epochs until the training accuracy on the current task reaches
  ``target_accuracy`` (capped at ``max_epochs``; ``reached_target`` says whether it did);
* ``early_stopped``: ``early_steps`` SGD steps per task, the small fixed budget of the work that
  reported that wider networks forget less.

Rows: ``{"family", "width", "regime", "seed", "accuracy", "average_forgetting",
"average_accuracy", "param_change", "ntk_change", ...}``. ``accuracy[i][j]`` is the test accuracy
on task ``j`` after training task ``i`` (a T × T matrix); :func:`average_forgetting` and
:func:`average_accuracy` are the summaries. The movement measures, over the whole sequence:

* ``param_change``: ``‖θ_T − θ_0‖ / ‖θ_0‖`` over all parameters (and ``param_distance``, the
  numerator);
* ``ntk_change``: ``‖Θ_T − Θ_0‖_F / ‖Θ_0‖_F``, the relative change of the empirical NTK on a fixed
  probe set (``probe_samples`` test inputs of task 0, all ten outputs), from the explicit
  probe-set kernel of :class:`ntkscale.NTKOperator` (exact) or its products with Rademacher
  vectors (Hutchinson), never a Jacobian (:func:`relative_ntk_change`);
* ``*_per_task``: the same after each task.

Run: ``ntkscale experiment continual --quick`` (3 tasks per family, widths 32 to 512, minutes on
two CPU cores). The full preset (10 tasks per family, widths 64 to 8192, 5 seeds) is sized for one
GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from linear_operator import to_dense
from torch import Tensor, nn

from .. import data as nks_data
from ..models import MLP, PARAMETRIZATIONS
from ..operator import NTKOperator
from .runner import Context, ExperimentError, Outcome, Study, new_figure, run_study, save_figure

__all__ = [
    "ContinualConfig",
    "FAMILIES",
    "FULL",
    "QUICK",
    "REGIMES",
    "STUDY",
    "Task",
    "average_accuracy",
    "average_forgetting",
    "probe_vectors",
    "relative_ntk_change",
    "run",
    "summarize",
    "task_sequence",
]

FAMILIES = ("permuted", "rotated")
REGIMES = ("high_accuracy", "early_stopped")
_DIGITS_SIZE = 1797


@dataclass(frozen=True)
class ContinualConfig:
    """The sweep's settings (everything that changes the numbers).

    Attributes:
        families: task families, any of ``"permuted"``, ``"rotated"``.
        num_tasks: tasks per sequence ``T`` (≥ 2).
        max_angle: rotation of the last rotated task, degrees.
        n_train: training images per task (the same images in every task).
        n_test: test images per task (disjoint from the training ones).
        widths: hidden widths.
        depth: hidden layers.
        parametrization: ``"ntk"`` or ``"standard"`` (:mod:`ntkscale.models`).
        W_std: weight standard deviation.
        b_std: bias standard deviation.
        regimes: any of ``"high_accuracy"``, ``"early_stopped"``.
        num_seeds: seeds per (family, width, regime); each draws its own split, tasks and
            initialization.
        lr: SGD step size.
        batch_size: SGD mini-batch size.
        target_accuracy: training accuracy that ends a task in ``high_accuracy``.
        max_epochs: cap on epochs per task in ``high_accuracy``.
        early_steps: SGD steps per task in ``early_stopped``.
        probe_samples: inputs of the NTK probe set (``probe_samples · 10`` kernel rows).
        ntk_probes: ``None`` for the exact Frobenius norms (the explicit probe-set kernel), or
            the number of Rademacher vectors of a Hutchinson estimate.
    """

    families: tuple[str, ...] = FAMILIES
    num_tasks: int = 10
    max_angle: float = 180.0
    n_train: int = 1297
    n_test: int = 500
    widths: tuple[int, ...] = (64, 256, 1024, 4096, 8192)
    depth: int = 2
    parametrization: str = "ntk"
    W_std: float = math.sqrt(2.0)
    b_std: float = 0.1
    regimes: tuple[str, ...] = REGIMES
    num_seeds: int = 5
    lr: float = 5.0
    batch_size: int = 64
    target_accuracy: float = 0.99
    max_epochs: int = 200
    early_steps: int = 20
    probe_samples: int = 100
    ntk_probes: int | None = None


FULL = ContinualConfig()
QUICK = ContinualConfig(num_tasks=3, widths=(32, 128, 512), num_seeds=3, max_epochs=60, probe_samples=16)


# -- the summaries ---------------------------------------------------------------------------------
def _accuracy_matrix(accuracy) -> np.ndarray:
    A = np.asarray(accuracy, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise ValueError(f"accuracy must be a square T x T matrix (row i: after training task i), got shape {A.shape}")
    if not np.all(np.isfinite(A)):
        raise ValueError("accuracy holds non-finite entries")
    return A


def average_forgetting(accuracy) -> float:
    """``mean over j < T−1 of (max_{j ≤ i < T−1} accuracy[i][j] − accuracy[T−1][j])``.

    The best accuracy task ``j`` had before the last task was trained, minus its final accuracy,
    averaged over every task but the last (which cannot have been forgotten yet).

    Args:
        accuracy: T × T, ``accuracy[i][j]`` the accuracy on task ``j`` after training task ``i``.

    Raises:
        ValueError: not a square matrix, non-finite entries, or ``T < 2`` (no task to forget).
    """
    A = _accuracy_matrix(accuracy)
    T = A.shape[0]
    if T < 2:
        raise ValueError("average forgetting needs at least 2 tasks, got 1")
    return float(np.mean([A[j : T - 1, j].max() - A[T - 1, j] for j in range(T - 1)]))


def average_accuracy(accuracy) -> float:
    """``mean_j accuracy[T−1][j]``: the final accuracy averaged over all tasks.

    Raises:
        ValueError: not a square matrix or non-finite entries.
    """
    A = _accuracy_matrix(accuracy)
    return float(A[-1].mean())


# -- the tasks -------------------------------------------------------------------------------------
@dataclass
class Task:
    """One task of a sequence.

    Attributes:
        name: e.g. ``"permuted 2"`` or ``"rotated 45°"``.
        X_train: standardized inputs.  # shape: (n_train, 64), float32
        y_train: class indices.  # shape: (n_train,), int64
        X_test: standardized inputs.  # shape: (n_test, 64), float32
        y_test: class indices.  # shape: (n_test,), int64
    """

    name: str
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor


def _rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate (n, 8, 8) images about their centre: bilinear, zero outside."""
    if degrees == 0 or images.shape[0] == 0:  # nothing to rotate (grid_sample needs a sample)
        return images.copy()
    x = torch.from_numpy(images).double().unsqueeze(1)
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=torch.float64)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1).numpy()


def task_sequence(family: str, num_tasks: int, seed: int = 0, n_train: int = 1297, n_test: int = 500,
                  max_angle: float = 180.0) -> list[Task]:
    """A sequence of ``num_tasks`` digit tasks of one family (see the module docstring).

    Args:
        family: ``"permuted"`` or ``"rotated"``.
        num_tasks: ``T ≥ 1``.
        seed: seeds the train/test split and the permutations.
        n_train, n_test: images per split (``n_train + n_test ≤ 1797``).
        max_angle: rotation of the last rotated task, degrees.

    Returns:
        ``T`` :class:`Task`; task 0 is the untransformed images in both families.

    Raises:
        ValueError: unknown family, ``num_tasks < 1``, or a split larger than the data.
        ImportError: scikit-learn is not installed.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not (isinstance(num_tasks, int) and num_tasks >= 1):
        raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
    raw = nks_data.digits(n_train, n_test, seed=seed, one_hot=False, standardized=False)  # intensities 0..16
    Xtr, Xte = raw.X_train.double().numpy(), raw.X_test.double().numpy()
    ytr, yte = raw.y_train.numpy(), raw.y_test.numpy()
    rng = np.random.default_rng([seed, FAMILIES.index(family), 7919])
    tasks = []
    for k in range(num_tasks):
        if family == "permuted":
            perm = np.arange(64) if k == 0 else rng.permutation(64)
            a, b, name = Xtr[:, perm], Xte[:, perm], f"permuted {k}"
        else:
            deg = 0.0 if num_tasks == 1 else k * float(max_angle) / (num_tasks - 1)
            a = _rotate(Xtr.reshape(-1, 8, 8), deg).reshape(-1, 64)
            b = _rotate(Xte.reshape(-1, 8, 8), deg).reshape(-1, 64)
            name = f"rotated {deg:g}°"
        a, b = nks_data.standardize(a, b)
        tasks.append(Task(name, torch.from_numpy(a).float(), torch.from_numpy(ytr.copy()),
                          torch.from_numpy(b).float(), torch.from_numpy(yte.copy())))
    return tasks


# -- the NTK's movement ----------------------------------------------------------------------------
def probe_vectors(n: int, num_probes: int | None = None, seed: int = 0, block: int = 256,
                  dtype: torch.dtype = torch.float64) -> list[Tensor] | None:
    """The probe vectors of :func:`relative_ntk_change`, as column blocks of at most ``block``:
    ``num_probes`` Rademacher vectors drawn from ``seed``; ``None`` for ``num_probes=None`` (the
    exact change, from the kernels themselves)."""
    if num_probes is None:
        return None
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1 or None (exact), got {num_probes}")
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2, (n, min(block, num_probes - start)), generator=gen).to(dtype) * 2 - 1
            for start in range(0, num_probes, block)]


def _images(K, blocks: list[Tensor] | None) -> list[Tensor]:
    """``K``'s products with the probe blocks, in float64 on the CPU; ``K`` itself for ``None``
    (its explicit matrix: one Gram pass, not a product per identity column)."""
    if blocks is None:
        return [to_dense(K).double().cpu()]
    return [(K @ Z.to(device=K.device, dtype=K.dtype)).double().cpu() for Z in blocks]


def _relative(A: list[Tensor], A0: list[Tensor]) -> float:
    diff2 = sum(float((a - a0).square().sum()) for a, a0 in zip(A, A0))
    base2 = sum(float(a0.square().sum()) for a0 in A0)
    if base2 == 0.0:
        raise ValueError("K0 is zero on the probes; its relative change is undefined")
    return math.sqrt(diff2 / base2)


def relative_ntk_change(K, K0, num_probes: int | None = None, seed: int = 0, block: int = 256) -> float:
    """``‖K − K0‖_F / ‖K0‖_F`` of two kernels of the same shape.

    Args:
        K, K0: square linear operators (e.g. :class:`ntkscale.NTKOperator` of one network on one
            probe set at two parameter settings) or tensors.
        num_probes: ``None``: exact, from the explicit kernels (for probe sets of a few hundred
            samples); else the Hutchinson estimate ``‖A‖_F² ≈ mean ‖A z‖²`` over ``num_probes``
            Rademacher vectors ``z`` (the same ones for both norms), from products only.
        seed: seed of the Rademacher vectors.
        block: Rademacher vectors per product.

    Raises:
        ValueError: shapes differ, ``num_probes < 1``, or ``K0`` vanishes on the probes.
    """
    if tuple(K.shape) != tuple(K0.shape) or K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K and K0 must be square operators of one shape, got {tuple(K.shape)} and {tuple(K0.shape)}")
    blocks = probe_vectors(K.shape[-1], num_probes, seed, block)
    return _relative(_images(K, blocks), _images(K0, blocks))


# -- one configuration -----------------------------------------------------------------------------
def configurations(config: dict) -> list[dict]:
    """Family × width × regime × seed, in that order."""
    for f in config["families"]:
        if f not in FAMILIES:
            raise ExperimentError(f"families: expected any of {FAMILIES}, got {f!r}")
    for r in config["regimes"]:
        if r not in REGIMES:
            raise ExperimentError(f"regimes: expected any of {REGIMES}, got {r!r}")
    if config["parametrization"] not in PARAMETRIZATIONS:
        raise ExperimentError(f"parametrization: expected one of {PARAMETRIZATIONS}, got {config['parametrization']!r}")
    if config["num_tasks"] < 2:
        raise ExperimentError(f"num_tasks must be >= 2 (forgetting needs a later task), got {config['num_tasks']}")
    if config["n_train"] + config["n_test"] > _DIGITS_SIZE:
        raise ExperimentError(f"n_train + n_test must be <= {_DIGITS_SIZE} (digits), got "
                              f"{config['n_train']} + {config['n_test']}")
    if config["probe_samples"] > config["n_test"]:
        raise ExperimentError(f"probe_samples ({config['probe_samples']}) must be <= n_test ({config['n_test']})")
    return [{"family": f, "width": w, "regime": r, "seed": s} for f in config["families"] for w in config["widths"]
            for r in config["regimes"] for s in range(config["num_seeds"])]


@torch.no_grad()
def _accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    return float((model(X).argmax(1) == y).double().mean())


def _epoch_batches(n: int, batch_size: int, gen: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=gen).split(batch_size))


def _check_finite(model: nn.Module, config: dict) -> None:
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise ExperimentError(f"SGD diverged (lr={config['lr']}, width {model.widths[0]}): parameters are not "
                              f"finite; lower lr")


def _train_task(model: nn.Module, task: Task, config: dict, regime: str, gen: torch.Generator, device,
                bar) -> tuple[int, float, bool]:
    """Train on one task; ``(sgd steps, training accuracy, target reached)``."""
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    X, y = task.X_train.to(device), task.y_train.to(device)
    steps = 0

    def step(idx: Tensor) -> None:
        nonlocal steps
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        steps += 1
        bar.update(1)

    if regime == "early_stopped":
        batches: list[Tensor] = []
        while steps < config["early_steps"]:
            if not batches:
                batches = _epoch_batches(len(y), config["batch_size"], gen)
            step(batches.pop(0).to(device))
        _check_finite(model, config)
        acc = _accuracy(model, X, y)
        return steps, acc, acc >= config["target_accuracy"]
    acc = _accuracy(model, X, y)
    epochs = 0
    while acc < config["target_accuracy"] and epochs < config["max_epochs"]:
        for idx in _epoch_batches(len(y), config["batch_size"], gen):
            step(idx.to(device))
        epochs += 1
        acc = _accuracy(model, X, y)
        _check_finite(model, config)
    return steps, acc, acc >= config["target_accuracy"]


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def _ntk(model: nn.Module, X: Tensor) -> NTKOperator:
    return NTKOperator(model, X, dtype=torch.float64)


def run_configuration(config: dict, configuration: dict, ctx: Context) -> Outcome:
    """Train one network on one task sequence; accuracies, summaries and movement."""
    family, width, regime, rep = (configuration[k] for k in ("family", "width", "regime", "seed"))
    T = config["num_tasks"]
    task_seed = config["seed"] * 1000 + rep  # the same tasks for every width and regime
    tasks = task_sequence(family, T, seed=task_seed, n_train=config["n_train"], n_test=config["n_test"],
                          max_angle=config["max_angle"])
    dev = ctx.device
    model = MLP(64, [width] * config["depth"], 10, activation="relu", W_std=config["W_std"], b_std=config["b_std"],
                parametrization=config["parametrization"]).to(dev)
    probe = tasks[0].X_test[: config["probe_samples"]].to(dev)
    theta0 = _flat(model)
    blocks = probe_vectors(probe.shape[0] * 10, config["ntk_probes"], seed=ctx.configuration_seed)
    A0 = _images(_ntk(model, probe), blocks)  # Θ_0 (or its products), reused after every task
    gen = ctx.generator(salt=1)

    accuracy, steps, train_acc, reached, param_pt, ntk_pt = [], [], [], [], [], []
    budget = T * config["early_steps"] if regime == "early_stopped" else None  # high_accuracy: not known
    bar = ctx.progress(total=budget, desc=f"{family} width {width} {regime} (SGD steps)")
    for task in tasks:
        model.train()
        s, a, ok = _train_task(model, task, config, regime, gen, dev, bar)
        model.eval()
        steps.append(s)
        train_acc.append(a)
        reached.append(bool(ok))
        accuracy.append([_accuracy(model, t.X_test.to(dev), t.y_test.to(dev)) for t in tasks])
        param_pt.append(float((_flat(model) - theta0).norm() / theta0.norm()))
        ntk_pt.append(_relative(_images(_ntk(model, probe), blocks), A0))
    bar.close()
    theta = _flat(model)
    row = {
        "family": family,
        "width": width,
        "regime": regime,
        "seed": rep,
        "accuracy": accuracy,
        "average_forgetting": average_forgetting(accuracy),
        "average_accuracy": average_accuracy(accuracy),
        "param_distance": float((theta - theta0).norm()),
        "param_change": param_pt[-1],
        "ntk_change": ntk_pt[-1],
        "param_change_per_task": param_pt,
        "ntk_change_per_task": ntk_pt,
        "steps": steps,
        "train_accuracy": train_acc,
        "reached_target": reached,
        "min_train_accuracy": min(train_acc),
        "num_parameters": int(theta.numel()),
        "tasks": [t.name for t in tasks],
    }
    return Outcome(rows=[row])


# -- figures ---------------------------------------------------------------------------------------
def summarize(rows: Sequence[dict], key: str) -> dict:
    """``{(family, regime): (widths, means, standard errors)}`` of ``key`` over seeds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["family"], r["regime"]), {}).setdefault(r["width"], []).append(r[key])
    out = {}
    for g, by_width in groups.items():
        ws = sorted(by_width)
        vals = [np.asarray(by_width[w], dtype=np.float64) for w in ws]
        means = [float(v.mean()) for v in vals]
        ses = [float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0 for v in vals]
        out[g] = (ws, means, ses)
    return out


_COLORS = {"high_accuracy": "C3", "early_stopped": "C0"}
_STYLES = {"permuted": "-", "rotated": "--"}


def _panel(ax, rows, key, ylabel, log_y=False):
    for (family, regime), (ws, m, se) in sorted(summarize(rows, key).items()):
        ax.errorbar(ws, m, yerr=se, color=_COLORS[regime], ls=_STYLES[family], marker="o", ms=3, capsize=2,
                    label=f"{regime}, {family}")
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_title(ylabel, fontsize=9)


def figures(results: dict, out: Path) -> list[Path]:
    """``continual_forgetting.png`` (average forgetting and final average accuracy against width,
    per regime and family) and ``continual_movement.png`` (relative NTK and parameter change
    over the sequence against width)."""
    rows, config = results["rows"], results["config"]
    if not rows:
        return []
    seeds = config["num_seeds"]
    paths = []
    fig, axes, _ = new_figure(1, 2, figsize=(8.4, 3.1), squeeze=False)
    _panel(axes[0][0], rows, "average_forgetting", "average forgetting (test accuracy)")
    _panel(axes[0][1], rows, "average_accuracy", "final average test accuracy")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{config['num_tasks']} digit tasks, depth-{config['depth']} MLP ({config['parametrization']} "
                 f"param.), mean ± s.e. over {seeds} seeds", fontsize=9, y=1.03)
    paths.append(save_figure(fig, out / "continual_forgetting.png"))

    fig, axes, _ = new_figure(1, 2, figsize=(8.4, 3.1), squeeze=False)
    _panel(axes[0][0], rows, "ntk_change", "‖Θ_T − Θ_0‖_F / ‖Θ_0‖_F (probe set)", log_y=True)
    _panel(axes[0][1], rows, "param_change", "‖θ_T − θ_0‖ / ‖θ_0‖", log_y=True)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"how far the network moved over the {config['num_tasks']} tasks (mean ± s.e. over {seeds} seeds)",
                 fontsize=9, y=1.03)
    paths.append(save_figure(fig, out / "continual_movement.png"))
    return paths


STUDY = Study(
    name="continual",
    presets={"quick": QUICK, "full": FULL},
    configurations=configurations,
    run_configuration=run_configuration,
    figures=figures,
    columns=("family", "width", "regime", "seed", "average_forgetting", "average_accuracy", "min_train_accuracy",
             "param_change", "ntk_change"),
    dtype="float32 networks, float64 NTK products",
    full_note=(
        "the full preset (10 tasks per family, widths up to 8192, 5 seeds, 100 configurations) is sized for "
        "one GPU; on a CPU it takes many hours (use --quick)"
    ),
    description="forgetting on permuted and rotated digit sequences against width, trained to high accuracy or stopped early",
)


def run(**kwargs):
    """``ntkscale experiment continual``: :func:`ntkscale.experiments.runner.run_study` of
    :data:`STUDY` (keywords as there)."""
    return run_study(STUDY, **kwargs)
