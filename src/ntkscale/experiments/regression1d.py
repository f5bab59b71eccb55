"""``regression1d``: finite-width NTK-GP predictives against their infinite-width limit.

The paper's opening figure, measured. On a 1-D regression set with a gap in the inputs
(:func:`ntkscale.data.regression1d`), NTK-parametrized ReLU MLPs
``MLP(1, [w] * depth, 1, W_std, b_std, parametrization="ntk")`` of several widths ``w`` are
trained by full-batch gradient descent, and each one's linearized-Laplace / NTK-GP predictive
(mean and standard deviation on a grid, :class:`ntkscale.NTKGP`: operator, solvers, exact
variances) is compared with the infinite-width object it converges to.

**What converges to what.** A network ``f(x; θ)`` in NTK parametrization starts as a random
function ``f₀ = f(·; θ₀)``, which as ``w → ∞`` becomes a draw from the NNGP, not zero. So the
limit of a trained network is itself random unless ``f₀`` is taken out. The study therefore
uses the *centered* network ``f̃(x; θ) = f(x; θ) − f(x; θ₀)`` (its Jacobian, hence its NTK, is
that of ``f``), implemented without changing the model: ``f`` is trained on the targets
``y + f₀(X)``, and ``f₀`` is subtracted from every prediction. With the loss
``L = (1/2N) Σᵢ (f̃(xᵢ) − yᵢ)²``, ``T`` gradient-descent steps of size ``η`` and the
NTK-GP hyperparameters ``σ²`` (noise) and ``s²`` (prior scale), ``λ = σ²/s²``:

* finite width ``w``: ``θ_T`` after ``T`` steps; ``Θ = J(θ_T) J(θ_T)ᵀ`` the empirical NTK at the
  trained weights; the NTK-GP (linearized Laplace with prior ``θ ~ N(θ_T, s² I)``)
  ``mean(x) = f̃_T(x) + Θ(x, X)(Θ + λ I)⁻¹ (y − f̃_T(X))``,
  ``var(x) = s² [Θ(x, x) − Θ(x, X)(Θ + λ I)⁻¹ Θ(X, x)]``;
* infinite width: the same formulas with ``Θ_∞ = kernels.infinite_ntk(·, ·, depth, "relu",
  W_std, b_std)`` in place of ``Θ`` and the kernel gradient-descent function
  ``f̃_T^∞(x) = Θ_∞(x, X) Σ_{k<T} (η/N)(I − (η/N) Θ_∞)ᵏ y`` in place of the trained network
  (the linearized dynamics from ``f̃₀ = 0``; in the limit training stays lazy, the NTK stays at
  ``Θ_∞``, and the network equals its linearization: Jacot et al. 2018, Lee et al. 2019).

This infinite-width object is deterministic (one per data set and hyperparameters), and both
``mean`` and ``var`` of every finite network converge to it as ``w → ∞`` at fixed ``T``, ``η``.
Without the centering, the finite means would converge to ``f₀ + …`` with a random ``f₀``,
and a single seed's distance to any fixed curve would not vanish.

The step size is ``η = lr_factor · N / λ_max(Θ_∞)`` on the training inputs (stable for
``lr_factor < 2``), the same for every width. Rows, one per network and one for the limit:
``{"width": w or None, "seed", "mean_rmse_to_infinite", "std_rmse_to_infinite", "test_rmse"}``
— the root-mean-square differences over the grid between the finite and infinite means and
standard deviations, and the RMSE of the mean against the noiseless target on the grid (which
extends beyond the data on both sides). ``seed`` is the initialization replicate (``None`` for
the limit, which has no initialization).

Run: ``ntkscale experiment regression1d --quick`` (CPU, about 30 s of CPU time); the
full preset (widths up to 32,768, i.e. MLPs with up to 1.1·10⁹ parameters) is sized for one
large GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import data as nks_data
from ..gp import NTKGP
from ..kernels import infinite_ntk
from ..models import MLP
from .runner import Context, Outcome, Study, new_figure, run_study, save_figure

__all__ = ["Regression1DConfig", "QUICK", "FULL", "STUDY", "run", "infinite_predictive", "finite_predictive"]


@dataclass(frozen=True)
class Regression1DConfig:
    """The sweep's settings (everything that changes the numbers).

    Attributes:
        widths: hidden widths of the finite networks.
        depth: hidden layers.
        num_seeds: initializations per width.
        n_train: training points of :func:`ntkscale.data.regression1d`.
        n_grid: points of the prediction grid over [-1.5, 1.5].
        data_noise: standard deviation of the training targets' noise.
        noise: NTK-GP likelihood variance ``σ²``.
        prior_scale: NTK-GP prior variance ``s²``.
        W_std: weight standard deviation of the NTK parametrization.
        b_std: bias standard deviation (> 0, or a 1-D ReLU network is linear on each half-line).
        steps: gradient-descent steps ``T``.
        lr_factor: ``η = lr_factor · N / λ_max(Θ_∞)``.
    """

    widths: tuple[int, ...] = (64, 256, 1024, 4096, 16384, 32768)
    depth: int = 2
    num_seeds: int = 5
    n_train: int = 64
    n_grid: int = 300
    data_noise: float = 0.1
    noise: float = 0.01
    prior_scale: float = 1.0
    W_std: float = math.sqrt(2.0)
    b_std: float = 1.0
    steps: int = 3000
    lr_factor: float = 1.0


FULL = Regression1DConfig()
QUICK = Regression1DConfig(widths=(16, 64, 256, 1024), num_seeds=2, n_grid=200, steps=1000)


def _dataset(config: dict):
    return nks_data.regression1d(
        n=config["n_train"], seed=config["seed"], noise=config["data_noise"], n_test=config["n_grid"]
    )


def _kernel(config: dict, X1: Tensor, X2: Tensor | None = None) -> Tensor:
    return infinite_ntk(X1, X2, depth=config["depth"], activation="relu", W_std=config["W_std"], b_std=config["b_std"])


def step_size(config: dict, X: Tensor) -> float:
    """``η = lr_factor · N / λ_max(Θ_∞(X, X))``, the gradient-descent step of every width."""
    K = _kernel(config, X.double())
    return config["lr_factor"] * X.shape[0] / torch.linalg.eigvalsh(K)[-1].item()


def infinite_predictive(config: dict, X: Tensor, y: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation on ``grid`` of the infinite-width NTK-GP after kernel GD.

    Dense float64 linear algebra on the closed-form ``Θ_∞`` (N and the grid are small).

    Args:
        config: the run's config (``depth``, ``W_std``, ``b_std``, ``steps``, ``lr_factor``,
            ``noise``, ``prior_scale``).
        X: training inputs.  # shape: (N, 1)
        y: training targets.  # shape: (N, 1)
        grid: prediction inputs.  # shape: (M, 1)

    Returns:
        ``(mean, std)``, each of shape (M,), float64.
    """
    X, y, grid = X.double(), y.double().reshape(-1), grid.double()
    N = X.shape[0]
    K = _kernel(config, X)
    Ks = _kernel(config, grid, X)  # shape: (M, N)
    kss = torch.diagonal(_kernel(config, grid))  # shape: (M,)
    eta = step_size(config, X) / N  # per-sample step of the 1/(2N)-scaled loss
    mu, U = torch.linalg.eigh(K)
    mu = mu.clamp_min(0)
    a = eta * mu  # in [0, lr_factor]; the residual shrinks by (1 - a) per step along each eigvector
    T = config["steps"]
    # Σ_{k<T} η (1 − a)^k = η (1 − (1 − a)^T) / a, and η T as a → 0
    geo = torch.where(
        a > 1e-12, -torch.expm1(T * torch.log1p(-a.clamp(max=1 - 1e-15))) / a.clamp_min(1e-300), torch.full_like(a, T)
    )
    coef = U @ (eta * geo * (U.T @ y))  # shape: (N,)
    f_train, f_grid = K @ coef, Ks @ coef
    lam = config["noise"] / config["prior_scale"]
    L = torch.linalg.cholesky(K + lam * torch.eye(N, dtype=K.dtype, device=K.device))
    alpha = torch.cholesky_solve((y - f_train).unsqueeze(-1), L).squeeze(-1)
    mean = f_grid + Ks @ alpha
    V = torch.linalg.solve_triangular(L, Ks.T, upper=False)  # shape: (N, M)
    var = config["prior_scale"] * (kss - V.square().sum(0))
    return mean, var.clamp_min(0).sqrt()


def finite_predictive(config: dict, width: int, X: Tensor, y: Tensor, grid: Tensor, ctx: Context) -> dict:
    """Train one network (seeded by the caller) and return its centered NTK-GP predictive.

    Returns:
        ``{"mean", "std"}`` on the grid (float64 tensors of shape (M,)) and ``train_loss``,
        ``relative_weight_change`` (``‖θ_T − θ₀‖ / ‖θ₀‖``), ``lr``, ``num_parameters``.
    """
    dev = ctx.device
    net = MLP(1, [width] * config["depth"], 1, activation="relu", W_std=config["W_std"], b_std=config["b_std"],
              parametrization="ntk").to(dev)
    X, y, grid = X.to(dev), y.to(dev), grid.to(dev)
    with torch.no_grad():
        f0_train, f0_grid = net(X), net(grid)
    target = y + f0_train  # training f on y + f₀(X) is training the centered f − f₀ on y
    theta0 = [p.detach().clone() for p in net.parameters()]
    lr = step_size(config, X.cpu())
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in ctx.progress(range(config["steps"]), desc=f"GD, width {width}"):
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * (net(X) - target).square().mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_loss = 0.5 * (net(X) - target).square().mean().item()
        moved = math.sqrt(sum((p - p0).square().sum().item() for p, p0 in zip(net.parameters(), theta0)))
        size = math.sqrt(sum(p0.square().sum().item() for p0 in theta0))
    gp = NTKGP(net, X, target, noise=config["noise"], prior_scale=config["prior_scale"], dtype=torch.float64,
               backend="structured")
    mean, var = gp.predict(grid)
    mean = mean.reshape(-1) - f0_grid.double().reshape(-1)
    return {
        "mean": mean.cpu(),
        "std": var.reshape(-1).clamp_min(0).sqrt().cpu(),
        "train_loss": train_loss,
        "relative_weight_change": moved / size,
        "lr": lr,
        "num_parameters": sum(p.numel() for p in net.parameters()),
    }


def _rmse(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).square().mean().sqrt().item()


def configurations(config: dict) -> list[dict]:
    """Every (width, seed) network, then the infinite-width limit."""
    runs = [{"width": w, "seed": s} for w in config["widths"] for s in range(config["num_seeds"])]
    return runs + [{"width": None, "seed": None}]


def run_configuration(config: dict, configuration: dict, ctx: Context) -> Outcome:
    ds = _dataset(config)
    X, y, grid, truth = ds.X_train, ds.y_train, ds.X_test, ds.y_test.reshape(-1)
    mean_inf, std_inf = infinite_predictive(config, X, y, grid)
    width = configuration["width"]
    if width is None:
        row = {"width": None, "seed": None, "mean_rmse_to_infinite": 0.0, "std_rmse_to_infinite": 0.0,
               "test_rmse": _rmse(mean_inf, truth)}
        extras = {"x": grid.reshape(-1), "mean": mean_inf, "std": std_inf}
        return Outcome(rows=[row], extras=extras)
    res = finite_predictive(config, width, X, y, grid, ctx)
    row = {
        "width": width,
        "seed": configuration["seed"],
        "mean_rmse_to_infinite": _rmse(res["mean"], mean_inf),
        "std_rmse_to_infinite": _rmse(res["std"], std_inf),
        "test_rmse": _rmse(res["mean"], truth),
    }
    extras = {k: res[k] for k in ("mean", "std", "train_loss", "relative_weight_change", "lr", "num_parameters")}
    return Outcome(rows=[row], extras=extras)


def figures(results: dict, out: Path) -> list[Path]:
    """``regression1d.png`` (predictives side by side, infinite width last) and
    ``regression1d_convergence.png`` (distances to the limit against width)."""
    config = results["config"]
    ds = _dataset(config)
    x = ds.X_test.reshape(-1).numpy()
    extras = results["extras"]
    finite = [c for c in results["finished"] if not c.startswith("width=None")]
    first = [c for c in finite if c.endswith(",seed=0")]
    panels = first + (["width=None,seed=None"] if "width=None,seed=None" in extras else [])
    paths = []
    if panels:
        fig, axes, _ = new_figure(1, len(panels), figsize=(3.0 * len(panels), 2.8), sharey=True, squeeze=False)
        inf = extras.get("width=None,seed=None")
        for ax, cid in zip(axes[0], panels):
            e = extras[cid]
            mean, std = np.asarray(e["mean"]), np.asarray(e["std"])
            ax.plot(x, ds.y_test.reshape(-1).numpy(), color="0.6", lw=1, label="target")
            ax.fill_between(x, mean - 2 * std, mean + 2 * std, color="C0", alpha=0.25, lw=0, label="±2σ")
            ax.plot(x, mean, color="C0", lw=1.5, label="NTK-GP mean")
            if inf is not None and cid != "width=None,seed=None":
                ax.plot(x, np.asarray(inf["mean"]), color="k", lw=0.8, ls="--", label="infinite width")
            ax.scatter(ds.X_train.reshape(-1).numpy(), ds.y_train.reshape(-1).numpy(), s=6, color="C3", zorder=3)
            w = cid.split(",")[0].split("=")[1]
            ax.set_title("infinite width" if w == "None" else f"width {w}")
            ax.set_xlabel("x")
            ax.set_ylim(-3, 3)
        axes[0][0].legend(fontsize=6, loc="lower left")
        fig.suptitle(f"NTK-GP predictive, depth {config['depth']}, after {config['steps']} GD steps", fontsize=9, y=1.04)
        paths.append(save_figure(fig, out / "regression1d.png"))
    rows = [r for r in results["rows"] if r["width"] is not None]
    if rows:
        fig, axes, _ = new_figure(1, 2, figsize=(7.5, 2.8), squeeze=False)
        widths = sorted({r["width"] for r in rows})
        for ax, key, label in zip(axes[0], ("mean_rmse_to_infinite", "std_rmse_to_infinite"), ("mean", "std")):
            ax.scatter([r["width"] for r in rows], [r[key] for r in rows], s=10, color="C0", alpha=0.6)
            avg = [np.mean([r[key] for r in rows if r["width"] == w]) for w in widths]
            ax.plot(widths, avg, color="C0", label="mean over seeds")
            ref = [avg[0] * math.sqrt(widths[0] / w) for w in widths]
            ax.plot(widths, ref, color="0.5", ls=":", label="∝ 1/√width")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("width")
            ax.set_title(f"RMSE of the {label} to infinite width", fontsize=9)
        axes[0][0].legend(fontsize=7)
        paths.append(save_figure(fig, out / "regression1d_convergence.png"))
    return paths


STUDY = Study(
    name="regression1d",
    presets={"quick": QUICK, "full": FULL},
    configurations=configurations,
    run_configuration=run_configuration,
    figures=figures,
    columns=("width", "seed", "mean_rmse_to_infinite", "std_rmse_to_infinite", "test_rmse"),
    dtype="float32 training, float64 NTK-GP",
    full_note=(
        "the full preset (widths up to 32,768: MLPs with up to 1.1e9 parameters) is sized for one large "
        "GPU; on a CPU it takes many hours (use --quick)"
    ),
    description="finite-width NTK-GP predictives against the infinite-width limit on a 1-D regression",
)


def run(**kwargs):
    """``ntkscale experiment regression1d``: :func:`ntkscale.experiments.runner.run_study` of
    :data:`STUDY` (keywords as there)."""
    return run_study(STUDY, **kwargs)
