"""The learned policies of the bandit study: NeuralUCB, linearized-Laplace UCB and Thompson
sampling, greedy — one class, :class:`NeuralBandit`, sharing network, training and kernel history.

See :mod:`ntkscale.experiments.bandits` for what each method does and the constants it uses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..models import MLP
from ..operator import NTKOperator
from ._bandit_env import BanditEnvironment, disjoint_encoding
from ._bandit_posterior import GrowingKernelHistory, fit_laplace_evidence

__all__ = ["METHODS", "NeuralBandit", "neuralucb_gamma", "reward_norm_bound"]

METHODS = ("greedy", "neuralucb", "neuralucb_grid", "laplace_ucb", "laplace_ts")


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
    """``γₜ = ν √(log det Zₜ/det λI − 2 log δ) + √λ S`` (NeuralUCB's γₜ as ``m, J → ∞``)."""
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
            # ‖θ* − m‖² for the prior N(m, s² I): m = θ₀ (the centre of the training loss's
            # ½λ‖θ − θ₀‖²) with prior_mean="init", m = 0 with "zero" (laplace-torch's default)
            centre = self.theta0 if self.cfg.get("prior_mean", "init") == "init" else [0.0] * len(self.theta0)
            wsq = sum(float((p.detach() - c).double().square().sum()) for p, c in zip(self.net.parameters(), centre))
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
