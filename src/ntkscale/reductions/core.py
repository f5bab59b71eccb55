r"""Kernel-space NTK products from per-layer factors: one function, four implementations.

For an MLP, the empirical NTK decomposes over its ``Linear`` layers ``l``. With ``A[l]`` the
layer inputs (the caller appends a column of ones for a bias) and ``G[l]`` the gradients of each
network output with respect to the layer's outputs,

.. math::

    Θ((i,c),(j,c')) = \sum_l (A_1[l]_i · A_2[l]_j)\,(G_1[l]_{i,c} · G_2[l]_{j,c'}).

The product with a block of vectors ``V`` (shape ``(N2, C, k)``) is

.. math::

    \mathrm{out}[i,c,r] = \sum_l \sum_j s_l(i,j)\, G_1[l]_{i,c} · W_l[j]_{:,r},
    \qquad W_l[j] = \sum_{c'} G_2[l]_{j,c'} ⊗ V_{j,c'} \quad (o_l × k),

with ``s_l(i,j) = A_1[l]_i · A_2[l]_j``. No implementation writes the ``N1 × N2`` matrix ``s_l``
to memory (the reference holds one ``block × N2`` tile at a time); this form wins over the
weight-space form (``U_l = Σ_j W_l[j] A_2[l]_jᵀ``, then ``G_1 U_l A_1ᵀ``) when layers are wide
relative to ``N``.

Implementations (``impl``):

* ``"torch"`` -- :func:`kernel_space_matmul_reference`: GEMMs on row blocks, any device and
  floating dtype, differentiable with respect to everything.
* ``"keops"`` -- a pykeops ``LazyTensor`` reduction over ``j`` (:mod:`.keops`; optional).
* ``"cpp"``   -- the C++ twin in ``csrc/ntk_reduce.cpp`` (CPU tensors).
* ``"cuda"``  -- the fused tiled kernel in ``csrc/ntk_reduce_cuda.cu`` (CUDA tensors).

The compiled impls (``"cpp"``, ``"cuda"``) and ``"keops"`` need contiguous float32/float64
inputs and are differentiable with respect to ``V`` only; the extension is compiled on first use
(:mod:`.compiled`). Both go through one autograd Function (:mod:`.function`), and
every input is validated here (:func:`check_factors`, :func:`check_fast_inputs`).

Also here: :func:`gram_block` (an explicit Gram block ``K[I, J]``) and :func:`gram_diagonal`.

Example:
    >>> import torch
    >>> A1, G1 = [torch.randn(5, 3)], [torch.randn(5, 2, 4)]
    >>> A2, G2 = [torch.randn(6, 3)], [torch.randn(6, 2, 4)]
    >>> V = torch.randn(6, 2, 1)
    >>> out = kernel_space_matmul(A1, G1, A2, G2, V)
    >>> out.shape
    torch.Size([5, 2, 1])
    >>> K = gram_block(A1, G1, A2, G2)                       # (5*2, 6*2)
    >>> torch.allclose(out.reshape(-1, 1), K @ V.reshape(-1, 1), atol=1e-4)
    True
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "IMPLS",
    "kernel_space_matmul",
    "kernel_space_matmul_reference",
    "gram_block",
    "gram_diagonal",
    "check_factors",
    "check_fast_inputs",
]

#: Implementations accepted by :func:`kernel_space_matmul`.
IMPLS = ("torch", "keops", "cuda", "cpp")

#: Working-memory budget of one row block of the torch reference, in bytes.
DEFAULT_BLOCK_BYTES = 64 * 2**20


class FactorDims(NamedTuple):
    """Sizes read off validated factors."""

    N1: int
    N2: int
    C: int
    k: int
    d: tuple[int, ...]  # input width of each layer (bias column included)
    o: tuple[int, ...]  # output width of each layer


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def check_factors(
    A1: Sequence[Tensor],
    G1: Sequence[Tensor],
    A2: Sequence[Tensor],
    G2: Sequence[Tensor],
    V: Tensor | None = None,
) -> FactorDims:
    """Validate the factors (and ``V``) of a kernel-space product and return their sizes.

    Args:
        A1: per layer, shape ``(N1, d_l)``.
        G1: per layer, shape ``(N1, C, o_l)``.
        A2: per layer, shape ``(N2, d_l)``.
        G2: per layer, shape ``(N2, C, o_l)``.
        V: shape ``(N2, C, k)``, or ``None``.

    Returns:
        :class:`FactorDims` (``k = 0`` when ``V`` is ``None``).

    Raises:
        TypeError: a non-tensor, a non-floating dtype, or mixed dtypes.
        ValueError: wrong numbers of layers, shapes that do not fit, or mixed devices.
    """
    seqs = {"A1": A1, "G1": G1, "A2": A2, "G2": G2}
    for name, seq in seqs.items():
        if isinstance(seq, Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(
                f"{name} must be a list or tuple of tensors (one per layer), "
                f"got {type(seq).__name__}"
            )
        for l, t in enumerate(seq):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{l}] must be a Tensor, got {type(t).__name__}")
    L = len(A1)
    if L == 0:
        raise ValueError("need at least one layer: A1, G1, A2, G2 are empty")
    lengths = {name: len(seq) for name, seq in seqs.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            "A1, G1, A2, G2 must hold one tensor per layer; got lengths "
            + ", ".join(f"{n}={v}" for n, v in lengths.items())
        )
    if A1[0].dim() != 2:
        raise ValueError(f"A1[0] has shape {_shape(A1[0])}, expected 2-D (N1, d)")
    if A2[0].dim() != 2:
        raise ValueError(f"A2[0] has shape {_shape(A2[0])}, expected 2-D (N2, d)")
    if G1[0].dim() != 3:
        raise ValueError(f"G1[0] has shape {_shape(G1[0])}, expected 3-D (N1, C, o)")
    N1, N2, C = A1[0].shape[0], A2[0].shape[0], G1[0].shape[1]
    ref = A1[0]
    if not ref.dtype.is_floating_point:
        raise TypeError(f"A1[0] has dtype {ref.dtype}, expected a floating dtype")
    d, o = [], []
    for l in range(L):
        a1, g1, a2, g2 = A1[l], G1[l], A2[l], G2[l]
        if a1.dim() != 2 or a1.shape[0] != N1:
            raise ValueError(f"A1[{l}] has shape {_shape(a1)}, expected (N1={N1}, d)")
        dl = a1.shape[1]
        if g1.dim() != 3 or g1.shape[0] != N1 or g1.shape[1] != C:
            raise ValueError(f"G1[{l}] has shape {_shape(g1)}, expected (N1={N1}, C={C}, o)")
        ol = g1.shape[2]
        if a2.dim() != 2 or a2.shape[0] != N2 or a2.shape[1] != dl:
            raise ValueError(f"A2[{l}] has shape {_shape(a2)}, expected (N2={N2}, d={dl})")
        if g2.dim() != 3 or tuple(g2.shape) != (N2, C, ol):
            raise ValueError(
                f"G2[{l}] has shape {_shape(g2)}, expected (N2={N2}, C={C}, o={ol})"
            )
        if dl == 0 or ol == 0:
            raise ValueError(f"layer {l} has an empty factor: d={dl}, o={ol}")
        d.append(dl)
        o.append(ol)
        for name, t in (("A1", a1), ("G1", g1), ("A2", a2), ("G2", g2)):
            if t.dtype != ref.dtype:
                raise TypeError(f"{name}[{l}] has dtype {t.dtype}, expected {ref.dtype} (of A1[0])")
            if t.device != ref.device:
                raise ValueError(f"{name}[{l}] is on {t.device}, expected {ref.device} (of A1[0])")
    k = 0
    if V is not None:
        if not isinstance(V, Tensor):
            raise TypeError(f"V must be a Tensor, got {type(V).__name__}")
        if V.dim() != 3 or V.shape[0] != N2 or V.shape[1] != C:
            raise ValueError(f"V has shape {_shape(V)}, expected (N2={N2}, C={C}, k)")
        if V.dtype != ref.dtype:
            raise TypeError(f"V has dtype {V.dtype}, expected {ref.dtype} (of the factors)")
        if V.device != ref.device:
            raise ValueError(f"V is on {V.device}, expected {ref.device} (of the factors)")
        k = V.shape[2]
    return FactorDims(N1, N2, C, k, tuple(d), tuple(o))


def check_fast_inputs(A1, G1, A2, G2, V, impl: str) -> None:
    """What the fast impls (``"keops"``, ``"cpp"``, ``"cuda"``) need beyond :func:`check_factors`:
    float32/float64, contiguous inputs, and the device the impl runs on.

    Raises:
        TypeError: another dtype.
        ValueError: non-contiguous inputs, or a device the impl does not run on.
    """
    if V.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"impl={impl!r} supports float32 and float64, got {V.dtype} (use impl='torch')"
        )
    for name, seq in (("A1", A1), ("G1", G1), ("A2", A2), ("G2", G2)):
        for l, t in enumerate(seq):
            if not t.is_contiguous():
                raise ValueError(
                    f"impl={impl!r} needs contiguous inputs; {name}[{l}] with shape "
                    f"{_shape(t)} has strides {t.stride()} (call .contiguous(), or use "
                    "impl='torch')"
                )
    if not V.is_contiguous():
        raise ValueError(
            f"impl={impl!r} needs contiguous inputs; V with shape {_shape(V)} has strides "
            f"{V.stride()} (call .contiguous(), or use impl='torch')"
        )
    if impl == "cpp" and V.device.type != "cpu":
        raise ValueError(
            f"impl='cpp' runs on CPU tensors, got tensors on {V.device} (use impl='cuda')"
        )
    if impl == "cuda" and V.device.type != "cuda":
        raise ValueError(
            f"impl='cuda' runs on CUDA tensors, got tensors on {V.device} (use impl='cpp' on CPU)"
        )


def _default_block(row_elems: int, itemsize: int, budget: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so that a block's working set (``row_elems`` per row) fits ``budget``."""
    return max(1, budget // max(1, row_elems * itemsize))


def w_factors(G2: Sequence[Tensor], V: Tensor) -> list[Tensor]:
    """``W_l[j] = Σ_c' G2[l][j, c', :] ⊗ V[j, c', :]``, contiguous (N2, o, k) per layer.

    Computed as ``Vᵀ G2`` per sample, which reads ``G2`` row by row (several times faster on a
    CPU than the transposed order)."""
    Vt = V.transpose(1, 2)  # (N2, k, C)
    return [torch.bmm(Vt, g).transpose(1, 2).contiguous() for g in G2]


def contract_g(G1: Tensor, Z: Tensor) -> Tensor:
    """``out[i, c, r] = G1[i, c, :] · Z[i, :, r]``: (b, C, o) and (b, o, k) -> (b, C, k).

    As ``(Zᵀ G1ᵀ)ᵀ`` so that ``G1`` is read row by row."""
    return torch.bmm(Z.transpose(1, 2).contiguous(), G1.transpose(1, 2)).transpose(1, 2)


def kernel_space_matmul_reference(
    A1: Sequence[Tensor],
    G1: Sequence[Tensor],
    A2: Sequence[Tensor],
    G2: Sequence[Tensor],
    V: Tensor,
    block_size: int | None = None,
) -> Tensor:
    """Plain torch kernel-space product (the ``"torch"`` impl and the reference of the others).

    Per layer: ``W = Σ_c' G2[:, c'] ⊗ V[:, c']`` (a batched GEMM), then for each block of rows
    ``i``: the tile ``S = A1[blk] A2ᵀ`` (block × N2), ``Z = S W`` (block × o k, summing over
    ``j`` first) and ``out[blk] += G1[blk] @ Z`` (batched over ``i``). At most one
    ``block × N2`` tile exists at a time. FLOPs per layer:
    ``2 N1 N2 (d + o k) + 2 N1 C o k + 2 N2 C o k``.

    Note:
        When autograd records the call (an input requires grad), every tile ``S`` is saved for
        the backward pass, i.e. ``O(N1 N2)`` memory in total. Run under ``torch.no_grad()``, or
        use a compiled impl (its backward recomputes instead of saving), when that matters.

    Args:
        A1: per layer, shape ``(N1, d_l)``.
        G1: per layer, shape ``(N1, C, o_l)``.
        A2: per layer, shape ``(N2, d_l)``.
        G2: per layer, shape ``(N2, C, o_l)``.
        V: shape ``(N2, C, k)``.
        block_size: rows ``i`` per block; default: as many as keep a block's tiles
            (``S`` and ``Z``) within about 64 MiB.

    Returns:
        Tensor of shape ``(N1, C, k)``; differentiable with respect to all inputs.
    """
    dims = check_factors(A1, G1, A2, G2, V)
    N1, N2, C, k = dims.N1, dims.N2, dims.C, dims.k
    out = V.new_zeros((N1, C, k))
    if N1 == 0 or N2 == 0 or k == 0:
        return out + 0.0 * V.sum()  # keep the graph connected to V
    if block_size is None:
        row = N2 + max(o * k for o in dims.o)
        block_size = _default_block(row, V.element_size())
    block_size = max(1, int(block_size))
    Ws = w_factors(G2, V)  # (N2, o, k) per layer
    blocks = []
    for i0 in range(0, N1, block_size):
        i1 = min(N1, i0 + block_size)
        acc = None
        for a1, g1, a2, W in zip(A1, G1, A2, Ws):
            S = a1[i0:i1] @ a2.T  # (b, N2)
            Z = (S @ W.reshape(N2, -1)).reshape(i1 - i0, W.shape[1], k)  # (b, o, k)
            part = contract_g(g1[i0:i1], Z)  # (b, C, k)
            acc = part if acc is None else acc + part
        blocks.append(acc)
    return torch.cat(blocks, dim=0) if len(blocks) > 1 else blocks[0]


def kernel_space_matmul(
    A1: Sequence[Tensor],
    G1: Sequence[Tensor],
    A2: Sequence[Tensor],
    G2: Sequence[Tensor],
    V: Tensor,
    impl: str = "torch",
    block_size: int | None = None,
) -> Tensor:
    """Kernel-space NTK product ``out = Θ(X1, X2) V`` from per-layer factors.

    ``out[i,c,r] = Σ_l Σ_j (A1[l][i]·A2[l][j]) Σ_c' (G1[l][i,c]·G2[l][j,c']) V[j,c',r]``,
    without an ``N1 × N2`` matrix in memory. All inputs are validated up front (shapes, dtypes,
    devices; contiguity for the impls that need it).

    Args:
        A1: per layer, shape ``(N1, d_l)``: layer inputs of side 1 (bias as a ones column).
        G1: per layer, shape ``(N1, C, o_l)``: output gradients w.r.t. the layer's outputs.
        A2: per layer, shape ``(N2, d_l)``.
        G2: per layer, shape ``(N2, C, o_l)``.
        V: shape ``(N2, C, k)``.
        impl: ``"torch"`` (blocked GEMMs, any device/dtype, fully differentiable),
            ``"keops"`` (pykeops reduction), ``"cpp"`` (compiled CPU twin, CPU tensors) or
            ``"cuda"`` (compiled fused kernel, CUDA tensors). The last three need contiguous
            float32/float64 inputs and are differentiable with respect to ``V`` only.
        block_size: rows ``i`` per block for ``"torch"`` and ``"cpp"``; ignored otherwise.

    Returns:
        Tensor of shape ``(N1, C, k)``.

    Raises:
        ValueError: unknown ``impl``, shapes that do not fit, mixed devices, a device the impl
            does not run on, or non-contiguous inputs for a compiled/KeOps impl.
        TypeError: mixed or unsupported dtypes.
        ImportError: ``impl="keops"`` without pykeops.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check_factors(A1, G1, A2, G2, V)
    if impl == "torch":
        return kernel_space_matmul_reference(A1, G1, A2, G2, V, block_size=block_size)
    check_fast_inputs(A1, G1, A2, G2, V, impl)
    from .function import apply_reduction

    if impl == "keops":
        from .keops import keops_reduce

        return apply_reduction(keops_reduce, impl, A1, G1, A2, G2, V)
    from .compiled import compiled_reduce

    return apply_reduction(compiled_reduce(block_size if impl == "cpp" else None), impl,
                           A1, G1, A2, G2, V)


def gram_block(
    A1: Sequence[Tensor],
    G1: Sequence[Tensor],
    A2: Sequence[Tensor],
    G2: Sequence[Tensor],
) -> Tensor:
    """Explicit Gram block ``K[I, J]`` from factors, by GEMMs.

    ``K[i*C + c, j*C + c'] = Σ_l (A1[l][i]·A2[l][j]) (G1[l][i,c]·G2[l][j,c'])``; rows are ordered
    ``(sample, output)`` row-major like every ntkscale operator.

    Args:
        A1: per layer, shape ``(N1, d_l)``.
        G1: per layer, shape ``(N1, C, o_l)``.
        A2: per layer, shape ``(N2, d_l)``.
        G2: per layer, shape ``(N2, C, o_l)``.

    Returns:
        Tensor of shape ``(N1*C, N2*C)``. This is an explicit matrix: size it to fit.
    """
    dims = check_factors(A1, G1, A2, G2)
    N1, N2, C = dims.N1, dims.N2, dims.C
    K = None
    for a1, g1, a2, g2 in zip(A1, G1, A2, G2):
        S = a1 @ a2.T  # (N1, N2)
        P = g1.reshape(N1 * C, -1) @ g2.reshape(N2 * C, -1).T  # (N1*C, N2*C)
        P.view(N1, C, N2, C).mul_(S[:, None, :, None])  # in place: one (N1*C, N2*C) buffer per layer
        K = P if K is None else K.add_(P)
        del P, S
    return K.reshape(N1 * C, N2 * C)


def gram_diagonal(A: Sequence[Tensor], G: Sequence[Tensor]) -> Tensor:
    """Diagonal of the Gram matrix from factors: ``Σ_l |A[l][i]|² |G[l][i,c]|²``.

    Args:
        A: per layer, shape ``(N, d_l)``.
        G: per layer, shape ``(N, C, o_l)``.

    Returns:
        Tensor of shape ``(N, C)`` (``diag.reshape(-1)`` is the operator's diagonal).
    """
    dims = check_factors(A, G, A, G)
    diag = None
    for a, g in zip(A, G):
        term = a.pow(2).sum(-1, keepdim=True) * g.pow(2).sum(-1)  # (N, 1) * (N, C)
        diag = term if diag is None else diag + term
    assert diag is not None and diag.shape == (dims.N1, dims.C)
    return diag
