"""Evidences of GP regression on a kernel operator, and their maximization over (σ², s²).

A mixin of :class:`ntkscale.gp.KernelGP`: it uses the posterior's training solve (for the GP
evidence), its :class:`ntkscale.solvers.StochasticLogdet` (one SLQ run of ``K`` for every
``λ``), and nothing about what ``K`` is.

* ``kind="gp"``: ``log N(r; 0, s² K + σ² I)``.
* ``kind="laplace"``: ``log N(r; 0, σ² I) − ½ [log det(I + (s²/σ²) K) + ‖θ*‖² / s²]``, the
  linearized-Laplace evidence with prior ``N(0, s² I)`` on weights whose Jacobian Gram is ``K``.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
from torch import Tensor

from ..solvers import StochasticLogdet
from ._checks import check_noise, check_positive_int, check_prior_scale, check_range, key
from .results import EvidenceInfo, FitInfo, Hyperparameters
from .search import search_1d, search_2d

__all__ = ["EvidenceMixin", "HyperparameterWarning"]


class HyperparameterWarning(UserWarning):
    """A fitted hyperparameter lies on the boundary of its search range."""


class EvidenceMixin:
    """Evidences and hyperparameter fits of a :class:`ntkscale.gp.KernelGP`."""

    # -- evidences ---------------------------------------------------------------------------------
    def logdet_estimator(self) -> StochasticLogdet:
        """The :class:`ntkscale.solvers.StochasticLogdet` of ``K`` (fixed probes; every ``λ``)."""
        if self._slq is None:
            self._slq = StochasticLogdet(self.Kb, num_probes=self.num_probes, num_iter=self.num_iter, seed=self.seed)
        return self._slq

    def _default_kind(self, kind: str | None) -> str:
        kind = kind or ("laplace" if self.weight_norm_sq is not None else "gp")
        if kind not in ("gp", "laplace"):
            raise ValueError(f"kind must be 'laplace' or 'gp', got {kind!r}")
        if kind == "laplace" and self.weight_norm_sq is None:
            raise ValueError("kind='laplace' needs weight_norm_sq (‖θ*‖² of the trained weights); this kernel has none")
        return kind

    def evidence(self, noise: float, prior_scale: float, kind: str | None = None,
                 x0: Tensor | None = None) -> EvidenceInfo:
        """The log marginal likelihood of ``kind`` at ``(noise, prior_scale)`` with its terms.

        ``"gp"``: ``log N(r; 0, s² K + σ² I)`` (one PCG solve, cached per ``λ``; SLQ log-det).
        ``"laplace"``: ``log N(r; 0, σ² I) − ½ [log det(I + (s²/σ²) K) + ‖θ*‖²/s²]``, the
        linearized-Laplace evidence with prior ``N(0, s² I)`` on the weights (as laplace-torch
        computes it); no solve, only the SLQ log-det, so it is cheap at every ``(σ², s²)``.
        """
        kind = self._default_kind(kind)
        n = self.n
        lam = noise / prior_scale
        slq = self.logdet_estimator()
        if kind == "gp":
            alpha = self.representer_weights(lam, x0=x0)
            quad = self.red.sum(torch.dot(self.residual, alpha)).item() / prior_scale  # rᵀ (s²K + σ²I)⁻¹ r
            ld = slq(lam)
            logdet = n * math.log(prior_scale) + ld.value  # logdet(s²K + σ²I)
            value = -0.5 * quad - 0.5 * logdet - 0.5 * n * math.log(2 * math.pi)
            return EvidenceInfo("gp", value, noise, prior_scale, logdet, ld.stderr, quadratic=quad)
        if noise <= 0:
            raise ValueError("the Laplace evidence needs noise > 0 (log N(r; 0, σ² I) is undefined at σ² = 0)")
        ld = slq(lam)
        ratio = ld.value - n * math.log(lam)  # log det(I + K/λ)
        rss = self.residual_sq
        loglik = -0.5 * rss / noise - 0.5 * n * math.log(2 * math.pi * noise)
        scatter = self.weight_norm_sq / prior_scale
        value = loglik - 0.5 * (ratio + scatter)
        return EvidenceInfo("laplace", value, noise, prior_scale, ratio, ld.stderr, log_likelihood=loglik,
                            log_det_ratio=ratio, scatter=scatter)

    def log_marginal_likelihood(self, noise: float | None = None, prior_scale: float | None = None,
                                kind: str | None = None, return_info: bool = False):
        """The evidence (see :meth:`evidence`) at the given or current hyperparameters.

        Args:
            noise: ``σ²`` (default the current).
            prior_scale: ``s²`` (default the current).
            kind: ``"laplace"`` or ``"gp"`` (default ``"laplace"`` when ``weight_norm_sq`` is
                known, else ``"gp"``).
            return_info: also return the :class:`EvidenceInfo`.
        """
        noise = self.noise if noise is None else check_noise(noise)
        prior_scale = self.prior_scale if prior_scale is None else check_prior_scale(prior_scale)
        info = self.evidence(noise, prior_scale, kind)
        return (info.value, info) if return_info else info.value

    def fit_hyperparameters(
        self,
        optimize: tuple[str, ...] | str = ("noise", "prior_scale"),
        kind: str | None = None,
        ridge_range: tuple[float, float] = (1e-6, 1e2),
        noise_range: tuple[float, float] = (1e-8, 1e1),
        prior_scale_range: tuple[float, float] = (1e-3, 1e6),
        grid_size: int = 17,
        refine_steps: int = 20,
        update: bool = True,
    ) -> tuple[float, float]:
        """Maximize the evidence of ``kind`` over ``(log σ², log s²)``; see :class:`FitInfo`.

        ``kind="gp"``: for a fixed ``λ`` the GP evidence is concave in ``log s²`` with maximizer
        ``s² = rᵀ(K + λ I)⁻¹ r / n``, so the search is over ``log λ`` (a grid of ``grid_size``
        points over ``ridge_range × mean(diag K)``, then golden-section refinement); each
        evaluation is one warm-started PCG solve.

        ``kind="laplace"``: evaluations cost no solve (the SLQ nodes serve every ``λ``), so the
        search is a ``grid_size × grid_size`` log grid over ``noise_range × noise_reference`` and
        ``prior_scale_range × ‖θ*‖² / min(n, P)``, then ``refine_steps`` pattern-search steps
        (one coordinate fitted alone: a grid and golden section).

        An optimum on the edge of its search range raises a :class:`HyperparameterWarning` and
        is listed in ``FitInfo.on_boundary``: widen the range.

        Returns:
            ``(noise, prior_scale)``; never below the starting evidence (else the start).
        """
        opt = {optimize} if isinstance(optimize, str) else set(optimize)
        if not opt or not opt <= {"noise", "prior_scale"}:
            raise ValueError(f"optimize must name 'noise' and/or 'prior_scale', got {optimize!r}")
        kind = self._default_kind(kind)
        grid_size = check_positive_int(grid_size, "grid_size", 17)
        if grid_size < 3:
            raise ValueError(f"grid_size must be >= 3, got {grid_size}")
        if kind == "gp":
            return self._fit_gp(opt, check_range(ridge_range, "ridge_range"), grid_size, refine_steps, update)
        return self._fit_laplace(opt, check_range(noise_range, "noise_range"),
                                 check_range(prior_scale_range, "prior_scale_range"), grid_size, refine_steps, update)

    def _finish(self, kind, opt, start, initial, history, best, boundary, ranges, update):
        sigma2, s2, value = best
        if value < initial:
            sigma2, s2, value = self.noise, self.prior_scale, initial
        keep = {key(self.ridge), key(sigma2 / s2)}  # keep the caches of the start and the result
        self._alpha_cache = {k: v for k, v in self._alpha_cache.items() if k in keep}
        self._precond_cache = {k: v for k, v in self._precond_cache.items() if k in keep}
        if boundary:
            what = ", ".join(f"{b} = {sigma2 if b == 'noise' else s2:.3g} (range {ranges[b][0]:.3g}..{ranges[b][1]:.3g})"
                             for b in boundary)
            warnings.warn(
                f"fit_hyperparameters(kind={kind!r}): the optimum lies on the boundary of the search "
                f"range for {what}; widen the range (ridge_range / noise_range / prior_scale_range)",
                HyperparameterWarning,
                stacklevel=4,
            )
        self.fit_info = FitInfo(
            kind=kind,
            initial=Hyperparameters(self.noise, self.prior_scale, initial),
            result=Hyperparameters(sigma2, s2, value),
            evaluations=history,
            optimized=sorted(opt),
            seconds=time.perf_counter() - start,
            on_boundary=boundary,
            search_range=ranges,
        )
        if update:
            self.noise, self.prior_scale = sigma2, s2
        return sigma2, s2

    def _fit_gp(self, opt, ridge_range, grid_size, refine_steps, update):
        if opt == {"prior_scale"} and self.noise == 0:
            raise ValueError("fitting prior_scale alone needs noise > 0 (λ = σ²/s² would be 0)")
        start = time.perf_counter()
        n = self.n
        s2_fixed, sigma2_fixed = self.prior_scale, self.noise
        history: list[tuple[float, float, float]] = []
        cache: dict[float, float] = {}

        def nearest(lam: float) -> Tensor | None:
            if not self._alpha_cache:
                return None
            k = min(self._alpha_cache, key=lambda c: abs(math.log(max(c, 1e-300)) - math.log(lam)))
            return self._alpha_cache[k]

        def hyper(log_lam: float) -> tuple[float, float]:
            lam = math.exp(log_lam)
            if opt == {"noise"}:
                return lam * s2_fixed, s2_fixed
            if opt == {"prior_scale"}:
                return sigma2_fixed, sigma2_fixed / lam
            alpha = self.representer_weights(lam, x0=nearest(lam))
            q = self.red.sum(torch.dot(self.residual, alpha)).item()  # rᵀ(K + λI)⁻¹r
            s2 = max(q / n, torch.finfo(self.K.dtype).tiny)
            return lam * s2, s2

        def objective(log_lam: float) -> float:
            if log_lam not in cache:
                sigma2, s2 = hyper(log_lam)
                value = self.evidence(sigma2, s2, "gp", x0=nearest(math.exp(log_lam))).value
                history.append((sigma2, s2, value))
                cache[log_lam] = value
            return cache[log_lam]

        initial = self.evidence(self.noise, self.prior_scale, "gp").value
        dbar = max(self.red.sum(self.Kb.diagonal().detach().sum()).item() / n, torch.finfo(self.K.dtype).tiny)
        lo, hi = math.log(ridge_range[0] * dbar), math.log(ridge_range[1] * dbar)
        best_log = search_1d(objective, lo, hi, grid_size, refine_steps)
        sigma2, s2 = hyper(best_log)
        tol = 1e-3 * (hi - lo) / (grid_size - 1)
        boundary = ["ridge"] if (best_log - lo < tol or hi - best_log < tol) else []
        ranges = {"ridge": (math.exp(lo), math.exp(hi))}
        if boundary:  # name the fitted quantity the ridge stands for
            boundary = ["noise"] if opt == {"noise"} else ["prior_scale"] if opt == {"prior_scale"} else ["ridge"]
            ranges["noise"] = ranges["prior_scale"] = ranges["ridge"]
        return self._finish("gp", opt, start, initial, history, (sigma2, s2, cache[best_log]), boundary, ranges,
                            update)

    def _fit_laplace(self, opt, noise_range, prior_scale_range, grid_size, refine_steps, update):
        start = time.perf_counter()
        history: list[tuple[float, float, float]] = []
        nref = self.noise_reference
        pref = self.weight_norm_sq / max(1, min(self.n, self.num_weights or self.n))
        pref = max(pref, torch.finfo(torch.float64).tiny)
        box = {
            "noise": (math.log(noise_range[0] * nref), math.log(noise_range[1] * nref)),
            "prior_scale": (math.log(prior_scale_range[0] * pref), math.log(prior_scale_range[1] * pref)),
        }
        cur = {"noise": math.log(max(self.noise, 1e-300)), "prior_scale": math.log(self.prior_scale)}
        if "noise" not in opt and self.noise <= 0:
            raise ValueError("the Laplace evidence needs noise > 0; set noise or fit it")
        names = sorted(opt)
        cache: dict[tuple, float] = {}

        def point(x: tuple) -> tuple[float, float]:
            d = dict(cur, **dict(zip(names, x)))
            return math.exp(d["noise"]), math.exp(d["prior_scale"])

        def objective(x: tuple) -> float:
            x = tuple(round(v, 12) for v in x)
            if x not in cache:
                sigma2, s2 = point(x)
                value = self.evidence(sigma2, s2, "laplace").value
                history.append((sigma2, s2, value))
                cache[x] = value
            return cache[x]

        initial = self.evidence(self.noise, self.prior_scale, "laplace").value if self.noise > 0 else -math.inf
        if len(names) == 1:
            lo, hi = box[names[0]]
            best = (search_1d(lambda t: objective((t,)), lo, hi, grid_size, refine_steps),)
        else:
            best = search_2d(objective, [box[k] for k in names], grid_size, refine_steps)
        steps = {k: (box[k][1] - box[k][0]) / (grid_size - 1) for k in names}
        boundary = [k for k, v in zip(names, best) if v - box[k][0] < 1e-3 * steps[k] or box[k][1] - v < 1e-3 * steps[k]]
        sigma2, s2 = point(best)
        ranges = {k: (math.exp(box[k][0]), math.exp(box[k][1])) for k in names}
        return self._finish("laplace", opt, start, initial, history, (sigma2, s2, objective(best)), boundary,
                            ranges, update)
