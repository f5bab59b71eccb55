"""``NTKOperator``: the empirical neural tangent kernel as a lazy ``linear_operator.LinearOperator``.

``Θ(x, x') = J(x) J(x')ᵀ`` with ``J = ∂f/∂θ``. Rows and columns are ordered ``(sample, output)``
row-major: row ``i*C + c`` is output c of sample i.

Examples:
    >>> import torch, ntkscale as nks
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    >>> X = torch.randn(10, 3)
    >>> K = nks.NTKOperator(model, X)
    >>> K.shape
    torch.Size([20, 20])
    >>> v = torch.randn(20)
    >>> torch.allclose(K @ v, K.to_dense() @ v, atol=1e-4)
    True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from .backends import BACKENDS, Backend, KernelData, get_backend
from .functional import (
    FunctionalModel,
    activation_bytes_per_sample,
    default_chunk_size,
    select_parameters,
)

__all__ = ["NTKOperator", "NonDeterministicModelError"]

log = logging.getLogger("ntkscale")

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for temporaries: activations of a chunk, Jacobian blocks


class NonDeterministicModelError(ValueError):
    """The model's outputs change between calls or depend on the rest of the batch."""


@dataclass(eq=False)
class _State:
    """What an operator is besides its tensors; shared by every copy linear_operator rebuilds."""

    fm: FunctionalModel
    backend: Backend
    num_param_tensors: int
    square: bool
    chunk_size: int
    memory_budget: int
    factor_budget: int | None = None
    rows: Tensor | None = None  # CPU LongTensor into the N1*C rows, None for all
    cols: Tensor | None = None  # CPU LongTensor into the N2*C columns, None for all
    cache: dict = field(default_factory=dict)
    choice: dict = field(default_factory=dict)  # the cost model's estimates when backend="auto"


class NTKOperator(LinearOperator):
    """The empirical NTK of ``model`` on data ``X1`` (and ``X2``), never formed unless asked.

    Args:
        model: any ``nn.Module`` mapping a batch ``X`` (n, *in_shape) to (n, C) or (n,).
        X1: data, shape (N, *in_shape). Rows of the operator.
        X2: data for the columns (the cross-kernel ``Θ(X1, X2)``); ``None`` for ``Θ(X1, X1)``.
        backend: ``"auto"`` (a cost model picks and logs its choice at INFO), ``"autodiff"``,
            ``"structured"``, ``"keops"``, ``"cuda"`` or ``"dense"``.
        chunk_size: samples per forward/backward pass; default from ``memory_budget``.
        params: the parameters the kernel is taken over: names (``"2.weight"``, or a submodule
            prefix such as ``"2"``) or the parameter tensors; default all that require grad.
        dtype: cast data, parameters and floating buffers to this dtype (e.g. ``torch.float64``).
        allow_nondeterministic: skip the refusal of models whose outputs are random (dropout in
            train mode) or batch-dependent (BatchNorm in train mode).
        memory_budget: bytes the operator may spend on temporaries (default 256 MiB).
        factor_budget: bytes of per-layer factors the structured backends may cache (default
            4 GiB); beyond it they are recomputed chunk by chunk on every product.

    The operator holds snapshots of the model's parameters and buffers, taken at construction:
    training the model afterwards does not change the kernel, and ``K.to(...)``/``K.double()``
    never move or modify the model. ``to_dense()`` is computed on every call (not cached), so an
    O((NC)²) matrix lives only as long as the caller keeps it.
    """

    def __init__(
        self,
        model: nn.Module | Tensor,
        X1: Tensor | None = None,
        X2: Tensor | None = None,
        *tensors: Tensor,
        backend: str = "auto",
        chunk_size: int | None = None,
        params: str | Tensor | Iterable[str | Tensor] | None = None,
        dtype: torch.dtype | None = None,
        allow_nondeterministic: bool = False,
        memory_budget: int | None = None,
        factor_budget: int | None = None,
        _state: _State | None = None,
    ):
        if _state is None:
            args, _state = _build(
                model, X1, X2, backend, chunk_size, params, dtype, allow_nondeterministic,
                memory_budget, factor_budget,
            )
        else:
            # Rebuilt by linear_operator from its representation: NTKOperator(X1, X2, *params,
            # *fixed, _state=...). The positional names are shifted by one in this form.
            args = (model, X1, X2, *tensors)
        super().__init__(*args, _state=_state)
        self._st = _state
        n = _state.num_param_tensors
        self.X1, self.X2 = args[0], args[1]
        self.params = tuple(args[2 : 2 + n])
        self.fixed = tuple(args[2 + n :])

    # -- properties -----------------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        """C, the number of network outputs per sample."""
        return self._st.fm.num_outputs

    @property
    def backend(self) -> str:
        """The name of the backend doing the products."""
        return self._st.backend.name

    @property
    def chunk_size(self) -> int:
        return self._st.chunk_size

    @property
    def num_params(self) -> int:
        """P, the number of parameters the kernel is taken over."""
        return sum(p.numel() for p in self.params)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.X1.device

    def factor_bytes(self) -> int | None:
        """Bytes of the per-layer factors the structured backends cache for this operator (both
        data sides), estimated from one sample; ``None`` for backends without factors."""
        from .backends.structured import StructuredBackend

        backend = self._st.backend
        if not isinstance(backend, StructuredBackend):
            return None
        data = self._data()
        total = backend.factor_bytes(data, data.X1)
        return total if self._st.square else total + backend.factor_bytes(data, data.X2)

    @property
    def cost_estimates(self) -> dict:
        """The cost model's estimates behind ``backend="auto"`` (empty for an explicit backend)."""
        return dict(self._st.choice)

    def _estimates(self) -> dict:
        """The cost model's estimates for this operator (computed once per operator)."""
        st = self._st
        if "cost" in st.choice:
            return st.choice
        hit = st.cache.get("cost-estimate")
        if hit is None:
            from .backends.cost import estimate

            hit = estimate(st.fm, self.params, self.fixed, self.X1, self.X2, st.square, st.memory_budget,
                           st.factor_budget)
            st.cache["cost-estimate"] = hit
        return hit

    def product_macs(self, k: int = 1) -> float:
        """Estimated multiply-adds (over the backend's relative rate) of ``self @ V`` with ``k``
        columns, from the cost model of ``backend="auto"`` (:mod:`ntkscale.backends.cost`)."""
        est = self._estimates()
        per = est["cost"].get(self.backend)
        if per is None:  # a backend the model does not price: a VJP and a JVP pass
            per = 2.0 * (est["N1"] + est["N2"]) * self.num_params
        return float(per) * k

    def block_macs(self, rows: int, cols: int) -> float:
        """Estimated multiply-adds of an explicit block ``self[rows, cols].to_dense()``.

        The structured family builds blocks by GEMMs over the per-layer factors, about
        ``rows · cols · Σ_l o_l + (rows/C)(cols/C) · Σ_l d_l``; other backends (and layers the
        factors do not cover) go through explicit Jacobians, no cheaper than products: ``inf``.
        """
        est = self._estimates()
        layers = est["layers"]
        if (
            self.backend not in ("structured", "keops", "cuda")
            or not layers
            or est["unstructured_params"]
            or any(L != 1 for L, _, _ in layers)
        ):
            return float("inf")
        C = self.num_outputs
        return rows * cols * sum(o for _, _, o in layers) + rows * cols / C**2 * sum(d + 1 for _, d, _ in layers)

    def jvp(self, tangents: Tensor) -> Tensor:
        """``J(X1) U``: Jacobian-vector products with parameter-space tangents, batched.

        Args:
            tangents: one column per tangent, rows in the order of :attr:`params` flattened.
                # shape: (P,) or (P, k)

        Returns:
            Rows ordered (sample, output) like the operator's.  # shape: (rows,) or (rows, k)
        """
        from .backends.base import _unflatten

        P = self.num_params
        if not torch.is_tensor(tangents) or tangents.dim() not in (1, 2) or tangents.shape[0] != P:
            shape = tuple(tangents.shape) if torch.is_tensor(tangents) else type(tangents).__name__
            raise ValueError(f"tangents must have shape ({P},) or ({P}, k) (P parameters), got {shape}")
        vec = tangents.dim() == 1
        T = (tangents.unsqueeze(-1) if vec else tangents).to(dtype=self.dtype, device=self.device)
        st = self._st
        out = st.backend.jvp(self._data(), self.X1, _unflatten(T.mT.contiguous(), self.params))  # (N1, C, k)
        out = out.reshape(-1, T.shape[1]).detach()
        if st.rows is not None:
            out = out[st.rows.to(out.device)]
        return out.squeeze(-1) if vec else out

    def _carry_cache(self, X1: Tensor, X2: Tensor, square: bool) -> dict:
        """The cache of a slice or transpose: the entries of data sides it shares with this one
        (per-layer factors, their sizes, the diagonal) carry over, so slicing a cross-kernel
        into blocks never recomputes the factors of an unchanged side."""
        old, new = self._st.cache, {}
        for name in ("layout", "dense-layers"):
            if name in old:
                new[name] = old[name]
        data = self._data()
        sig1 = data.signature(X1)
        sig2 = sig1 if square else data.signature(X2)
        for side in ("factors1", "factors2"):
            for suffix in ("", "-bytes"):
                entry = old.get(side + suffix)
                if entry is None:
                    continue
                if entry[0] == sig1:
                    new["factors1" + suffix] = entry
                if not square and entry[0] == sig2:
                    new["factors2" + suffix] = entry
        if square and "diag" in old and old["diag"][0] == sig1:
            new["diag"] = old["diag"]
        return new

    def with_backend(self, backend: str) -> "NTKOperator":
        """The same kernel computed by another backend (not ``"auto"``).

        Caches carry over where the backends share them: the structured family (structured,
        keops, cuda) reuses one set of per-layer factors.
        """
        if backend == "auto" or backend not in BACKENDS:
            raise ValueError(
                f"with_backend needs an explicit backend, one of "
                f"{', '.join(repr(b) for b in BACKENDS if b != 'auto')}; got {backend!r}"
            )
        state = replace(self._st, backend=get_backend(backend), choice={})
        return NTKOperator(self.X1, self.X2, *self.params, *self.fixed, _state=state)

    def _data(self) -> KernelData:
        st = self._st
        return KernelData(
            fm=st.fm,
            params=self.params,
            fixed=self.fixed,
            X1=self.X1,
            X2=self.X1 if st.square else self.X2,
            square=st.square,
            chunk_size=st.chunk_size,
            memory_budget=st.memory_budget,
            cache=st.cache,
            factor_budget=st.factor_budget,
        )

    def __repr__(self) -> str:
        m, n = self.shape
        return (
            f"NTKOperator(shape=({m}, {n}), N1={self.X1.shape[0]}, N2={self.X2.shape[0]}, "
            f"C={self.num_outputs}, P={self.num_params}, backend={self.backend!r}, "
            f"chunk_size={self.chunk_size}, dtype={self.dtype})"
        )

    # -- LinearOperator interface -----------------------------------------------------------------
    def _size(self) -> torch.Size:
        C = self.num_outputs
        st = self._st
        rows = self.X1.shape[0] * C if st.rows is None else st.rows.numel()
        cols = self.X2.shape[0] * C if st.cols is None else st.cols.numel()
        return torch.Size((rows, cols))

    def _transpose_nonbatch(self) -> "NTKOperator":
        st = self._st
        if st.square and _same_index(st.rows, st.cols):
            return self
        state = replace(st, rows=st.cols, cols=st.rows, square=False,
                        cache=self._carry_cache(self.X2, self.X1, False))
        return NTKOperator(self.X2, self.X1, *self.params, *self.fixed, _state=state)

    def matmul(self, other):
        if torch.is_tensor(other):
            self._check_rhs(other)
        return super().matmul(other)

    def __matmul__(self, other):
        return self.matmul(other)

    def _matmul(self, rhs: Tensor) -> Tensor:
        # rhs: shape (n_cols, k) -> (n_rows, k)
        st, C = self._st, self.num_outputs
        k = rhs.shape[-1]
        N2 = self.X2.shape[0]
        if st.cols is None:
            V = rhs.reshape(N2, C, k)
        else:
            V = rhs.new_zeros(N2 * C, k)
            V[st.cols.to(rhs.device)] = rhs
            V = V.reshape(N2, C, k)
        out = st.backend.matmul(self._data(), V.contiguous()).reshape(-1, k)
        if st.rows is not None:
            out = out[st.rows.to(out.device)]
        return out

    def _diagonal(self) -> Tensor:
        st = self._st
        if not (st.square and _same_index(st.rows, st.cols)):
            idx = torch.arange(self.shape[0], device=self.device)
            return self._get_indices(idx, idx)
        data = self._data()
        diag = data.cached("diag", (self.X1,), lambda: st.backend.diagonal(data)).reshape(-1)
        return diag if st.rows is None else diag[st.rows.to(diag.device)]

    def _getitem(self, row_index, col_index, *batch_indices) -> "NTKOperator":
        if batch_indices:
            raise IndexError("NTKOperator has no batch dimensions")
        st, C = self._st, self.num_outputs
        rows = _compose(st.rows, self.X1.shape[0] * C, row_index)
        cols = _compose(st.cols, self.X2.shape[0] * C, col_index)
        X1, new_rows = _compact(self.X1, rows, C)
        if st.square and torch.equal(rows, cols):
            state = replace(st, rows=new_rows, cols=new_rows, cache=self._carry_cache(X1, X1, True))
            return NTKOperator(X1, X1, *self.params, *self.fixed, _state=state)
        X2, new_cols = _compact(self.X2, cols, C)
        state = replace(st, rows=new_rows, cols=new_cols, square=False,
                        cache=self._carry_cache(X1, X2, False))
        return NTKOperator(X1, X2, *self.params, *self.fixed, _state=state)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        if batch_indices:
            raise IndexError("NTKOperator has no batch dimensions")
        row_index, col_index = torch.broadcast_tensors(row_index, col_index)
        st = self._st
        if st.square and _same_index(st.rows, st.cols) and torch.equal(row_index, col_index):
            # diagonal entries: from the exact diagonal, no block of the kernel
            return self._diagonal()[row_index.to(self.device)]
        r_u, r_inv = torch.unique(row_index.reshape(-1).cpu(), return_inverse=True)
        c_u, c_inv = torch.unique(col_index.reshape(-1).cpu(), return_inverse=True)
        block = self._getitem(r_u, c_u).to_dense()
        dev = block.device
        return block[r_inv.to(dev), c_inv.to(dev)].reshape(row_index.shape)

    def to_dense(self) -> Tensor:
        """The explicit matrix, shape (rows, cols). O(rows·cols) memory; computed on each call."""
        st = self._st
        data = self._data()
        G = st.backend.gram(data, data.X1, data.X2, rows=st.rows)  # (rows, N2*C)
        if st.cols is not None:
            G = G[:, st.cols.to(G.device)]
        return G

    def _bilinear_derivative(self, left_vecs, right_vecs):
        # The data and parameter snapshots are constants of the kernel: no gradient reaches
        # them (gradients with respect to the right-hand side flow as usual).
        return (None,) * len(self._args)

    # -- checks ---------------------------------------------------------------------------------
    def _check_rhs(self, v: Tensor) -> None:
        n_cols = self.shape[-1]
        C = self.num_outputs
        if v.ndim not in (1, 2):
            raise ValueError(
                f"the right-hand side must have shape ({n_cols},) or ({n_cols}, k); got "
                f"{tuple(v.shape)} (NTKOperator has no batch dimensions)"
            )
        if v.shape[0] != n_cols:
            raise ValueError(
                f"the right-hand side has {v.shape[0]} rows but the operator has {n_cols} columns "
                f"(N={self.X2.shape[0]} samples x C={C} outputs, ordered (sample, output)); "
                f"got shape {tuple(v.shape)}"
            )
        if v.dtype != self.dtype:
            raise TypeError(
                f"the right-hand side is {v.dtype} but the operator is {self.dtype}; convert one "
                f"(e.g. v.to({self.dtype}) or K.to({v.dtype}))"
            )
        if v.device != self.device:
            raise ValueError(
                f"the right-hand side is on {v.device} but the operator is on {self.device}"
            )
        if not torch.isfinite(v).all():
            raise ValueError("the right-hand side contains NaN or inf")


# -- construction -------------------------------------------------------------------------------


def _build(
    model, X1, X2, backend, chunk_size, params, dtype, allow_nondeterministic, memory_budget, factor_budget
):
    if not isinstance(model, nn.Module):
        raise TypeError(f"NTKOperator(model, X): model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    budget = int(memory_budget or DEFAULT_MEMORY_BUDGET)
    names, fixed_names = select_parameters(model, params)
    state_dict = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    p = [state_dict[n].detach().clone() for n in names]
    fx = [state_dict[n].detach().clone() for n in fixed_names]
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        p = [t.to(dtype) for t in p]
        fx = [t.to(dtype) if t.is_floating_point() else t for t in fx]
    for n, t in zip(names, p):
        if not torch.isfinite(t).all():
            raise ValueError(f"parameter {n!r} contains NaN or inf")
    param_dtype, param_device = p[0].dtype, p[0].device
    for n, t in zip(names, p):
        if t.dtype != param_dtype or t.device != param_device:
            raise ValueError(
                f"parameters must share one dtype and device: {names[0]!r} is {param_dtype} on "
                f"{param_device} but {n!r} is {t.dtype} on {t.device}; pass dtype=... or move the model"
            )

    X1 = _check_data(X1, "X1" if X2 is not None else "X", param_dtype, param_device, dtype)
    square = X2 is None or X2 is X1
    X2 = X1 if square else _check_data(X2, "X2", param_dtype, param_device, dtype)
    if not square and X2.shape[1:] != X1.shape[1:]:
        raise ValueError(
            f"X1 and X2 must have the same per-sample shape: X1 has {tuple(X1.shape)}, X2 has {tuple(X2.shape)}"
        )

    fm = FunctionalModel(model, tuple(names), tuple(fixed_names))
    fm = _probe(fm, p, fx, X1, allow_nondeterministic)
    if not square:
        _run(fm, p, fx, X2[:2], "X2")

    if chunk_size is None:
        chunk_size = default_chunk_size(activation_bytes_per_sample(fm, p, fx, X1[:1]), budget)

    choice: dict = {}
    if backend == "auto":
        from .backends.cost import choose

        choice = choose(fm, p, fx, X1, X2, square, budget, factor_budget)
        backend = choice["backend"]
        log.info("ntkscale: backend='auto' picked %r; %s", backend, choice["reason"])
    impl = get_backend(backend)
    state = _State(
        fm=fm,
        backend=impl,
        num_param_tensors=len(p),
        square=square,
        chunk_size=chunk_size,
        memory_budget=budget,
        factor_budget=factor_budget,
        choice=choice,
    )
    return (X1, X2, *p, *fx), state


def _check_data(X, name, param_dtype, param_device, dtype) -> Tensor:
    if not isinstance(X, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, ...), got {type(X).__name__}")
    if X.ndim < 1 or X.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, ...) with N >= 1, got {tuple(X.shape)}")
    X = X.detach()
    if X.device != param_device:
        raise ValueError(
            f"{name} is on {X.device} but the model's parameters are on {param_device}; move one of them"
        )
    if X.is_floating_point():
        if dtype is not None:
            X = X.to(dtype)
        if not torch.isfinite(X).all():
            bad = (~torch.isfinite(X)).reshape(X.shape[0], -1).any(1).nonzero().flatten()
            raise ValueError(
                f"{name} contains NaN or inf (in {bad.numel()} of {X.shape[0]} samples, first at "
                f"index {bad[0].item()})"
            )
        if X.dtype != param_dtype:
            raise TypeError(
                f"{name} is {X.dtype} but the model's parameters are {param_dtype}; pass "
                f"dtype={X.dtype} to cast both, or convert one of them"
            )
    return X


def _run(fm: FunctionalModel, p, fx, x: Tensor, name: str) -> Tensor:
    try:
        with torch.no_grad():
            return fm(p, fx, x)
    except Exception as err:  # the model rejected the input: say what came
        raise ValueError(
            f"{name} has shape {tuple(x.shape[1:])} per sample (batch {tuple(x.shape)}) but the "
            f"model rejected it: {type(err).__name__}: {err}"
        ) from err


def _probe(fm: FunctionalModel, p, fx, X: Tensor, allow_nondeterministic: bool) -> FunctionalModel:
    """Find C from one forward pass, and refuse random or batch-dependent models."""
    xs = X[: min(X.shape[0], 4)]
    names = dict(zip(fm.names, p))
    names.update(zip(fm.fixed_names, fx))
    try:
        with torch.no_grad():
            out = torch.func.functional_call(fm.module, names, (xs,))
    except Exception as err:
        raise ValueError(
            f"X has shape {tuple(X.shape)} ({tuple(X.shape[1:])} per sample) but the model "
            f"rejected it: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(out, Tensor):
        raise TypeError(f"the model must return a Tensor of shape (N, C) or (N,), got {type(out).__name__}")
    if out.ndim == 1 and out.shape[0] == xs.shape[0]:
        C, scalar = 1, True
    elif out.ndim == 2 and out.shape[0] == xs.shape[0]:
        C, scalar = out.shape[1], False
    else:
        raise ValueError(
            f"the model must map a batch of {xs.shape[0]} samples to shape ({xs.shape[0]}, C) or "
            f"({xs.shape[0]},); it returned {tuple(out.shape)}"
        )
    if not out.is_floating_point():
        raise TypeError(f"the model's output must be floating point, got {out.dtype}")
    fm = replace(fm, num_outputs=C, scalar_output=scalar)
    if allow_nondeterministic:
        return fm
    # Dropout gives a different output on a second call; BatchNorm in train mode makes a sample's
    # output depend on the rest of its batch. Either way J(x) is not a function of x alone.
    probe_fx = [t.clone() for t in fx]  # train-mode BatchNorm would update running stats in place
    why = None
    try:
        a = fm(p, probe_fx, xs)
        b = fm(p, probe_fx, xs)
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6 * (1 + a.abs().max().item())):
            why = "two evaluations on the same inputs disagree"
        elif xs.shape[0] > 1:
            c = fm(p, probe_fx, xs[:1])
            if not torch.allclose(a[:1], c, rtol=1e-4, atol=1e-5 * (1 + a.abs().max().item())):
                why = "a sample's output depends on the other samples in its batch"
    except Exception as err:  # e.g. BatchNorm in train mode on a batch of one
        why = f"evaluating one sample at a time failed ({type(err).__name__}: {err})"
    if why is not None:
        training = [type(m).__name__ for m in fm.module.modules() if m.training and _mode_dependent(m)]
        hint = (
            f" The model is in train mode with {sorted(set(training))}: call model.eval()."
            if training
            else ""
        )
        raise NonDeterministicModelError(
            f"the model's output is not a deterministic per-sample function: {why}, so its NTK is "
            f"not a kernel.{hint} Pass allow_nondeterministic=True to build the operator anyway."
        )
    return fm


def _mode_dependent(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm))


# -- index helpers ------------------------------------------------------------------------------


def _compose(current: Tensor | None, full: int, index) -> Tensor:
    """The flat ids (into the stored rows) that ``index`` selects from the current selection."""
    base = torch.arange(full) if current is None else current
    if isinstance(index, Tensor):
        index = index.cpu()
    return base[index].reshape(-1)


def _compact(X: Tensor, ids: Tensor, C: int) -> tuple[Tensor, Tensor | None]:
    """Keep only the samples ``ids`` touch; return the data subset and ids into it (None = all)."""
    samples = torch.div(ids, C, rounding_mode="floor")
    uniq, inv = torch.unique(samples, return_inverse=True)
    new_ids = inv * C + ids % C
    if uniq.numel() == X.shape[0] and torch.equal(uniq, torch.arange(X.shape[0])):
        X_sub = X
    else:
        X_sub = X[uniq.to(X.device)]
    if new_ids.numel() == X_sub.shape[0] * C and torch.equal(new_ids, torch.arange(new_ids.numel())):
        return X_sub, None
    return X_sub, new_ids


def _same_index(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a, b)
