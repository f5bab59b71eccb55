"""``conditioning``: the NTK Gram's spectrum, Jacobian stability, and NGD against GD and Adam.

The paper's optimization section, measured. NTK theory promises that, as width grows at fixed
depth, (a) the NTK Gram ``JJᵀ`` on the training data stays well conditioned, (b) the Jacobian
barely changes while training (the stability constant ``C′`` of
``‖J(θ) − J(θ₀)‖₂ ≤ C′ ‖θ − θ₀‖`` falls like ``1/√width`` in NTK parametrization), so that
(c) function-space natural gradient descent converges in a few steps, far faster than first-order
methods. This study measures all three on real data for MLPs and CNNs across widths, depths and
the NTK and standard parametrizations.

For each configuration (architecture, parametrization, depth, width), on ``num_samples``
training samples with ``C`` one-hot targets (``n = N·C`` rows of ``J``):

* ``lambda_min``, ``lambda_max``: the extreme eigenvalues of ``JJᵀ`` at initialization by
  Lanczos in float64 on the matrix-free :class:`ntkscale.NTKOperator`
  (:func:`ntkscale.eigvalsh_extremes`; by default ``n`` iterations, i.e. the whole Krylov space,
  so the values are exact to round-off; a capped run in the full preset reports its Ritz error
  bounds). A ``λ_min`` below ``n · eps · λ_max`` is reported as 0: the Gram is singular to working
  precision, which it must be when ``N·C > P`` (``rank_deficient``) — a finding, not an error.
* ``condition_number``: ``λ_max / λ_min``, ``None`` when ``λ_min = 0``.
* ``stability_constant``: ``C′ ≈ max ‖J(θ) − J(θ₀)‖₂ / ‖θ − θ₀‖`` over the end points of the
  three optimizers' trajectories and ``num_perturbations`` random directions at the largest
  distance they travelled (:func:`ntkscale.jacobian_difference_norm`, Lanczos on the matrix-free
  ``ΔJ ΔJᵀ``, float64).
* ``loss_curves``: ``mean((f(X) − Y)²)`` over the ``N·C`` entries after each of ``steps`` steps of
  function-space NGD (:func:`ntkscale.ngd_step`, ``lr = ngd_lr``, Jacobi-preconditioned CG, damping
  ``ngd_damping · λ_max``), gradient descent on ``(1/2n)‖f − Y‖²`` with the largest step the
  initial spectrum makes safe (``η = n / λ_max``), and Adam (``adam_lr``), all from the same
  initialization; ``final_loss`` their last values.

Run: ``ntkscale experiment conditioning --quick`` (scikit-learn's digits, a few minutes on two
CPU cores). The full preset is sized for one GPU: with ``--data-dir`` holding MNIST (torchvision's
``MNIST/raw`` idx files) it takes 50,000 training images (``n = 500,000`` rows, ten times what a
dense float64 eigensolver of ``JJᵀ`` could take on one GPU); without, it falls back to all of
digits and says so.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import data as nks_data
from ..functional import chunks
from ..jacobian import jacobian_difference_norm
from ..models import CNN, MLP
from ..ngd import ngd_step
from ..operator import NTKOperator
from ..solvers import ConvergenceWarning, eigvalsh_extremes
from ..solvers.lanczos import singular_to_roundoff
from .runner import Context, ExperimentError, Outcome, Study, new_figure, run_study, save_figure

__all__ = ["ConditioningConfig", "QUICK", "FULL", "STUDY", "run", "Spectrum", "spectrum", "build_model", "train_curves"]

OPTIMIZERS = ("ngd", "gd", "adam")


@dataclass(frozen=True)
class ConditioningConfig:
    """The sweep's settings (everything that changes the numbers).

    Attributes:
        dataset: ``"digits"``, or ``"mnist"`` / ``"cifar10"`` read from ``--data-dir``.
        num_samples: training samples ``N``.
        architectures: any of ``"mlp"``, ``"cnn"``.
        mlp_widths: hidden widths of the MLPs.
        cnn_widths: channels of the CNNs' convolutions.
        depths: hidden layers (MLP) or convolutions (CNN).
        parametrizations: any of ``"ntk"``, ``"standard"``.
        W_std: weight standard deviation.
        b_std: bias standard deviation.
        steps: optimizer steps of each training curve.
        adam_lr: Adam's step size.
        ngd_lr: NGD's step size.
        ngd_damping: NGD's damping relative to ``λ_max``.
        lanczos_iter: cap on Lanczos iterations for the spectrum (``None``: ``n``, exact).
        num_perturbations: random directions for ``C′``.
        jacobian_iter: Lanczos iterations for each ``‖ΔJ‖₂``.
    """

    dataset: str = "mnist"
    num_samples: int = 50_000
    architectures: tuple[str, ...] = ("mlp", "cnn")
    mlp_widths: tuple[int, ...] = (64, 512, 4096)
    cnn_widths: tuple[int, ...] = (8, 64, 512)
    depths: tuple[int, ...] = (1, 2, 3)
    parametrizations: tuple[str, ...] = ("ntk", "standard")
    W_std: float = math.sqrt(2.0)
    b_std: float = 0.1
    steps: int = 100
    adam_lr: float = 1e-3
    ngd_lr: float = 1.0
    ngd_damping: float = 1e-3
    lanczos_iter: int | None = 1000
    num_perturbations: int = 4
    jacobian_iter: int = 50


FULL = ConditioningConfig()
QUICK = ConditioningConfig(
    dataset="digits",
    num_samples=20,
    mlp_widths=(4, 40, 400),
    cnn_widths=(1, 10, 100),
    steps=10,
    lanczos_iter=None,
    num_perturbations=1,
    jacobian_iter=15,
)


# -- data and models -------------------------------------------------------------------------------
def load_data(config: dict, data_dir: Path | None = None) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """``(X, Y, image_shape)``: ``N`` standardized inputs (flat), one-hot targets, and the
    ``(channels, height, width)`` the CNN reshapes them to."""
    name, N = config["dataset"], config["num_samples"]
    if name == "digits":
        ds = nks_data.digits(n_train=N, n_test=0, seed=config["seed"])
        return ds.X_train, ds.y_train, (1, 8, 8)
    if name in ("mnist", "cifar10"):
        if data_dir is None:
            raise ExperimentError(f"dataset {name!r} is read from --data-dir (nothing is downloaded)")
        loader = nks_data.mnist if name == "mnist" else nks_data.cifar10
        ds = loader(data_dir, n_train=N, n_test=0, seed=config["seed"])
        shape = (1, 28, 28) if name == "mnist" else (3, 32, 32)
        return ds.X_train.reshape(N, -1), ds.y_train, shape
    raise ExperimentError(f"dataset must be 'digits', 'mnist' or 'cifar10', got {name!r}")


def prepare(config: dict, ctx: Context) -> dict:
    """Fall back to digits when the full preset's data set is not on disk (and say so)."""
    if config["dataset"] != "digits":
        found = ctx.data_dir is not None and nks_data.find_on_disk(config["dataset"], ctx.data_dir)
        if not found:
            print(
                f"conditioning: {config['dataset']} not found under --data-dir "
                f"({ctx.data_dir}); using all 1797 samples of scikit-learn's digits instead"
            )
            config = {**config, "dataset": "digits", "num_samples": min(config["num_samples"], 1797)}
    return config


def build_model(config: dict, architecture: str, width: int, depth: int, parametrization: str,
                image_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """The configuration's network (drawn from the global torch seed), taking flat inputs."""
    kw = dict(activation="relu", W_std=config["W_std"], b_std=config["b_std"], parametrization=parametrization)
    if architecture == "mlp":
        return MLP(int(np.prod(image_shape)), [width] * depth, num_outputs, **kw)
    if architecture == "cnn":
        return nn.Sequential(nn.Unflatten(1, image_shape), CNN(image_shape[0], [width] * depth, num_outputs, **kw))
    raise ExperimentError(f"architecture must be 'mlp' or 'cnn', got {architecture!r}")


# -- the measurements ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spectrum:
    """Extreme eigenvalues of the NTK Gram ``JJᵀ`` (see :func:`spectrum`).

    Attributes:
        lambda_min: the smallest eigenvalue; 0 when ``singular``.
        lambda_max: the largest eigenvalue.
        condition_number: ``lambda_max / lambda_min``; ``None`` when ``singular``.
        singular: whether the smallest Ritz value is ``≤ n · eps · λ_max`` (singular to
            working precision).
        lambda_min_ritz: the smallest Ritz value itself (also when ``singular``).
        lambda_min_bound: Lanczos error bound of ``lambda_min_ritz``.
        lambda_max_bound: Lanczos error bound of ``lambda_max``.
        iterations: Lanczos iterations run.
        converged: whether both ends converged (or the whole Krylov space was spanned).
        n: the Gram's size ``N·C``.
        warnings: messages of the convergence warnings Lanczos raised.
    """

    lambda_min: float
    lambda_max: float
    condition_number: float | None
    singular: bool
    lambda_min_ritz: float
    lambda_min_bound: float
    lambda_max_bound: float
    iterations: int
    converged: bool
    n: int
    warnings: list[str] = field(default_factory=list)


def spectrum(model: nn.Module, X: Tensor, num_iter: int | None = None, seed: int = 0) -> Spectrum:
    """Extreme eigenvalues of ``JJᵀ`` (the NTK Gram on ``X``) by Lanczos in float64.

    Args:
        model: the network.
        X: inputs.  # shape: (N, *in_shape)
        num_iter: Lanczos iterations (default ``n = N·C``: the whole Krylov space).
        seed: seed of the start vector.

    Returns:
        A :class:`Spectrum`; its ``lambda_min`` is 0 and ``condition_number`` ``None`` when the
        smallest Ritz value is ``≤ n · eps · λ_max``.
    """
    K = NTKOperator(model, X, dtype=torch.float64)
    n = K.shape[-1]
    iters = n if num_iter is None else min(num_iter, n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        res = eigvalsh_extremes(K, k=1, num_iter=iters, tol=1e-10, seed=seed)
    lmax, lmin = res.largest[0].item(), res.smallest[0].item()
    singular = singular_to_roundoff(lmin, lmax, n, torch.float64)
    return Spectrum(
        lambda_min=0.0 if singular else lmin,
        lambda_max=lmax,
        condition_number=None if singular else lmax / lmin,
        singular=bool(singular),
        lambda_min_ritz=lmin,
        lambda_min_bound=res.smallest_error_bounds[0].item(),
        lambda_max_bound=res.largest_error_bounds[0].item(),
        iterations=res.iterations,
        converged=bool(res.converged or res.iterations >= n),
        n=n,
        warnings=[str(w.message) for w in caught],
    )


def _mse(model: nn.Module, X: Tensor, Y: Tensor, chunk: int) -> float:
    """Mean squared error over all of ``X``, ``chunk`` samples per forward pass."""
    with torch.no_grad():
        return sum(float((model(X[sl]) - Y[sl]).square().sum()) for sl in chunks(X.shape[0], chunk)) / Y.numel()


def _full_batch_step(net: nn.Module, opt: torch.optim.Optimizer, X: Tensor, Y: Tensor, chunk: int) -> None:
    """One step on the full-batch loss ``½ mean (f(X) − Y)²``, its gradient accumulated over
    chunks of ``chunk`` samples (memory of one chunk's activations, not of all of ``X``)."""
    opt.zero_grad(set_to_none=True)
    for sl in chunks(X.shape[0], chunk):
        (0.5 * (net(X[sl]) - Y[sl]).square().sum() / Y.numel()).backward()
    opt.step()


def train_curves(model: nn.Module, X: Tensor, Y: Tensor, config: dict, lambda_max: float, ctx: Context,
                 chunk_size: int | None = None) -> dict:
    """Losses of NGD, GD and Adam for ``config["steps"]`` steps from ``model``'s weights.

    GD's and Adam's full-batch losses and gradients are accumulated over ``chunk_size`` samples at
    a time (default: the NTK operator's chunk within its memory budget).

    Returns:
        ``{"curves": {opt: [loss_0, ..., loss_steps]}, "params": {opt: final parameters},
        "ngd_cg_iterations": [...], "gd_lr": η}``; a diverged curve ends at the first non-finite
        loss (recorded as ``None``).
    """
    steps, n = config["steps"], Y.numel()
    curves, params, cg_iters, cg_warnings = {}, {}, [], 0
    gd_lr = n / lambda_max
    chunk = chunk_size or NTKOperator(model, X).chunk_size  # samples per pass within the memory budget
    for name in OPTIMIZERS:
        net = copy.deepcopy(model)
        curve = [_mse(net, X, Y, chunk)]
        opt = None
        if name == "gd":
            opt = torch.optim.SGD(net.parameters(), lr=gd_lr)
        elif name == "adam":
            opt = torch.optim.Adam(net.parameters(), lr=config["adam_lr"])
        for _ in ctx.progress(range(steps), desc=name):
            if name == "ngd":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    info = ngd_step(net, X, Y, lr=config["ngd_lr"], damping=config["ngd_damping"] * lambda_max,
                                    tol=1e-5, max_iter=1000, preconditioner="jacobi")
                cg_warnings += len(caught)
                cg_iters.append(info.iterations)
                loss = info.loss_after
            else:
                _full_batch_step(net, opt, X, Y, chunk)
                loss = _mse(net, X, Y, chunk)
            if not math.isfinite(loss):
                curve.append(None)
                break
            curve.append(loss)
        curves[name] = curve
        params[name] = {k: p.detach().clone() for k, p in net.named_parameters()}
    return {"curves": curves, "params": params, "ngd_cg_iterations": cg_iters, "ngd_cg_warnings": cg_warnings,
            "gd_lr": gd_lr}


def _norm_ratio(net, X, params, theta0, config, notes: list) -> tuple[float, float]:
    """``(‖ΔJ‖₂ / ‖θ − θ₀‖, ‖θ − θ₀‖)``; an unconverged Lanczos run (a lower bound) is noted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        r = jacobian_difference_norm(net, X, params, theta0, num_iter=config["jacobian_iter"], tol=1e-2)
    notes += [str(w.message) for w in caught]
    return r.ratio, r.param_distance


def stability_constant(model: nn.Module, X: Tensor, endpoints: dict, config: dict, ctx: Context) -> dict:
    """``C′ ≈ max ‖J(θ) − J(θ₀)‖₂ / ‖θ − θ₀‖`` over trajectory end points and random directions.

    Everything in float64 (the difference of two Jacobians cancels most digits in float32).

    Returns:
        ``{"value": C′, "trajectory": {opt: ratio}, "random": [ratios], "radius": r,
        "unconverged": count}`` — the count of ``‖ΔJ‖₂`` whose Lanczos run stopped at
        ``jacobian_iter`` above its tolerance (their Ritz values are lower bounds).
    """
    net = copy.deepcopy(model).double()
    X = X.double()
    theta0 = {k: p.detach() for k, p in net.named_parameters()}
    trajectory, dists, notes = {}, [], []
    for name, params in endpoints.items():
        params = {k: v.double() for k, v in params.items()}
        if not all(torch.isfinite(v).all() for v in params.values()):
            continue
        ratio, dist = _norm_ratio(net, X, params, theta0, config, notes)
        if dist > 0:
            trajectory[name] = ratio
            dists.append(dist)
    radius = max(dists) if dists else 1e-3 * math.sqrt(sum(p.square().sum().item() for p in theta0.values()))
    gen = ctx.generator(salt=1)
    random = []
    for _ in ctx.progress(range(config["num_perturbations"]), desc="C′, random directions"):
        u = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device) for k, p in theta0.items()}
        scale = radius / math.sqrt(sum(v.square().sum().item() for v in u.values()))
        params = {k: theta0[k] + scale * u[k] for k in theta0}
        random.append(_norm_ratio(net, X, params, theta0, config, notes)[0])
    values = list(trajectory.values()) + random
    return {"value": max(values) if values else None, "trajectory": trajectory, "random": random, "radius": radius,
            "unconverged": len(notes)}


# -- the study -------------------------------------------------------------------------------------
def configurations(config: dict) -> list[dict]:
    runs = []
    for arch in config["architectures"]:
        widths = config["mlp_widths"] if arch == "mlp" else config["cnn_widths"]
        for p in config["parametrizations"]:
            for depth in config["depths"]:
                for width in widths:
                    runs.append({"architecture": arch, "parametrization": p, "depth": depth, "width": width})
    return runs


def run_configuration(config: dict, configuration: dict, ctx: Context) -> Outcome:
    X, Y, shape = load_data(config, ctx.data_dir)
    X, Y = X.to(ctx.device), Y.to(ctx.device)
    arch, width, depth, p = (configuration[k] for k in ("architecture", "width", "depth", "parametrization"))
    model = build_model(config, arch, width, depth, p, shape, Y.shape[1]).to(ctx.device)
    P = sum(q.numel() for q in model.parameters())
    spec = spectrum(model, X, num_iter=config["lanczos_iter"], seed=ctx.configuration_seed)
    train = train_curves(model, X, Y, config, spec.lambda_max, ctx)
    stab = stability_constant(model, X, train["params"], config, ctx)
    curves = train["curves"]
    row = {
        "architecture": arch,
        "width": width,
        "depth": depth,
        "parametrization": p,
        "num_samples": X.shape[0],
        "num_parameters": P,
        "rank_deficient": X.shape[0] * Y.shape[1] > P,
        "lambda_min": spec.lambda_min,
        "lambda_max": spec.lambda_max,
        "condition_number": spec.condition_number,
        "stability_constant": stab["value"],
        "final_loss": {k: (c[-1] if len(c) == config["steps"] + 1 else None) for k, c in curves.items()},
        "loss_curves": curves,
    }
    extras = {
        "spectrum": {k: v for k, v in asdict(spec).items() if k not in ("lambda_min", "lambda_max", "condition_number")},
        "stability": stab,
        "gd_lr": train["gd_lr"],
        "ngd_cg_iterations": train["ngd_cg_iterations"],
        "ngd_cg_warnings": train["ngd_cg_warnings"],
    }
    return Outcome(rows=[row], extras=extras)


def _series(rows, arch, p, depth, key):
    sel = sorted((r for r in rows if r["architecture"] == arch and r["parametrization"] == p and r["depth"] == depth),
                 key=lambda r: r["width"])
    return [r["width"] for r in sel], [r[key] for r in sel]


def _log_axes(ax, x: bool = True, widths=None) -> None:
    """Log scales where the drawn data allow them (a panel of only singular points stays linear)."""
    if x and ax.has_data():
        ax.set_xscale("log", base=2)
        if widths:
            ax.set_xlim(min(widths) / 1.5, max(widths) * 1.5)
    ys = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), dtype=float).ravel()]
    if ys and min(ys) > 0:
        ax.set_yscale("log")


def figures(results: dict, out: Path) -> list[Path]:
    """``conditioning_spectrum.png`` (λ_min and κ against width per depth),
    ``conditioning_stability.png`` (C′ against width) and ``conditioning_training.png`` (loss
    curves at the narrowest and widest width)."""
    rows, config = results["rows"], results["config"]
    if not rows:
        return []
    archs = [a for a in config["architectures"] if any(r["architecture"] == a for r in rows)]
    depths = sorted({r["depth"] for r in rows})
    styles = {"ntk": "-", "standard": "--"}
    paths = []

    fig, axes, _ = new_figure(2, len(archs), figsize=(4.2 * len(archs), 6.0), squeeze=False, layout="constrained")
    for j, arch in enumerate(archs):
        for i, (key, label) in enumerate((("lambda_min", "λ_min(JJᵀ)"), ("condition_number", "condition number"))):
            ax = axes[i][j]
            for d_i, depth in enumerate(depths):
                for p, ls in styles.items():
                    w, v = _series(rows, arch, p, depth, key)
                    if not w:
                        continue
                    pts = [(a, b) for a, b in zip(w, v) if b is not None and b > 0]
                    if pts:
                        ax.plot(*zip(*pts), ls=ls, marker="o", ms=3, color=f"C{d_i}", label=f"depth {depth}, {p}")
                    zeros = [a for a, b in zip(w, v) if b is None or b == 0]
                    if zeros:  # singular Gram: drawn on the axis' bottom edge
                        ax.scatter(zeros, [0.02] * len(zeros), marker="x", color=f"C{d_i}", transform=ax.get_xaxis_transform(),
                                   clip_on=False)
            _log_axes(ax, widths=[r["width"] for r in rows if r["architecture"] == arch])
            ax.set_xlabel("width" if arch == "mlp" else "channels")
            ax.set_title(f"{arch.upper()}: {label}", fontsize=9)
        axes[0][j].text(0.02, 0.04, "× on the axis: singular (λ_min = 0)", transform=axes[0][j].transAxes, fontsize=6)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"NTK Gram spectrum at initialization, {config['dataset']}, N = {rows[0]['num_samples']}", fontsize=9)
    paths.append(save_figure(fig, out / "conditioning_spectrum.png"))

    fig, axes, _ = new_figure(1, len(archs), figsize=(4.2 * len(archs), 3.2), squeeze=False, layout="constrained")
    for j, arch in enumerate(archs):
        ax = axes[0][j]
        for d_i, depth in enumerate(depths):
            for p, ls in styles.items():
                w, v = _series(rows, arch, p, depth, "stability_constant")
                pts = [(a, b) for a, b in zip(w, v) if b is not None and b > 0]
                if pts:
                    ax.plot(*zip(*pts), ls=ls, marker="o", ms=3, color=f"C{d_i}", label=f"depth {depth}, {p}")
        ntk = [r for r in rows if r["architecture"] == arch and r["parametrization"] == "ntk" and r["stability_constant"]]
        if ntk:
            w0 = min(r["width"] for r in ntk)
            c0 = max(r["stability_constant"] for r in ntk if r["width"] == w0)
            ws = sorted({r["width"] for r in ntk})
            ax.plot(ws, [c0 * math.sqrt(w0 / w) for w in ws], color="0.5", ls=":", label="∝ 1/√width")
        _log_axes(ax, widths=[r["width"] for r in rows if r["architecture"] == arch])
        ax.set_xlabel("width" if arch == "mlp" else "channels")
        ax.set_title(f"{arch.upper()}: C′ ≈ max ‖J(θ) − J(θ₀)‖₂ / ‖θ − θ₀‖", fontsize=9)
    axes[0][0].legend(fontsize=6)
    paths.append(save_figure(fig, out / "conditioning_stability.png"))

    depth = depths[len(depths) // 2]
    fig, axes, _ = new_figure(len(archs), 2, figsize=(8.0, 2.8 * len(archs)), squeeze=False, layout="constrained")
    colors = {"ngd": "C3", "gd": "C0", "adam": "C2"}
    for i, arch in enumerate(archs):
        sel = [r for r in rows if r["architecture"] == arch and r["depth"] == depth]
        if not sel:
            continue
        ws = sorted({r["width"] for r in sel})
        for j, width in enumerate((ws[0], ws[-1])):
            ax = axes[i][j]
            for r in sel:
                if r["width"] != width:
                    continue
                for opt, curve in r["loss_curves"].items():
                    pts = [(k, v) for k, v in enumerate(curve) if v is not None]
                    ax.plot(*zip(*pts), color=colors[opt], ls=styles[r["parametrization"]],
                            label=f"{opt}, {r['parametrization']}")
            _log_axes(ax, x=False)
            ax.set_xlabel("step")
            ax.set_title(f"{arch.upper()}, depth {depth}, width {width}", fontsize=9)
        axes[i][0].set_ylabel("training MSE")
    axes[0][0].legend(fontsize=6)
    paths.append(save_figure(fig, out / "conditioning_training.png"))
    return paths


STUDY = Study(
    name="conditioning",
    presets={"quick": QUICK, "full": FULL},
    configurations=configurations,
    run_configuration=run_configuration,
    figures=figures,
    prepare=prepare,
    columns=("architecture", "parametrization", "depth", "width", "num_parameters", "lambda_min", "lambda_max",
             "condition_number", "stability_constant", "final_loss.ngd", "final_loss.gd", "final_loss.adam"),
    dtype="float32 networks, float64 spectra and Jacobian differences",
    full_note=(
        "the full preset (MNIST, 50,000 samples, widths up to 4096) is sized for one large GPU; on a CPU it "
        "takes days (use --quick)"
    ),
    description="NTK Gram conditioning, Jacobian stability and NGD/GD/Adam training against width and depth",
)


def run(**kwargs):
    """``ntkscale experiment conditioning``: :func:`ntkscale.experiments.runner.run_study` of
    :data:`STUDY` (keywords as there)."""
    return run_study(STUDY, **kwargs)
