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
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from ._checks import all_finite, check_vector_finite, nonfinite_samples
from .backends import BACKENDS, Backend, KernelData, get_backend
from .functional import (
    FunctionalModel,
    chunks,
    activation_bytes_per_sample,
    default_chunk_size,
    evaluation_mode,
    select_parameters,
)

__all__ = ["NTKOperator", "NonDeterministicModelError", "ProductCount", "count_products", "SmallChunkWarning"]

log = logging.getLogger("ntkscale")

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for temporaries: activations of a chunk, Jacobian blocks


@dataclass
class ProductCount:
    """What :func:`count_products` saw: products with any ``NTKOperator``, their columns (in all,
    and per product in ``widths``), and explicit ``to_dense()`` calls."""

    products: int = 0
    columns: int = 0
    dense: int = 0
    widths: list[int] = field(default_factory=list)


_COUNTERS: list[ProductCount] = []


class count_products:  # noqa: N801 (a context manager used like a function)
    """Count the products and explicit matrices of every ``NTKOperator`` inside a ``with`` block
    — e.g. to check that a path (GPyTorch's CG, a solver) never forms the dense kernel.

    Example:
        >>> import torch, ntkscale as nks
        >>> K = nks.NTKOperator(torch.nn.Linear(3, 2), torch.randn(4, 3))
        >>> with nks.count_products() as n:
        ...     _ = K @ torch.randn(8, 3)
        >>> (n.products, n.columns, n.widths, n.dense)
        (1, 3, [3], 0)
    """

    def __enter__(self) -> ProductCount:
        self.count = ProductCount()
        _COUNTERS.append(self.count)
        return self.count

    def __exit__(self, *exc) -> None:
        _COUNTERS.remove(self.count)


class NonDeterministicModelError(ValueError):
    """The model's outputs change between calls or depend on the rest of the batch."""


class SmallChunkWarning(UserWarning):
    """An explicit ``chunk_size`` far below what the memory budget allows (slow products)."""


SMALL_CHUNK_FACTOR = 8  # warn when the memory budget allows this many times the chunk given


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
        chunk_size: samples per forward/backward pass; default from ``memory_budget``. One far
            below what the budget allows (8x or more) gives a :class:`SmallChunkWarning`.
        params: the parameters the kernel is taken over: names (``"2.weight"``, or a submodule
            prefix such as ``"2"``) or the parameter tensors; default all that require grad.
        dtype: cast data, parameters and floating buffers to this dtype (e.g. ``torch.float64``).
        allow_nondeterministic: no longer supported; ``True`` raises
            :class:`NonDeterministicModelError` saying what to do instead. A model whose output is
            random (dropout in train mode) or depends on the rest of its batch (BatchNorm in train
            mode) has no NTK that is a kernel: call ``model.eval()`` first.
        memory_budget: bytes the operator may spend on temporaries (default 256 MiB). The
            autodiff backend also keeps its linearization within it: the forward and backward
            graphs of every chunk (up to about two copies of the activations of every sample),
            recorded by the first product, which make every later product backward passes only
            (about 0.6x the time); beyond it each product re-runs the forward passes.
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
        """Bytes of the state a backend keeps between products for this operator (both data
        sides), estimated from one sample: the structured backends' per-layer factors (kept
        within ``factor_budget``), the autodiff backend's linearization (kept within
        ``memory_budget``). ``None`` for backends that keep none."""
        backend = self._st.backend
        if not hasattr(backend, "factor_bytes"):
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
        """Estimated multiply-adds of ``self @ V`` with ``k`` columns, in GEMM-equivalents: the
        cost model's seconds (:mod:`ntkscale.backends.cost`, setup spread over the products it
        expects) times the device's GEMM rate, so they compare with :meth:`block_macs` and with
        the multiply-adds of a dense factorization."""
        est = self._estimates()
        seconds = est["cost"].get(self.backend)
        if seconds is None:  # a backend the model does not price: a VJP and a JVP pass
            return 2.0 * (est["N1"] + est["N2"]) * self.num_params * k
        return float(seconds) * float(est["gemm_macs"]) * k

    def block_macs(self, rows: int, cols: int) -> float:
        """Estimated multiply-adds of an explicit block ``self[rows, cols].to_dense()``.

        The structured family builds blocks by GEMMs over the per-layer factors, about
        ``rows · cols · Σ_l o_l + (rows/C)(cols/C) · Σ_l d_l``, plus the fixed cost of its calls
        (in multiply-adds at the GEMM rate, as :meth:`product_macs`); other backends (and layers
        the factors do not cover) go through explicit Jacobians, no cheaper than products: ``inf``.
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
        from .backends.cost import _rates

        C = self.num_outputs
        r = _rates(est["device"])
        calls = 4 * len(layers) * r.call_s["structured"] * r.gemm_macs  # per layer: 2 GEMMs, a scale, a sum
        gemms = rows * cols * sum(o for _, _, o in layers) + rows * cols / C**2 * sum(d + 1 for _, d, _ in layers)
        return gemms + calls

    def jvp(self, tangents: Tensor) -> Tensor:
        """``J(X1) U``: Jacobian-vector products with parameter-space tangents, batched.

        Args:
            tangents: one column per tangent, rows in the order of :attr:`params` flattened.
                # shape: (P,) or (P, k)

        Returns:
            Rows ordered (sample, output) like the operator's.  # shape: (rows,) or (rows, k)
        """
        from .backends.base import unflatten

        P = self.num_params
        if not torch.is_tensor(tangents) or tangents.dim() not in (1, 2) or tangents.shape[0] != P:
            shape = tuple(tangents.shape) if torch.is_tensor(tangents) else type(tangents).__name__
            raise ValueError(f"tangents must have shape ({P},) or ({P}, k) (P parameters), got {shape}")
        vec = tangents.dim() == 1
        T = (tangents.unsqueeze(-1) if vec else tangents).to(dtype=self.dtype, device=self.device)
        st = self._st
        out = st.backend.jvp(self._data(), self.X1, unflatten(T.mT.contiguous(), self.params))  # (N1, C, k)
        out = out.reshape(-1, T.shape[1]).detach()
        if st.rows is not None:
            out = out[st.rows.to(out.device)]
        return out.squeeze(-1) if vec else out

    def vjp(self, cotangents: Tensor) -> Tensor:
        """``J(X2)ᵀ V``: vector-Jacobian products with output-space cotangents, batched (the
        adjoint of :meth:`jvp` on the column side).

        Args:
            cotangents: one column per cotangent, rows ordered (sample, output) like the
                operator's columns.  # shape: (cols,) or (cols, k)

        Returns:
            Rows in the order of :attr:`params` flattened.  # shape: (P,) or (P, k)
        """
        from .backends.base import flatten

        n = self.shape[-1]
        if not torch.is_tensor(cotangents) or cotangents.dim() not in (1, 2) or cotangents.shape[0] != n:
            shape = tuple(cotangents.shape) if torch.is_tensor(cotangents) else type(cotangents).__name__
            raise ValueError(f"cotangents must have shape ({n},) or ({n}, k) (the operator's columns), got {shape}")
        vec = cotangents.dim() == 1
        V = (cotangents.unsqueeze(-1) if vec else cotangents).to(dtype=self.dtype, device=self.device)
        self._check_rhs(V)
        st, k, N2 = self._st, V.shape[1], self.X2.shape[0]
        if st.cols is not None:
            full = V.new_zeros(N2 * self.num_outputs, k)
            full[st.cols.to(V.device)] = V
            V = full
        U = st.backend.vjp(self._data(), self.X2, V.reshape(N2, self.num_outputs, k).contiguous())
        out = flatten(U).mT.detach()  # (P, k)
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

    def fingerprint(self) -> str:
        """A digest of everything that defines this kernel's entries (hex SHA-256).

        It covers the network's structure (class and ``repr`` of the module, the names of the
        parameters the kernel is taken over and of the fixed tensors, the output count), the
        values, shapes and dtypes of the parameters, of the fixed tensors (other parameters,
        buffers) and of the data ``X1`` (and ``X2``), the rows/columns selected by slicing, the
        backend and the dtype. Two operators with equal fingerprints have equal entries;
        caches keyed on it (e.g. :class:`ntkscale.solvers.TiledCholesky`'s resume) cannot mix
        kernels. Costs one pass over these tensors (no products).
        """
        from .solvers._utils import operator_fingerprint

        st = self._st
        mod = st.fm.module
        head = (type(mod).__module__, type(mod).__qualname__, repr(mod), st.fm.names, st.fm.fixed_names,
                st.fm.num_outputs, st.square, self.backend, str(self.dtype))
        return operator_fingerprint(
            [repr(head), self.X1, None if st.square else self.X2, st.rows, st.cols, *self.params, *self.fixed]
        )

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
        elif not isinstance(other, LinearOperator):
            raise TypeError(
                f"K @ v needs a torch.Tensor (or a LinearOperator) of shape ({self.shape[-1]},) or "
                f"({self.shape[-1]}, k); got {type(other).__module__}.{type(other).__name__}"
                + (
                    f"; convert it with torch.as_tensor(v, dtype={self.dtype}, device='{self.device}')"
                    if hasattr(other, "__array__") or isinstance(other, (list, tuple))
                    else ""
                )
            )
        return super().matmul(other)

    def __matmul__(self, other):
        return self.matmul(other)

    def _matmul(self, rhs: Tensor) -> Tensor:
        # rhs: shape (n_cols, k) -> (n_rows, k)
        st, C = self._st, self.num_outputs
        k = rhs.shape[-1]
        for count in _COUNTERS:
            count.products += 1
            count.columns += k
            count.widths.append(k)
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
        for count in _COUNTERS:
            count.dense += 1
        st = self._st
        if torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in self._args):
            # differentiable with respect to the data and parameters: through the products'
            # autograd (one column per unit vector; only where gradients are asked for)
            eye = torch.eye(self.shape[-1], dtype=self.dtype, device=self.device)
            return super().matmul(eye)
        data = self._data()
        G = st.backend.gram(data, data.X1, data.X2, rows=st.rows)  # (rows, N2*C)
        if st.cols is not None:
            G = G[:, st.cols.to(G.device)]
        return G

    def _bilinear_derivative(self, left_vecs, right_vecs):
        """Gradients of ``Σ_k l_kᵀ Θ r_k`` with respect to the data and the parameters.

        They flow only where the operator's tensors require grad (``K.requires_grad_(True)``);
        the snapshots taken at construction do not. With ``a = J(X1)ᵀ L`` and ``b = J(X2)ᵀ R``
        (one VJP pass each), the product rule gives ``∂(a·b) = ⟨L, ∂(J(X1) b)⟩ + ⟨R, ∂(J(X2) a)⟩``:
        a gradient of a JVP, chunk by chunk over each data side (memory O(P·k + chunk)).
        """
        args = self._args
        n = self._st.num_param_tensors
        wants = [torch.is_tensor(t) and t.requires_grad and t.is_floating_point() for t in args]
        if not any(wants[: 2 + n]):
            return (None,) * len(args)
        st, C = self._st, self.num_outputs
        if left_vecs.ndim == 1:
            left_vecs, right_vecs = left_vecs.unsqueeze(-1), right_vecs.unsqueeze(-1)
        k = left_vecs.shape[-1]

        def full(vecs, X, index):
            if index is None:
                return vecs.reshape(X.shape[0], C, k)
            out = vecs.new_zeros(X.shape[0] * C, k)
            out[index.to(vecs.device)] = vecs
            return out.reshape(X.shape[0], C, k)

        square = st.square  # then X1 holds both sides' data (X2 may be a copy of it)
        X1 = self.X1.detach()
        X2 = X1 if square else self.X2.detach()
        Lv = full(left_vecs.detach(), X1, st.rows)
        Rv = full(right_vecs.detach(), X2, st.cols)
        params = tuple(p.detach() for p in self.params)
        fixed = tuple(t.detach() for t in self.fixed)
        data = replace(self._data(), params=params, fixed=fixed, X1=X1, X2=X2, cache={})
        from .backends.autodiff import AutodiffBackend

        ad = AutodiffBackend()
        a, b = ad.vjp(data, X1, Lv), ad.vjp(data, X2, Rv)
        fm = st.fm
        g_params = [torch.zeros_like(p) for p in params]
        g_X = {0: torch.zeros_like(X1) if wants[0] else None, 1: torch.zeros_like(X2) if wants[1] else None}

        for side, (X, V, U) in enumerate(((X1, Lv, b), (X2, Rv, a))):
            x_grad = X.is_floating_point() and wants[0 if square else side]
            for sl in chunks(X.shape[0], st.chunk_size):

                def h(p, x, V=V[sl]):
                    t = torch.func.vmap(lambda u: torch.func.jvp(lambda q: fm(q, fixed, x), (p,), (u,))[1])(U)
                    return (t * V.permute(2, 0, 1)).sum()  # t: (k, n, C)

                gp, gx = torch.func.grad(h, argnums=(0, 1))(params, X[sl]) if x_grad else (
                    torch.func.grad(h)(params, X[sl]), None)
                for acc, g in zip(g_params, gp):
                    acc.add_(g)
                if gx is not None:
                    g_X[0 if square else side][sl] += gx
        out = [None] * len(args)
        out[0], out[1] = g_X[0], (None if square else g_X[1])
        for i, g in enumerate(g_params):
            out[2 + i] = g if wants[2 + i] else None
        return tuple(out)

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
        check_vector_finite(v)


# -- construction -------------------------------------------------------------------------------


def _build(
    model, X1, X2, backend, chunk_size, params, dtype, allow_nondeterministic, memory_budget, factor_budget
):
    if not isinstance(model, nn.Module):
        raise TypeError(f"NTKOperator(model, X): model must be a torch.nn.Module, got {type(model).__name__}")
    if allow_nondeterministic:
        raise NonDeterministicModelError(
            "allow_nondeterministic=True is no longer supported: a model whose output is random "
            "(dropout in train mode) or depends on its batch (BatchNorm in train mode) has no NTK "
            "that is a kernel, and no backend computes one. " + _WHAT_TO_DO
        )
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
        if not all_finite(t):
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
    fm = _probe(fm, p, fx, X1)
    if not square:
        _run(fm, p, fx, X2[:2], "X2")

    fitting = default_chunk_size(activation_bytes_per_sample(fm, p, fx, X1[:1]), budget)
    if chunk_size is None:
        chunk_size = fitting
    elif chunk_size * SMALL_CHUNK_FACTOR <= min(fitting, X1.shape[0]):
        warnings.warn(
            f"chunk_size={chunk_size} is far below the {min(fitting, X1.shape[0])} samples per pass "
            f"that the memory budget ({budget / 2**20:.0f} MiB) allows: every product makes "
            f"{math.ceil(X1.shape[0] / chunk_size)} passes where {math.ceil(X1.shape[0] / fitting)} "
            f"would do, and small passes are slow. Leave chunk_size=None to use the budget, or "
            f"set memory_budget= to bound memory instead.",
            SmallChunkWarning,
            stacklevel=3,
        )

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
        if not all_finite(X):  # in slices: no temporaries the size of X
            bad = nonfinite_samples(X)
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


def _probe(fm: FunctionalModel, p, fx, X: Tensor) -> FunctionalModel:
    """Find C from one forward pass, and refuse random or batch-dependent models."""
    xs = X[: min(X.shape[0], 4)]
    names = dict(zip(fm.names, p))
    names.update(zip(fm.fixed_names, fx))

    def call(x):
        with torch.no_grad(), evaluation_mode():
            return torch.func.functional_call(fm.module, names, (x,))

    try:
        out = call(xs)
    except Exception as err:
        if _train_mode_layers(fm.module):  # e.g. BatchNorm in train mode on a batch of one
            raise NonDeterministicModelError(
                f"the model rejected X in train mode ({type(err).__name__}: {err}). "
                + _what_to_do(fm.module)
            ) from err
        raise ValueError(
            f"X has shape {tuple(X.shape)} ({tuple(X.shape[1:])} per sample) but the model "
            f"rejected it: {type(err).__name__}: {err}.{_single_sample_hint(call, X)}"
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
            f"({xs.shape[0]},); it returned {tuple(out.shape)} for X of shape {tuple(X.shape)}."
            f"{_single_sample_hint(call, X)}"
        )
    if not out.is_floating_point():
        raise TypeError(f"the model's output must be floating point, got {out.dtype}")
    fm = replace(fm, num_outputs=C, scalar_output=scalar)
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
        raise NonDeterministicModelError(
            f"the model's output is not a deterministic per-sample function: {why}, so its NTK is "
            f"not a kernel. " + _what_to_do(fm.module)
        )
    return fm


_WHAT_TO_DO = (
    "Call model.eval() before building the operator: dropout is then off and BatchNorm uses its "
    "running statistics. To take the kernel at a training batch's statistics instead, copy them "
    "into each BatchNorm's running_mean and running_var, then call model.eval()."
)


def _what_to_do(module: nn.Module) -> str:
    training = _train_mode_layers(module)
    if training:
        return f"The model is in train mode with {training}. " + _WHAT_TO_DO
    return (
        "Make its forward a deterministic function of each sample alone (no random ops, no "
        "statistics over the batch), e.g. call model.eval() if it has train-mode behaviour."
    )


def _train_mode_layers(module: nn.Module) -> list[str]:
    """Names of the layer types in train mode whose output is random or batch-dependent."""
    return sorted({type(m).__name__ for m in module.modules() if m.training and _mode_dependent(m)})


def _mode_dependent(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm))


# the most elements an X rejected by the model may have for it to be tried as one sample
_HINT_MAX_ELEMENTS = 1 << 16


def _single_sample_hint(call, X: Tensor) -> str:
    """When ``X`` looks like one sample without its batch dimension, say to add it (tried only
    for a small ``X``: a data set passed with the wrong per-sample shape is not run whole)."""
    if X.numel() > _HINT_MAX_ELEMENTS:
        return ""
    try:
        out = call(X.unsqueeze(0))
    except Exception:
        return ""
    if isinstance(out, Tensor) and out.ndim in (1, 2) and out.shape[0] == 1:
        return (
            f" X looks like a single sample without its batch dimension: the model accepts "
            f"X.unsqueeze(0) of shape {tuple(X.unsqueeze(0).shape)}; pass that (or a batch X[i:i+1])."
        )
    return ""


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
