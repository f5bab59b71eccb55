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
  ``g/√m``). ``γₜ`` is the theorem's (Theorem 4.5), in its wide-network limit (the ``m^{-1/6}``
  terms and the ``(1 − ηmλ)^{J/2}`` training term vanish as ``m, J → ∞``):

      γₜ = ν √(log det(Z_t)/det(λI) − 2 log δ) + √λ S

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
* ``laplace_ucb`` — the linearized-Laplace posterior of the same network (prior ``N(θ*, s² I)``,
  noise ``σ²``): ``mean + β √var`` with ``β = 1``, mean ``f(x) + Θ(x,X)(Θ + λI)⁻¹(y − f(X))``
  and variance ``s² [Θ(x,x) − Θ(x,X)(Θ + λI)⁻¹Θ(X,x)]``, ``λ = σ²/s²``. ``(σ², s²)`` maximize
  the Laplace evidence (:func:`fit_laplace_evidence`) at every retraining, warm-started at the
  last optimum — no grid.
* ``laplace_ts`` — Thompson sampling from the same posterior: one joint sample at the K arms per
  round, by pathwise conditioning (prior sample ``f(x) + J(x)δ``, ``δ ~ N(0, s² I)``, by one
  Jacobian-vector product over history and arms; Matheron's update by
  :meth:`ntkscale.gp.KernelGP.pathwise_update`).

Each round builds one :class:`ntkscale.NTKOperator` (structured backend, float64) between the
history plus the arms and the arms; its dense ``(n + K) × K`` block gives the arms' kernel
against the history and among themselves. Between retrainings the history's Gram and Cholesky
factor grow by the pulled arm's row (:class:`GrowingKernelHistory`); posterior means, variances
and samples come from :class:`ntkscale.gp.KernelGP` with that factor as the PCG preconditioner.

Rows: ``{"dataset", "width", "method", "seed", "cumulative_regret": [per round],
"final_regret", "seconds"}``. Figures: ``bandits_regret.png`` (mean cumulative regret ± standard
error over seeds against rounds, one panel per data set and width) and ``bandits_width.png``
(final regret against width per method).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..models import MLP
from ..operator import NTKOperator
from ._bandit_env import (
    BanditEnvironment,
    BanditRun,
    OraclePolicy,
    UniformPolicy,
    bandit_data_files,
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
    "reward_norm_bound",
    "run",
    "run_policy",
]

METHODS = ("greedy", "neuralucb", "neuralucb_grid", "laplace_ucb", "laplace_ts")


@dataclass(frozen=True)
class BanditConfig:
    """A preset of the bandit study.

    Attributes:
        datasets: built-in sets (``"digits"``, ``"wine"``); the full preset adds every
            ``NAME.npz`` under ``--data-dir``.
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
        use_data_dir: also run every ``NAME.npz`` under ``--data-dir`` (the full preset).
    """

    datasets: tuple[str, ...] = ("wine", "digits")
    rounds: dict = field(default_factory=lambda: {"wine": 150, "digits": 150})
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


# -- the theory's constants -----------------------------------------------------------------------
def reward_norm_bound(env: BanditEnvironment, depth: int = 1, jitter: float = 1e-10,
                      device: torch.device | str = "cpu") -> float:
    """``S = √(2 hᵀ H⁻¹ h)``: NeuralUCB's bound on the reward function's NTK norm for ``env``.

    ``H`` is the infinite-width NTK Gram (:func:`ntkscale.kernels.infinite_ntk` of the network's
    depth) on every (context, arm) the horizon shows — each distinct sample once, times ``K``
    arms in the disjoint encoding — and ``h`` their rewards. ``H`` is factored in float64 with a
    relative ``jitter`` on its diagonal (repeated samples would make it singular).
    """
    from ..kernels import infinite_ntk

    idx = torch.unique(env.order)
    feats = disjoint_encoding(env.X[idx].double().to(device), env.num_arms).reshape(-1, env.num_arms * env.dim)
    h = torch.nn.functional.one_hot(env.labels[idx].to(device), env.num_arms).double().reshape(-1)
    H = infinite_ntk(feats, depth=depth)
    H.diagonal().add_(jitter * H.diagonal().mean())
    L = torch.linalg.cholesky(H)
    z = torch.linalg.solve_triangular(L, h.unsqueeze(-1), upper=False)
    return math.sqrt(2.0 * float(z.square().sum()))


def neuralucb_gamma(log_det_ratio: float, nu: float, delta: float, ridge: float, S: float) -> float:
    """``γₜ = ν √(log det Zₜ/det λI − 2 log δ) + √λ S`` (Theorem 4.5 as ``m, J → ∞``)."""
    return nu * math.sqrt(max(log_det_ratio, 0.0) - 2.0 * math.log(delta)) + math.sqrt(ridge) * S


# -- the policy -----------------------------------------------------------------------------------
class NeuralBandit:
    """One neural contextual-bandit policy of the study (see the module docstring).

    Args:
        method: one of ``"greedy"``, ``"neuralucb"``, ``"neuralucb_grid"``, ``"laplace_ucb"``,
            ``"laplace_ts"``.
        in_features: ``K·d``.
        width: hidden width.
        horizon: the most observations it will see.
        config: a :class:`BanditConfig` (or its dict).
        seed: seeds the network's initialization (the same for every method) and the samples.
        gamma: NeuralUCB's exploration: ``None`` for the theory's ``γₜ`` (needs ``S``), a number
            for a constant (``neuralucb_grid``).
        S: the reward-norm bound of :func:`reward_norm_bound` (``neuralucb`` with ``gamma=None``).
        device: where the network and the algebra live.

    Attributes:
        trace: per retraining, what the policy did (``round``, Laplace ``noise``/``prior_scale``
            and evidence, NeuralUCB's ``gamma``).
    """

    def __init__(self, method: str, in_features: int, width: int, horizon: int, config, seed: int = 0,
                 gamma: float | None = None, S: float | None = None, device: torch.device | str = "cpu"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        cfg = config if isinstance(config, dict) else config.__dict__
        self.method, self.cfg, self.device = method, dict(cfg), torch.device(device)
        if method == "neuralucb" and gamma is None and S is None:
            raise ValueError("neuralucb with the theory's γ needs S (see reward_norm_bound)")
        if method == "neuralucb_grid" and gamma is None:
            raise ValueError("neuralucb_grid needs a constant gamma")
        self.gamma, self.S = gamma, S
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = MLP(in_features, [width] * int(cfg["depth"]), 1, activation="relu").to(self.device)
        self.theta0 = [p.detach().clone() for p in self.net.parameters()]
        self.opt = torch.optim.Adam(self.net.parameters(), lr=float(cfg["lr"]))
        self.X = torch.zeros(horizon, in_features, device=self.device)
        self.y = torch.zeros(horizon, device=self.device)
        self.n = 0
        self.history = GrowingKernelHistory(horizon, torch.float64, self.device)
        ucb_neural = method in ("neuralucb", "neuralucb_grid")
        self.history.noise = 1.0 if ucb_neural else float(cfg["noise_init"])
        self.history.prior_scale = 1.0 / float(cfg["ridge"]) if ucb_neural else float(cfg["prior_scale_init"])
        self.gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        self._last: dict | None = None
        self.trace: list[dict] = []
        self.gammas: list[float] = []

    # -- scoring ----------------------------------------------------------------------------------
    def _forward(self, X: Tensor) -> Tensor:
        with torch.no_grad():
            return self.net(X).reshape(-1).double()

    def _kernels(self, feats: Tensor) -> dict:
        """The arms' outputs, their kernel against the history and among themselves, the posterior."""
        f = self._forward(feats)  # shape: (K,)
        n = self.n
        Z = torch.cat([self.X[:n], feats]) if n else feats
        op = NTKOperator(self.net, Z, feats, backend="structured", dtype=torch.float64)
        B = op.to_dense().detach()  # shape: (n + K, K)
        post = self.history.posterior() if n else None
        return {"f": f, "op": op, "k_hist": B[:n], "k_aa": B[n:], "post": post,
                "Ksx": None if post is None else _dense_op(B[:n].mT)}

    def predict(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and variance of the linearized network at the arms, at the current
        ``(σ², s²)`` (for NeuralUCB ``σ² = 1, s² = 1/λ``: the variance is ``gᵀZ⁻¹g``).

        Args:
            features: arm features.  # shape: (K, K*d)

        Returns:
            ``(mean, var)``, float64.  # shape: (K,) each
        """
        return self._mean_var(self._kernels(features.to(self.device)))

    def _mean_var(self, k: dict, with_mean: bool = True) -> tuple[Tensor, Tensor]:
        hist, post = self.history, k["post"]
        prior = torch.diagonal(k["k_aa"]).clone()
        if post is None:
            return k["f"], prior * hist.prior_scale
        var = post.variance(k["Ksx"], prior, mode="exact", solver="cg")
        return (k["f"] + post.mean(k["Ksx"]) if with_mean else k["f"]), var

    def select(self, t: int, features: Tensor) -> int:
        """The arm with the best score in round ``t`` (see the module docstring)."""
        feats = features.to(self.device)
        if self.method == "greedy":
            return int(torch.argmax(self._forward(feats)))
        k = self._kernels(feats)
        self._last = k
        n, hist, post, f = self.n, self.history, k["post"], k["f"]
        if self.method == "laplace_ts":
            delta = torch.randn(k["op"].num_params, 1, dtype=torch.float64, device=self.device, generator=self.gen)
            prior_f = k["op"].jvp(delta * math.sqrt(hist.prior_scale))  # shape: (n + K, 1)
            if post is None:
                score = f + prior_f[n:, 0]
            else:
                eps = torch.randn(n, 1, dtype=torch.float64, device=self.device, generator=self.gen)
                dev = post.pathwise_update(k["Ksx"], prior_f[:n], prior_f[n:], eps * math.sqrt(hist.noise))
                score = f + post.mean(k["Ksx"]) + dev[:, 0]
            return int(torch.argmax(score))
        mean, var = self._mean_var(k, with_mean=self.method == "laplace_ucb")
        if self.method == "laplace_ucb":
            score = mean + float(self.cfg["ucb_beta"]) * var.clamp_min(0).sqrt()
        else:  # NeuralUCB scores the network itself: f + γ √(gᵀZ⁻¹g)
            gamma = self.gamma
            if gamma is None:
                gamma = neuralucb_gamma(hist.log_det_ratio(), float(self.cfg["nu"]), float(self.cfg["delta"]),
                                        float(self.cfg["ridge"]), float(self.S))
                self.gammas.append(gamma)
            score = f + gamma * var.clamp_min(0).sqrt()
        return int(torch.argmax(score))

    # -- learning ---------------------------------------------------------------------------------
    def _retrain_now(self) -> bool:
        n = self.n
        return n <= int(self.cfg["retrain_until"]) or n % int(self.cfg["retrain_every"]) == 0

    def observe(self, t: int, arm: int, features: Tensor, reward: float) -> None:
        n = self.n
        self.X[n] = features[arm].to(self.device)
        self.y[n] = float(reward)
        self.n = n + 1
        if self.method == "greedy":
            if self._retrain_now():
                self._train()
            return
        last = self._last
        if self._retrain_now():
            self._train()
            self._rebuild()
        else:  # the network is unchanged: grow the Gram by the pulled arm's row
            self.history.append(last["k_hist"][:, arm], float(last["k_aa"][arm, arm]),
                                float(reward) - float(last["f"][arm]))

    def _train(self) -> None:
        n, lam = self.n, float(self.cfg["ridge"])
        X, y = self.X[:n], self.y[:n]
        for _ in range(int(self.cfg["train_steps"])):
            self.opt.zero_grad(set_to_none=True)
            fit = 0.5 * (self.net(X).reshape(-1) - y).square().sum()
            reg = 0.5 * lam * sum((p - p0).square().sum() for p, p0 in zip(self.net.parameters(), self.theta0))
            (fit + reg).backward()
            self.opt.step()

    def _rebuild(self) -> None:
        """After a retraining: the Gram of the new network, and for Laplace a new evidence fit."""
        n, hist = self.n, self.history
        G = NTKOperator(self.net, self.X[:n], backend="structured", dtype=torch.float64).to_dense().detach()
        r = self.y[:n].double() - self._forward(self.X[:n])
        entry = {"round": n}
        if self.method in ("laplace_ucb", "laplace_ts"):
            wsq = sum(float(p.detach().double().square().sum()) for p in self.net.parameters())
            mu = torch.linalg.eigvalsh(G)
            fit = fit_laplace_evidence(mu, r, wsq, hist.noise, hist.prior_scale)
            hist.noise, hist.prior_scale = fit.noise, fit.prior_scale
            entry.update(noise=fit.noise, prior_scale=fit.prior_scale, evidence=fit.evidence,
                         initial_evidence=fit.initial_evidence)
        hist.reset(G, r, hist.noise, hist.prior_scale)
        if self.gammas:
            entry["gamma"] = self.gammas[-1]
        self.trace.append(entry)


def _dense_op(M: Tensor):
    from linear_operator.operators import DenseLinearOperator

    return DenseLinearOperator(M.contiguous())


# -- the study ------------------------------------------------------------------------------------
def _prepare(config: dict, ctx: Context) -> dict:
    extra = []
    if config["use_data_dir"]:
        extra = [n for n in bandit_data_files(ctx.data_dir) if n not in config["datasets"]]
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


def _data(name: str, data_dir):
    key = (name, str(data_dir))
    if key not in _DATA:
        _DATA[key] = load_bandit_data(name, data_dir)
    return _DATA[key]


_S_CACHE: dict = {}


def _environment(config: dict, dataset: str, s: int, ctx: Context) -> BanditEnvironment:
    X, labels = _data(dataset, ctx.data_dir)
    T = int(config["rounds"].get(dataset, config["rounds"].get("default", 200)))
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
    rows, extras = [], {}
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
        extras = {"grid_final_regret": {str(g): v for g, v in means.items()}, "gamma": float(best),
                  "grid_seconds": float(sum(r.seconds for r in runs.values()))}
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
            ax.set_title(f"{d}, width {w}", fontsize=9)
            ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel("cumulative regret")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Neural contextual bandits: mean cumulative regret ± s.e. over seeds", fontsize=10)
    fig.tight_layout()
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
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_title(d, fontsize=9)
        if i == 0:
            ax.set_ylabel("final cumulative regret")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
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
