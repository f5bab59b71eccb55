"""``ntkscale experiment bandits``: neural contextual bandits — NTK-theory exploration against
linearized-Laplace uncertainty with marginal-likelihood hyperparameters.

The bandits are classification sets (:mod:`ntkscale.experiments._bandit_env`): one arm per
class, reward 1 for the true class, contexts in NeuralUCB's disjoint encoding. Every method uses
the same network — an NTK-parametrized ReLU MLP with one hidden layer of the given width and one
output (:class:`ntkscale.models.MLP`) — initialized alike for a given seed, and the same training:
after the n-th observation (n ≤ ``retrain_until``, then every ``retrain_every``-th) it runs
``train_steps`` full-batch Adam steps (warm-started) on NeuralUCB's loss

    ½ Σᵢ (f(xᵢ; θ) − rᵢ)² + ½ λ ‖θ − θ₀‖²        (λ = ``ridge``).

Methods (each scores the K arms of a round and pulls the best score):

* ``greedy`` — ``f(x; θ)``: no exploration.
* ``neuralucb`` — NeuralUCB (Zhou, Li & Gu 2020, Algorithm 1): ``f(x; θ) + γₜ √(gᵀ Z⁻¹ g)`` with
  ``Z = λ I + Σᵢ gᵢ gᵢᵀ`` over the pulled arms' gradients (NTK parametrization: the paper's
  ``g/√m``). ``γₜ`` is the one of its Algorithm 1 and regret theorem in the wide-network limit
  (the ``m^{-1/6}`` terms and the ``(1 − ηmλ)^{J/2}`` training term vanish as ``m, J → ∞``):

      γₜ = ν √(log det(Zₜ)/det(λI) − 2 log δ) + √λ S

  with ``ν = 1/2`` (rewards in [0, 1] are ½-sub-Gaussian), ``δ = 0.1``, ``λ = 1`` (the theorem
  wants ``λ ≥ max(1, S⁻²)``), and ``S = √(2 hᵀ H⁻¹ h)``, the bound the theorem asks for,
  computed on the run's own contexts: ``h`` the rewards of every (context, arm) of the horizon
  and ``H`` the infinite-width NTK Gram on them (:func:`ntkscale.kernels.infinite_ntk`).
  ``Z`` is kept exactly (no diagonal approximation) in kernel space — ``gᵀZ⁻¹g =
  (Θ(x,x) − Θ(x,X)(Θ + λI)⁻¹Θ(X,x))/λ`` — with the current network's gradients on the whole
  history (rebuilt at every retraining).
* ``neuralucb_grid`` — the same with a constant ``γ`` picked from ``gamma_grid`` by the lowest
  mean final regret over the seeds (the usual practice, selected on the evaluation runs, which
  flatters it). Its rows are the chosen ``γ``'s runs; its ``seconds`` the whole grid's.
* ``laplace_ucb`` — the linearized-Laplace posterior of the same network (prior ``N(θ₀, s² I)``
  around the initialization — the prior whose MAP the training loss computes — linearized at the
  trained ``θ*``, noise ``σ²``): ``mean + β √var`` with ``β = 1``, mean ``f(x) + Θ(x,X)(Θ + λI)⁻¹(y − f(X))``
  and variance ``s² [Θ(x,x) − Θ(x,X)(Θ + λI)⁻¹Θ(X,x)]``, ``λ = σ²/s²``. ``(σ², s²)`` maximize
  the Laplace evidence (:func:`fit_laplace_evidence`, scatter ``‖θ* − θ₀‖²/s²``) at every
  retraining, warm-started at the last optimum — no grid.
* ``laplace_ts`` — Thompson sampling from the same posterior: one joint sample at the K arms per
  round, by pathwise conditioning (prior sample ``f(x) + J(x)δ``, ``δ ~ N(0, s² I)``, by one
  Jacobian-vector product over history and arms; Matheron's update by
  :meth:`ntkscale.gp.KernelGP.pathwise_update`).

Each round builds one :class:`ntkscale.NTKOperator` (structured backend, float64) between the
history plus the arms and the arms; its dense ``(n + K) × K`` block gives the arms' kernel
against the history and among themselves. Between retrainings the history's Gram and Cholesky
factor grow by the pulled arm's row (:class:`GrowingKernelHistory`); posterior means, variances
and samples come from :class:`ntkscale.gp.KernelGP` with that factor as the PCG preconditioner.

Presets: ``--quick`` — wine (150 rounds) and digits (300), widths 32 and 128, 2 seeds, a grid of
3 γ: about 160 s of CPU time on one thread. Full — wine (178), digits (1500), MNIST/CIFAR-10
(2000, when their files are under ``--data-dir``), widths 64 to 4096, 5 seeds, a grid of 5 γ,
100 Adam steps per retraining: sized for one GPU (a few hours by the quick run's per-round costs;
the kernels of width 4096 and the ``(n + K) × K`` blocks for n up to 2000 are small for it).

Rows: ``{"dataset", "width", "method", "seed", "cumulative_regret": [per round],
"final_regret", "seconds"}``. Figures: ``bandits_regret.png`` (mean cumulative regret ± standard
error over seeds against rounds, one panel per data set and width) and ``bandits_width.png``
(final regret against width per method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._bandit_env import (
    BanditEnvironment,
    BanditRun,
    OraclePolicy,
    UniformPolicy,
    bandit_data_on_disk,
    disjoint_encoding,
    load_bandit_data,
    run_policy,
)
from ._bandit_posterior import (
    CholeskyPreconditioner,
    EvidenceFit,
    GrowingKernelHistory,
    fit_laplace_evidence,
    laplace_evidence,
)
from ._bandit_policy import METHODS, NeuralBandit, neuralucb_gamma, reward_norm_bound
from .runner import Context, ExperimentError, Outcome, Study, configuration_seed, new_figure, run_study, save_figure

__all__ = [
    "METHODS",
    "STUDY",
    "BanditConfig",
    "BanditEnvironment",
    "BanditRun",
    "CholeskyPreconditioner",
    "EvidenceFit",
    "GrowingKernelHistory",
    "NeuralBandit",
    "OraclePolicy",
    "UniformPolicy",
    "disjoint_encoding",
    "fit_laplace_evidence",
    "laplace_evidence",
    "load_bandit_data",
    "neuralucb_gamma",
    "reward_norm_bound",
    "run",
    "run_policy",
]

@dataclass(frozen=True)
class BanditConfig:
    """A preset of the bandit study.

    Attributes:
        datasets: built-in sets (``"digits"``, ``"wine"``); the full preset adds MNIST and
            CIFAR-10 when their files are under ``--data-dir`` (one context per round, drawn once).
        rounds: horizon per data set (``{"name": T}``; ``"default"`` for the others).
        widths: hidden widths.
        seeds: seeds per (data set, width, method).
        methods: which of :data:`METHODS`.
        depth: hidden layers.
        ridge: ``λ`` of the training loss and of NeuralUCB's ``Z``.
        lr: Adam learning rate.
        train_steps: Adam steps per retraining.
        retrain_until: retrain after each of the first this many observations ...
        retrain_every: ... then after every this many.
        nu, delta: NeuralUCB's sub-Gaussian parameter and confidence.
        gamma_grid: ``γ`` values of ``neuralucb_grid``.
        ucb_beta: ``β`` of ``laplace_ucb``.
        noise_init, prior_scale_init: the Laplace hyperparameters before the first fit.
        prior_mean: centre of the Laplace prior: ``"init"`` (``θ₀``, the centre of the training
            loss's ``½λ‖θ − θ₀‖²``, so the trained weights are that prior's MAP) or ``"zero"``
            (laplace-torch's default); it sets the evidence's scatter term ``‖θ* − centre‖²/s²``.
        use_data_dir: also run the sets found under ``--data-dir`` (the full preset).
    """

    datasets: tuple[str, ...] = ("wine", "digits")
    rounds: dict = field(default_factory=lambda: {"wine": 150, "digits": 300})
    widths: tuple[int, ...] = (32, 128)
    seeds: int = 2
    methods: tuple[str, ...] = METHODS
    depth: int = 1
    ridge: float = 1.0
    lr: float = 1e-2
    train_steps: int = 20
    retrain_until: int = 20
    retrain_every: int = 10
    nu: float = 0.5
    delta: float = 0.1
    gamma_grid: tuple[float, ...] = (0.01, 0.1, 1.0)
    ucb_beta: float = 1.0
    noise_init: float = 0.1
    prior_scale_init: float = 1.0
    prior_mean: str = "init"
    use_data_dir: bool = False


QUICK = BanditConfig()
FULL = BanditConfig(
    datasets=("wine", "digits"),
    rounds={"wine": 178, "digits": 1500, "default": 2000},
    widths=(64, 256, 1024, 4096),
    seeds=5,
    train_steps=100,
    retrain_until=100,
    retrain_every=10,
    gamma_grid=(0.001, 0.01, 0.1, 1.0, 10.0),
    use_data_dir=True,
)


# -- the study ------------------------------------------------------------------------------------
def _prepare(config: dict, ctx: Context) -> dict:
    extra = []
    if config["use_data_dir"]:
        extra = [n for n in bandit_data_on_disk(ctx.data_dir) if n not in config["datasets"]]
        config["datasets"] = list(config["datasets"]) + extra
    config["data_found"] = extra
    return config


def _configurations(config: dict) -> list[dict]:
    unknown = [m for m in config["methods"] if m not in METHODS]
    if unknown:
        raise ExperimentError(f"unknown bandit method(s) {unknown}; the methods are {', '.join(METHODS)}")
    return [{"dataset": d, "width": int(w), "method": m}
            for d in config["datasets"] for w in config["widths"] for m in config["methods"]]


_DATA: dict = {}


def _data(name: str, data_dir, size: int):
    key = (name, str(data_dir), size)
    if key not in _DATA:
        _DATA[key] = load_bandit_data(name, data_dir, size)
    return _DATA[key]


_S_CACHE: dict = {}


def _environment(config: dict, dataset: str, s: int, ctx: Context) -> BanditEnvironment:
    T = int(config["rounds"].get(dataset, config["rounds"].get("default", 200)))
    X, labels = _data(dataset, ctx.data_dir, T)
    seed = configuration_seed(config["seed"], {"dataset": dataset, "seed": s})
    return BanditEnvironment(X, labels, T, seed=seed, name=dataset)


def _run_one(config: dict, env: BanditEnvironment, width: int, method: str, s: int, ctx: Context,
             gamma: float | None = None) -> tuple[BanditRun, NeuralBandit]:
    init_seed = configuration_seed(config["seed"], {"dataset": env.name, "width": width, "seed": s})
    S = None
    if method == "neuralucb":
        key = (env.name, env.seed, env.num_rounds, config["depth"])
        if key not in _S_CACHE:
            _S_CACHE[key] = reward_norm_bound(env, depth=int(config["depth"]), device=ctx.device)
        S = _S_CACHE[key]
    policy = NeuralBandit(method, env.num_arms * env.dim, width, env.num_rounds, config, seed=init_seed,
                          gamma=gamma, S=S, device=ctx.device)
    bar = ctx.progress(total=env.num_rounds, desc=f"{method} seed {s}" + (f" γ={gamma:g}" if gamma else ""))
    try:
        run_ = run_policy(env, policy, progress=bar)
    finally:
        bar.close()
    return run_, policy


def _row(dataset, width, method, s, run_: BanditRun, seconds: float) -> dict:
    return {"dataset": dataset, "width": width, "method": method, "seed": s,
            "cumulative_regret": [float(v) for v in run_.cumulative_regret],
            "final_regret": float(run_.cumulative_regret[-1]), "seconds": float(seconds)}


def _run_configuration(config: dict, configuration: dict, ctx: Context) -> Outcome:
    dataset, width, method = configuration["dataset"], int(configuration["width"]), configuration["method"]
    seeds = range(int(config["seeds"]))
    envs = {s: _environment(config, dataset, s, ctx) for s in seeds}
    rows, extras = [], {"num_arms": envs[0].num_arms}
    if method == "neuralucb_grid":
        runs = {}
        for g in config["gamma_grid"]:
            for s in seeds:
                runs[(g, s)] = _run_one(config, envs[s], width, method, s, ctx, gamma=float(g))[0]
        means = {g: float(np.mean([runs[(g, s)].cumulative_regret[-1] for s in seeds])) for g in config["gamma_grid"]}
        best = min(config["gamma_grid"], key=lambda g: means[g])
        for s in seeds:
            cost = sum(runs[(g, s)].seconds for g in config["gamma_grid"])
            rows.append(_row(dataset, width, method, s, runs[(best, s)], cost))
        extras.update(grid_final_regret={str(g): v for g, v in means.items()}, gamma=float(best),
                      grid_seconds=float(sum(r.seconds for r in runs.values())))
        return Outcome(rows=rows, extras=extras)
    traces = {}
    for s in seeds:
        run_, policy = _run_one(config, envs[s], width, method, s, ctx)
        rows.append(_row(dataset, width, method, s, run_, run_.seconds))
        traces[str(s)] = policy.trace
        if method == "neuralucb":
            extras.setdefault("S", {})[str(s)] = policy.S
            extras.setdefault("gamma_final", {})[str(s)] = policy.gammas[-1] if policy.gammas else None
    if method != "greedy":
        extras["trace"] = traces
    return Outcome(rows=rows, extras=extras)


_COLORS = {"greedy": "tab:gray", "neuralucb": "tab:red", "neuralucb_grid": "tab:orange",
           "laplace_ucb": "tab:blue", "laplace_ts": "tab:green"}


def _figures(results: dict, out: Path) -> list[Path]:
    rows = results["rows"]
    if not rows:
        return []
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    widths = sorted({r["width"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    arms = {}
    for cid, e in results.get("extras", {}).items():
        if "num_arms" in e:
            arms[cid.split(",")[0].split("=", 1)[1]] = e["num_arms"]
    fig, axes, plt = new_figure(len(datasets), len(widths), figsize=(3.6 * len(widths), 2.9 * len(datasets)),
                                squeeze=False)
    for i, d in enumerate(datasets):
        for j, w in enumerate(widths):
            ax = axes[i][j]
            for m in methods:
                curves = np.array([r["cumulative_regret"] for r in rows
                                   if r["dataset"] == d and r["width"] == w and r["method"] == m])
                if not len(curves):
                    continue
                mean = curves.mean(0)
                se = curves.std(0, ddof=1) / math.sqrt(len(curves)) if len(curves) > 1 else 0 * mean
                t = np.arange(1, mean.size + 1)
                ax.plot(t, mean, color=_COLORS[m], label=m, lw=1.4)
                ax.fill_between(t, mean - se, mean + se, color=_COLORS[m], alpha=0.2, lw=0)
            if d in arms:
                T = max(len(r["cumulative_regret"]) for r in rows if r["dataset"] == d)
                ax.plot([0, T], [0, T * (1 - 1 / arms[d])], color="k", ls=":", lw=1, label="uniform")
            ax.set_title(f"{d}, width {w}", fontsize=9)
            ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel("cumulative regret")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("Neural contextual bandits: mean cumulative regret ± s.e. over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    paths = [save_figure(fig, out / "bandits_regret.png")]

    fig, axes, plt = new_figure(1, len(datasets), figsize=(3.8 * len(datasets), 3.0), squeeze=False)
    for i, d in enumerate(datasets):
        ax = axes[0][i]
        for m in methods:
            xs, ys, es = [], [], []
            for w in widths:
                finals = [r["final_regret"] for r in rows if r["dataset"] == d and r["width"] == w and r["method"] == m]
                if finals:
                    xs.append(w)
                    ys.append(np.mean(finals))
                    es.append(np.std(finals, ddof=1) / math.sqrt(len(finals)) if len(finals) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, color=_COLORS[m], label=m, marker="o", ms=4, capsize=3, lw=1.2)
        if d in arms:
            T = max(len(r["cumulative_regret"]) for r in rows if r["dataset"] == d)
            ax.axhline(T * (1 - 1 / arms[d]), color="k", ls=":", lw=1, label="uniform")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_title(d, fontsize=9)
        if i == 0:
            ax.set_ylabel("final cumulative regret")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("Final cumulative regret against width (mean ± s.e. over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    paths.append(save_figure(fig, out / "bandits_width.png"))
    return paths


STUDY = Study(
    name="bandits",
    presets={"quick": QUICK, "full": FULL},
    configurations=_configurations,
    run_configuration=_run_configuration,
    figures=_figures,
    columns=("dataset", "width", "method", "seed", "final_regret", "seconds"),
    prepare=_prepare,
    dtype="float64",
    full_note=("the full preset (digits 1500 rounds, widths up to 4096, 5 seeds) is sized for one GPU; "
               "on a CPU expect many hours (or use --quick)"),
    description="neural contextual bandits: NeuralUCB's theory γ vs linearized-Laplace UCB/TS",
)


def run(**kwargs):
    """``ntkscale experiment bandits``: see :func:`ntkscale.experiments.run_study`."""
    return run_study(STUDY, **kwargs)
