"""GP inference on linear-operator kernels, and the network adapters built on it.

Layout (one concern per module):

* :mod:`~ntkscale.gp.inference` — :class:`KernelGP`: posterior mean, exact / fast / sampled
  variances, pathwise updates and evidences (GP and linearized-Laplace) and their maximization,
  for any square kernel ``LinearOperator`` with a cross-kernel operator and a test prior diagonal.
  It never sees a network.
* :mod:`~ntkscale.gp.evidence` — the GP and linearized-Laplace evidences and their maximization
  over ``(σ², s²)`` (a mixin of :class:`KernelGP`; :mod:`~ntkscale.gp.search` holds the grid
  searches).
* :mod:`~ntkscale.gp.ntkgp` — :class:`NTKGP`: the adapter from a trained network to operators
  (:class:`ntkscale.NTKOperator`), ``f(X)``, residuals and prior samples by Jacobian-vector
  products.
* :mod:`~ntkscale.gp.operators` — :class:`ColumnBlockedOperator` and the cost questions the
  algebra asks an operator (:func:`product_cost`, :func:`block_cost`).
* :mod:`~ntkscale.gp.classification` — :class:`NTKClassifierGP`: linearized Laplace for a
  softmax classifier (GGN kernel, probit / Monte Carlo predictive) over :class:`KernelGP`.
* :mod:`~ntkscale.gp.ggn` — the GGN kernel ``Λ^{1/2} Θ Λ^{1/2}`` of a softmax likelihood.
* :mod:`~ntkscale.gp.results` — the dataclasses the layer returns.

The Krylov machinery the algebra reuses across noise levels lives in :mod:`ntkscale.solvers`
(:class:`ntkscale.solvers.LanczosBasis`, :class:`ntkscale.solvers.StochasticLogdet`).
"""

from __future__ import annotations

from .classification import NTKClassifierGP
from .ggn import GGNKernel, ggn_kernel
from .inference import HyperparameterWarning, KernelGP, NegativeVarianceWarning
from .ntkgp import NTKGP
from .operators import ColumnBlockedOperator, block_cost, product_cost
from .results import EvidenceInfo, FitInfo, Hyperparameters, PredictInfo, VarianceError

__all__ = [
    "ColumnBlockedOperator",
    "EvidenceInfo",
    "FitInfo",
    "GGNKernel",
    "HyperparameterWarning",
    "Hyperparameters",
    "KernelGP",
    "NTKClassifierGP",
    "NTKGP",
    "NegativeVarianceWarning",
    "PredictInfo",
    "VarianceError",
    "block_cost",
    "ggn_kernel",
    "product_cost",
]
