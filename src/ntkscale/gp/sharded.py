"""``ntkscale.distributed.NTKGP``: the NTK-GP of training data sharded over ``torch.distributed`` ranks.

The same adapter as :class:`ntkscale.NTKGP` (same arguments, methods and results), with the
training kernel a :class:`ntkscale.distributed.NTKOperator`: each rank passes its contiguous shard
of the training inputs and targets, and the test inputs replicated. The posterior algebra
(:class:`ntkscale.gp.KernelGP`) takes every sum over training rows from
:func:`ntkscale.solvers.reductions`, so means, variances (exact by PCG, fast by the Lanczos
factor, sampled), evidences and fitted hyperparameters are those of one process on all the data,
the same on every rank. Every call is collective: all ranks make it, with the same test inputs.

What differs from one process:

* the Cholesky routes (``exact_solver="cholesky"``, :meth:`cholesky`) are refused — they need
  all of ``Θ`` in one process; ``"auto"`` always takes PCG;
* ``preconditioner="pivchol"`` is not available (it reads rows of ``Θ``); ``"nystrom"`` (the
  default) and ``"jacobi"`` are;
* :meth:`representer_weights` returns this rank's rows; :attr:`K` is the sharded operator and
  :attr:`X` this rank's shard;
* :meth:`sample` without a ``seed`` draws one on rank 0 and shares it, so all ranks use the same
  prior and noise draws.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .ntkgp import NTKGP as _NTKGP

__all__ = ["NTKGP"]


class NTKGP(_NTKGP):
    """NTK-GP / linearized-Laplace regression on training data sharded over process-group ranks.

    Args:
        model: the trained network, with the same weights on every rank (checked).
        X_local: this rank's contiguous shard of the training inputs (rank ``r`` holds the
            samples after those of ranks ``0..r-1``).  # shape: (N_r, *in_shape)
        y_local: the matching targets.  # shape: (N_r, C), or (N_r,) when C = 1
        noise: likelihood variance ``σ² ≥ 0``.
        prior_scale: prior variance ``s² > 0``.
        group: the process group (default the world group; ``torch.distributed`` must be
            initialized).
        timeout: seconds the construction's barrier waits for every rank.
        **kwargs: as for :class:`ntkscale.NTKGP` (``backend``, ``preconditioner``, ``rank``,
            ``tol``, ``fast_rank``, ``dtype``, ...), the same on every rank.

    Example (on every rank, e.g. under ``torchrun --nproc_per_node=2``)::

        gp = ntkscale.distributed.NTKGP(model, X[lo:hi], y[lo:hi], noise=1e-2)
        mean, var = gp.predict(X_test)                     # (M, C) each, the same on every rank
        mean, var = gp.predict(X_test, mode="fast")
        gp.log_marginal_likelihood()
    """

    def __init__(
        self,
        model: nn.Module,
        X_local: Tensor,
        y_local: Tensor,
        noise: float,
        prior_scale: float = 1.0,
        *,
        group=None,
        timeout: float = 60.0,
        **kwargs,
    ):
        self._dist_group, self._dist_timeout = group, timeout
        super().__init__(model, X_local, y_local, noise, prior_scale, **kwargs)

    def _train_operator(self, model, X, backend, operator_kwargs):
        from ..distributed import NTKOperator

        return NTKOperator(
            model, X, group=self._dist_group, timeout=self._dist_timeout, backend=backend, **operator_kwargs
        )

    def _sample(self, X_test: Tensor, num_samples: int, seed: int | None):
        if seed is None:  # one seed for all ranks: rank 0's draw from its global RNG
            red = self.posterior.red
            mine = torch.randint(0, 2**62, (1,), dtype=torch.int64)
            if torch.distributed.get_rank(red.group) != 0:
                mine.zero_()
            seed = int(red.sum(mine.to(self.K.device)).item())
        return super()._sample(X_test, num_samples, seed)

    def __repr__(self) -> str:
        return "distributed." + super().__repr__().replace(
            "NTKGP(", f"NTKGP(rank={self.K.rank} of {self.K.world_size}, ", 1
        )
