"""The NTK of data sharded over ``torch.distributed`` ranks (gloo on CPUs, NCCL on GPUs).

Each rank holds a contiguous shard ``X_r`` of the samples (rank 0 the first ones) and the matching
rows of every vector, in the ``(sample, output)`` layout within the shard. The operator on rank
``r`` maps its rows ``v_r`` to its rows of the product with the whole kernel,

    ``(Θ v)_r = J_r Σ_s J_sᵀ v_s``:

each rank computes ``J_rᵀ v_r`` on its shard (a VJP pass, or the structured backend's weight-space
``U_l`` matrices from its local factors), one all-reduce sums the parameter-space vector, and each
rank applies ``J_r`` (a JVP pass, or the local factors). The solvers (:func:`ntkscale.solve`,
:func:`ntkscale.eigvalsh_extremes`, :func:`ntkscale.condition_number`, ...) run on it unchanged:
they take their inner products and norms from :func:`ntkscale.solvers.reductions`, which sums
them over the operator's process group, and draw their sketches and start vectors as this rank's
rows of the one global draw, so what they decompose is the kernel of all the data. The GP layer
does the same (:class:`ntkscale.gp.KernelGP` on this operator, with each rank's columns of the
cross-kernel ``K.cross(X_test).mT``), and :class:`NTKGP` is :class:`ntkscale.NTKGP` on sharded
training data: the same arguments, methods and results as one process on all of it.

Launch one process per device, e.g. ``torchrun --nproc_per_node=4 fit.py`` with::

    import datetime, torch, torch.distributed as dist
    import ntkscale as nks
    from ntkscale.distributed import NTKOperator

    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    X_r = X[rank * N // world : (rank + 1) * N // world].cuda()   # this rank's samples
    K = NTKOperator(model.cuda(), X_r)                            # same weights on every rank
    alpha, info = nks.solve(K, y_r.reshape(-1), noise=1e-2)       # this rank's rows of α

Failure handling: construction is collective. A ``monitored_barrier`` (gloo) names ranks that
never arrive; then every rank builds its shard's operator and the ranks exchange a summary (an
error, if any, the per-sample shape, dtype, C, P and a fingerprint of the weights), so a shard
with NaN/inf, a shape or dtype that differs across ranks, or different weights raises the same
:class:`ShardError` on every rank. Each product first all-reduces a few numbers saying whether
every rank's right-hand side was valid (and how many columns it has), and the parameter-space
all-reduce carries one status entry per rank, so a bad vector or an exception in a rank's VJP
ends the product on every rank with an error. A rank that dies, or stops calling collectives,
makes the others' next collective fail (at once when its connection closes, otherwise at the
process group's timeout, set by ``init_process_group(timeout=...)``) with a
:class:`DistributedError`, never a hang.
"""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from ._comm import DistributedError, all_reduce_sum, collective
from .backends.base import flatten, unflatten
from .operator import NTKOperator as _LocalNTKOperator
from .operator import _check_data

__all__ = ["DistributedError", "NTKGP", "NTKOperator", "ProductStats", "ShardError"]


class ShardError(ValueError):
    """The shards are bad or inconsistent across ranks; raised with the same text on every rank."""


@dataclass
class ProductStats:
    """Where the time of this rank's products went (wall clock; on a GPU the all-reduce time
    includes waiting for the local work queued before it).

    Attributes:
        products: products made (a batched ``K @ V`` counts once).
        local_seconds: the VJP and JVP passes on this rank's shard.
        allreduce_seconds: the collectives of the products (the check and the all-reduce of the
            parameter-space vector), including waiting for slower ranks.
        allreduce_bytes: bytes all-reduced.
    """

    products: int = 0
    local_seconds: float = 0.0
    allreduce_seconds: float = 0.0
    allreduce_bytes: int = 0

    @property
    def allreduce_share(self) -> float:
        """Fraction of the products' time spent in collectives."""
        total = self.local_seconds + self.allreduce_seconds
        return self.allreduce_seconds / total if total > 0 else 0.0


@dataclass(eq=False)
class _Shard:
    """What a distributed operator is besides its local operator; shared by rebuilt copies."""

    group: object
    rank: int
    world: int
    sizes: tuple[int, ...]  # samples on each rank
    dtype: torch.dtype | None  # the dtype= the operator was built with
    stats: ProductStats = field(default_factory=ProductStats)


class NTKOperator(LinearOperator):
    """This rank's rows of the NTK of data sharded over the ranks of a process group.

    Args:
        model: the network, with the same weights on every rank (checked).
        X_local: this rank's contiguous shard of the samples, shape (N_r, *in_shape); rank r
            holds the samples after those of ranks 0..r-1. Shards may differ in size.
        group: the process group (default: the world group of ``torch.distributed``, which must
            be initialized).
        timeout: seconds the construction's ``monitored_barrier`` (gloo) waits for all ranks.
        **operator_kwargs: as for :class:`ntkscale.NTKOperator` (``backend``, ``chunk_size``,
            ``params``, ``dtype``, ``memory_budget``, ...), applied to each shard.

    The operator is ``(N_r·C, N_r·C)``: it takes and returns this rank's rows, in the
    ``(sample, output)`` layout within the shard. Every product, and so every solver call, is
    collective: all ranks must make it, with the same number of columns. Products are not
    differentiable. ``K.diagonal()`` is local (this rank's entries of the diagonal).
    Entries cannot be indexed (``K[i, j]``), so ``preconditioner="pivchol"`` is not available;
    ``"nystrom"`` and ``"jacobi"`` are.

    Example (run on every rank, e.g. under ``torchrun --nproc_per_node=2``)::

        K = NTKOperator(model, X_r, dtype=torch.float64)
        alpha, info = nks.solve(K, Y_r.reshape(-1), noise=1e-2)     # rows of (Θ + σ²I)⁻¹ y
        mean = K.cross_matmul(X_test, alpha)                        # Θ(X*, X) α, on every rank
        kappa = nks.condition_number(K, noise=1e-2)                 # of the whole kernel
    """

    def __init__(
        self,
        model: nn.Module | LinearOperator,
        X_local: Tensor | None = None,
        *,
        group=None,
        timeout: float = 60.0,
        _shard: _Shard | None = None,
        **operator_kwargs,
    ):
        if _shard is None:
            local, _shard = _build(model, X_local, group, timeout, operator_kwargs)
        else:  # rebuilt by linear_operator from its representation: NTKOperator(local, _shard=...)
            local = model
        super().__init__(local, _shard=_shard)
        self.local: _LocalNTKOperator = local
        self._shard = _shard

    # -- what the solvers ask for -------------------------------------------------------------
    @property
    def process_group(self):
        """The process group the rows are sharded over."""
        return self._shard.group

    @property
    def rank(self) -> int:
        return self._shard.rank

    @property
    def world_size(self) -> int:
        return self._shard.world

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        """Samples held by each rank, in rank order."""
        return self._shard.sizes

    @property
    def num_outputs(self) -> int:
        return self.local.num_outputs

    @property
    def global_size(self) -> int:
        """Rows of the whole kernel, ``N·C`` over all ranks."""
        return sum(self._shard.sizes) * self.num_outputs

    @property
    def row_offset(self) -> int:
        """The first row of the whole kernel held by this rank."""
        return sum(self._shard.sizes[: self._shard.rank]) * self.num_outputs

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def backend(self) -> str:
        return self.local.backend

    @property
    def stats(self) -> ProductStats:
        """Time and bytes of this rank's products so far (reset with :meth:`reset_stats`)."""
        return self._shard.stats

    def reset_stats(self) -> None:
        self._shard.stats = ProductStats()

    def __repr__(self) -> str:
        return (
            f"distributed.NTKOperator(rank={self.rank} of {self.world_size}, local rows "
            f"{self.shape[0]} of {self.global_size}, N_r={self.local.X1.shape[0]}, "
            f"C={self.num_outputs}, P={self.local.num_params}, backend={self.backend!r}, dtype={self.dtype})"
        )

    # -- LinearOperator interface -------------------------------------------------------------
    def _size(self) -> torch.Size:
        return self.local.shape

    def _transpose_nonbatch(self) -> "NTKOperator":
        return self

    def _diagonal(self) -> Tensor:
        return self.local.diagonal()

    def matmul(self, other):
        if isinstance(other, LinearOperator):
            raise TypeError("a distributed NTKOperator multiplies tensors (this rank's rows), not operators")
        return self._product(other, None)

    def __matmul__(self, other):
        return self.matmul(other)

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self._product(rhs, None)

    def _getitem(self, row_index, col_index, *batch_indices):
        raise TypeError(_NO_INDEXING)

    def _get_indices(self, row_index, col_index, *batch_indices):
        raise TypeError(_NO_INDEXING)

    def to_dense(self) -> Tensor:
        raise TypeError(
            "a distributed NTKOperator has no local dense matrix (its products need every rank); "
            "use K.dense_rows() for this rank's rows of the whole kernel, or K.local.to_dense() "
            "for the block of this rank's own samples"
        )

    def _bilinear_derivative(self, left_vecs, right_vecs):
        return (None,) * len(self.representation())

    # -- products -----------------------------------------------------------------------------
    def dense_rows(self) -> Tensor:
        """This rank's rows of the whole kernel ``Θ(X_r, X)``, shape (N_r·C, N·C). Collective;
        made as ``K @ I`` with this rank's rows of the identity (N·C columns): small N only."""
        n, off = self.global_size, self.row_offset
        eye = torch.zeros(self.shape[0], n, dtype=self.dtype, device=self.device)
        eye[:, off : off + self.shape[0]] = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return self._product(eye, None)

    def cross(self, X_test: Tensor) -> _LocalNTKOperator:
        """This rank's rows of the cross-kernel to replicated inputs: ``Θ(X_r, X_test)``.

        Args:
            X_test: inputs, the same on every rank.  # shape: (M, *in_shape)

        Returns:
            A (local, not collective) :class:`ntkscale.NTKOperator` of shape (N_r·C, M·C) on this
            rank's samples and the same weight snapshot; its ``.T`` is ``Θ(X_test, X_r)``. Sum
            ``Θ(X_test, X_r) @ v_r`` over ranks with :meth:`cross_matmul` (one all-reduce).
        """
        loc = self.local
        X2 = self._test_inputs(X_test)
        state = replace(loc._st, square=False, rows=None, cols=None, cache={}, choice={})
        return _LocalNTKOperator(loc.X1, X2, *loc.params, *loc.fixed, _state=state)

    def cross_matmul(self, X_test: Tensor, V: Tensor) -> Tensor:
        """``Θ(X_test, X) V = Σ_r Θ(X_test, X_r) V_r``, the same on every rank. Collective.

        ``J_rᵀ V_r`` on each rank, one all-reduce, then ``J(X_test)`` on every rank: e.g. the
        NTK-GP mean ``Θ(X*, X) α`` from the rows of ``α`` that :func:`ntkscale.solve` returned.

        Args:
            X_test: inputs, the same on every rank.  # shape: (M, *in_shape)
            V: this rank's rows.  # shape: (N_r·C,) or (N_r·C, k)

        Returns:
            The product.  # shape: (M·C,) or (M·C, k)
        """
        return self._product(V, self._test_inputs(X_test))

    def _test_inputs(self, X_test: Tensor) -> Tensor:
        loc = self.local
        dtype = self._shard.dtype
        X2 = _check_data(X_test, "X_test", loc.dtype, loc.device, dtype)
        if X2.shape[1:] != loc.X1.shape[1:]:
            raise ValueError(
                f"X_test must have the per-sample shape of the training data {tuple(loc.X1.shape[1:])}; "
                f"got {tuple(X2.shape)}"
            )
        return X2

    def _product(self, rhs: Tensor, X_out: Tensor | None) -> Tensor:
        """``J(X_out) Σ_r J_rᵀ rhs_r``; ``X_out`` None for this rank's own samples."""
        sh, loc = self._shard, self.local
        C, N_r, P = self.num_outputs, loc.X1.shape[0], loc.num_params
        stats = sh.stats
        t0 = time.perf_counter()
        problem = _rhs_problem(rhs, loc)
        k = 0 if problem else (1 if rhs.ndim == 1 else rhs.shape[1])
        # 1. every rank's right-hand side is valid, and all have k columns
        head = torch.zeros(sh.world + 1, dtype=torch.float64, device=self.device)
        head[sh.rank] = 1.0 if problem else 0.0
        head[sh.world] = k
        head = all_reduce_sum(head, sh.group, "the check before an NTK product").tolist()
        t1 = time.perf_counter()
        bad = [r for r in range(sh.world) if head[r]]
        if problem:
            raise ValueError(f"rank {sh.rank}: {problem}")
        if bad:
            raise DistributedError(
                f"rank(s) {bad} rejected their right-hand side of the NTK product (their error says "
                f"why); rank {sh.rank} stops too"
            )
        if head[sh.world] != k * sh.world:
            raise ValueError(
                f"the ranks passed different numbers of right-hand sides to the NTK product (rank "
                f"{sh.rank}: {k}; {int(head[sh.world])} over {sh.world} ranks); every rank must pass k columns"
            )
        # 2. J_rᵀ v_r on this shard, summed over ranks in one all-reduce with a status per rank
        data, backend = loc._data(), loc._st.backend
        V = rhs.detach().reshape(N_r, C, k)
        failure = None
        try:
            U = backend.vjp(data, data.X1, V)
            flat = flatten(U).reshape(-1)  # shape: (k * P,)
        except Exception as err:  # report it to the other ranks before raising it here
            failure = err
            flat = torch.zeros(k * P, dtype=self.dtype, device=self.device)
        status = torch.zeros(sh.world, dtype=self.dtype, device=self.device)
        status[sh.rank] = 1.0 if failure is not None else 0.0
        t2 = time.perf_counter()
        buf = all_reduce_sum(torch.cat([flat, status]), sh.group, "the all-reduce of an NTK product")
        t3 = time.perf_counter()
        if failure is not None:
            raise failure
        failed = [r for r, s in enumerate(buf[k * P :].tolist()) if s]
        if failed:
            raise DistributedError(
                f"rank(s) {failed} raised during the NTK product (their error says why); rank {sh.rank} stops too"
            )
        U = unflatten(buf[: k * P].reshape(k, P), loc.params)
        # 3. J applied locally (to this shard, or to replicated test inputs)
        X = data.X1 if X_out is None else X_out
        out = backend.jvp(data, X, U).reshape(-1, k)
        t4 = time.perf_counter()
        stats.products += 1
        stats.local_seconds += (t2 - t1) + (t4 - t3)
        stats.allreduce_seconds += (t1 - t0) + (t3 - t2)
        stats.allreduce_bytes += buf.numel() * buf.element_size() + 8 * (sh.world + 1)
        return out.squeeze(-1) if rhs.ndim == 1 else out


_NO_INDEXING = (
    "a distributed NTKOperator cannot be indexed: its rows live on different ranks. Use "
    "K.local[...] for the block of this rank's samples, K.cross(X) for a cross-kernel, or a "
    "preconditioner that needs no rows ('nystrom', 'jacobi')"
)


def _rhs_problem(v, loc: _LocalNTKOperator) -> str | None:
    """Why ``v`` is not a valid right-hand side for this rank's operator ``loc`` (None when it is)."""
    if not isinstance(v, Tensor):
        return f"the right-hand side must be a torch.Tensor, got {type(v).__name__}"
    try:
        loc._check_rhs(v)
    except (ValueError, TypeError) as err:
        return f"{err} (this rank's samples)"
    if v.ndim == 2 and v.shape[1] == 0:
        return "the right-hand side has no columns"
    return None


# -- construction -------------------------------------------------------------------------------

_CONTROL_GROUPS: dict = {}


def _control_group(group):
    """A gloo group over the ranks of ``group`` for the construction's checks (``group`` itself
    when it is gloo; ``monitored_barrier`` and object collectives need gloo)."""
    if dist.get_backend(group) == "gloo":
        return group
    if group not in _CONTROL_GROUPS:
        ranks = dist.get_process_group_ranks(group)
        _CONTROL_GROUPS[group] = dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=True)
    return _CONTROL_GROUPS[group]


def _build(model, X_local, group, timeout, operator_kwargs):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "ntkscale.distributed.NTKOperator needs an initialized torch.distributed process group: "
            "call torch.distributed.init_process_group(...) first (torchrun sets its environment), "
            "or use ntkscale.NTKOperator in a single process"
        )
    if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    group = dist.group.WORLD if group is None else group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ctrl = _control_group(group)
    collective(
        "the barrier at the construction of a distributed NTKOperator",
        ctrl,
        lambda: dist.monitored_barrier(ctrl, timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True),
    )
    local, error = None, None
    try:
        local = _LocalNTKOperator(model, X_local, **operator_kwargs)
    except Exception as err:  # exchanged first, so every rank raises, not only this one
        error = err
    summaries: list = [None] * world
    mine = _summary(local, X_local, error)
    collective(
        "the exchange of shard summaries at the construction of a distributed NTKOperator",
        ctrl,
        lambda: dist.all_gather_object(summaries, mine, group=ctrl),
    )
    problems = _problems(summaries)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ShardError(
            f"the shards of the distributed NTKOperator are bad or inconsistent (checked on all "
            f"{world} ranks; this is rank {rank}):\n{lines}"
        ) from error
    assert local is not None
    shard = _Shard(
        group=group,
        rank=rank,
        world=world,
        sizes=tuple(s["samples"] for s in summaries),
        dtype=operator_kwargs.get("dtype"),
    )
    return local, shard


def _summary(local, X_local, error) -> dict:
    if error is not None:
        return {"error": f"{type(error).__name__}: {error}"}
    return {
        "error": None,
        "samples": int(local.X1.shape[0]),
        "sample_shape": tuple(local.X1.shape[1:]),
        "dtype": str(local.dtype),
        "outputs": local.num_outputs,
        "params": local.num_params,
        "fingerprint": _weights_fingerprint(local),
    }


def _weights_fingerprint(local) -> list:
    """Per tensor of the network (parameters and fixed buffers, by name): its sum, sum of squares
    and inner product with fixed pseudo-random weights — order-sensitive, so permuted or swapped
    weights differ too, computed where the tensors are (no copy to the host)."""
    out = []
    gen = torch.Generator().manual_seed(0)
    names = (*local._st.fm.names, *local._st.fm.fixed_names)
    for name, t in zip(names, (*local.params, *local.fixed)):
        if not t.is_floating_point():
            out.append((name, float(t.sum().item())))
            continue
        q = t.detach().reshape(-1).double()
        w = torch.rand(q.numel(), generator=gen, dtype=torch.float64).to(q.device)
        out.append((name, q.sum().item(), q.square().sum().item(), (q * w).sum().item()))
    return out


def _problems(summaries: list[dict]) -> list[str]:
    problems = [f"rank {r}: {s['error']}" for r, s in enumerate(summaries) if s["error"]]
    if problems:
        return problems
    for key, what in (
        ("sample_shape", "per-sample shape of X_local"),
        ("dtype", "dtype"),
        ("outputs", "number of outputs C"),
        ("params", "number of parameters P"),
    ):
        values = [s[key] for s in summaries]
        if any(v != values[0] for v in values):
            listed = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            problems.append(f"the {what} differs across ranks ({listed})")
    if not problems:
        ref = summaries[0]["fingerprint"]
        for r, s in enumerate(summaries[1:], start=1):
            differ = [a[0] for a, b in zip(s["fingerprint"], ref)
                      if a[0] != b[0] or any(abs(x - y) > 1e-9 * max(1.0, abs(y)) for x, y in zip(a[1:], b[1:]))]
            if differ or len(s["fingerprint"]) != len(ref):
                problems.append(
                    f"rank {r} has different weights from rank 0 (in {', '.join(differ) or 'their names'}): "
                    f"load or broadcast the same weights on every rank"
                )
    return problems


from .gp.sharded import NTKGP  # noqa: E402  (the GP adapter over this module's operator)
