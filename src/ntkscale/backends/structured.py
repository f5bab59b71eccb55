"""Structured NTK products from per-layer factors, in weight space (GEMMs) or kernel space.

For a layer ``z = W a + b`` (``nn.Linear``, or ``nn.Conv2d`` on unfolded patches) the per-sample
gradient of output c is ``Σ_p g_{c,p} a_pᵀ`` over the layer's positions p (one for an MLP, the
spatial positions for a convolution), where ``a_p`` is the layer input and ``g_{c,p} = ∂f_c/∂z_p``.
So the NTK splits over layers,

    Θ_l((i,c),(j,c')) = Σ_{p,q} (a_ip·a_jq + 1_bias) (g_icp·g_jc'q),

and with the factors ``A_l`` (N, L, d) and ``G_l`` (N, C, L, o) cached once (one forward, C
batched backward passes), a product is two GEMMs per layer:

    U_l = Σ_{i,c,p} v_ic g_icp a_ipᵀ          (vjp, weight space)
    (Θ v)_ic = Σ_{l,p} g_icpᵀ (U_l a_ip + u_b)  (jvp)

about two forward passes of FLOPs. A layer may carry constant multipliers (the NTK
parametrization, ``z = weight_scale · W a + bias_scale · b``, see ``ntkscale.models``): any
``nn.Linear``/``nn.Conv2d`` (subclass) with float attributes ``weight_scale``/``bias_scale`` is
factored with ``weight_scale · a`` as its input factor and ``bias_scale`` on its bias column.
Parameters of other layer types (norms, embeddings, custom
modules) go through the autodiff backend restricted to them, and the two parts add up.

``KeOpsBackend`` and ``CudaBackend`` do the same but reduce the dense (L = 1) layers in kernel
space, ``(Θ v)_i = Σ_j Σ_l (a_i·a_j)(g_i·g_j) v_j``, without any N×N matrix: cheaper than
weight space when layers are much wider than N.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import FunctionalModel, chunks
from .autodiff import AutodiffBackend
from .base import DEFAULT_FACTOR_BUDGET, Backend, KernelData, ParamVec

__all__ = [
    "StructuredBackend", "KeOpsBackend", "CudaBackend", "Factors", "layer_specs", "factorable_layers",
]

log = logging.getLogger("ntkscale")



@dataclass(frozen=True)
class LayerSpec:
    """A layer the structured backend handles: which of its parameters are differentiated."""

    module_name: str
    weight: str | None  # full parameter name, or None when the weight is held fixed
    bias: str | None
    weight_scale: float = 1.0  # constant multipliers of the layer: z = ws · W a + bs · b
    bias_scale: float = 1.0


def layer_scales(mod: nn.Module) -> tuple[float, float]:
    """A layer's constant ``(weight_scale, bias_scale)`` multipliers (1, 1 for plain layers)."""
    return float(getattr(mod, "weight_scale", 1.0)), float(getattr(mod, "bias_scale", 1.0))


def layer_specs(fm: FunctionalModel) -> tuple[list[LayerSpec], list[str]]:
    """Split the differentiated parameters into structured layers and the rest (autodiff)."""
    names = set(fm.names)
    specs, covered = [], set()
    for mname, mod in fm.module.named_modules():
        supported = isinstance(mod, nn.Linear) or (
            isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str)
        )
        if not supported:
            continue
        prefix = f"{mname}." if mname else ""
        w = prefix + "weight" if prefix + "weight" in names else None
        b = prefix + "bias" if mod.bias is not None and prefix + "bias" in names else None
        if w is None and b is None:
            continue
        specs.append(LayerSpec(mname, w, b, *layer_scales(mod)))
        covered.update(x for x in (w, b) if x)
    rest = [n for n in fm.names if n not in covered]
    return specs, rest


def factorable_layers(data: KernelData) -> tuple[list[LayerSpec], list[str]]:
    """:func:`layer_specs`, checked on the data: layers whose factors do not give their gradient
    are moved to the autodiff rest.

    A ``Linear`` can be in the model without being called (``nn.MultiheadAttention`` uses
    ``out_proj.weight`` functionally), its weight can also be used outside its call (tied
    weights), or its input can hold the batch elsewhere than in front (sequence-first). For each
    candidate layer the factors of the first sample, ``Σ_p g_p a_pᵀ`` under a random cotangent on
    that sample's outputs only, are compared with autograd's gradient of the same scalar; a layer
    that is never called or disagrees goes through autodiff, as other layer types do.
    """
    fm = data.fm
    specs, rest = layer_specs(fm)
    if not specs:
        return specs, rest
    X = data.X1[: min(2, data.X1.shape[0])]
    params = [p.detach().requires_grad_(True) for p in data.params]
    pos = {n: i for i, n in enumerate(fm.names)}
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.enable_grad(), _Capture(fm, specs) as cap:
        out = fm(params, data.fixed, X)  # (n, C)
        r = torch.zeros_like(out)
        r[0] = torch.randn(out.shape[1], generator=gen, dtype=out.dtype).to(out.device)
        deltas = [d for ds in cap.deltas for d in ds]
        grads = torch.autograd.grad(out, [*deltas, *params], r, allow_unused=True)
    g_delta, g_param = grads[: len(deltas)], grads[len(deltas) :]
    keep, moved, k = [], [], 0
    for idx, (spec, mod) in enumerate(zip(specs, cap.layers)):
        uses = len(cap.deltas[idx])
        ok = uses > 0
        gw = gb = 0
        for use in range(uses):
            g = g_delta[k]
            k += 1
            if g is None:
                continue
            A = _unfold_input(mod, cap.inputs[idx][use][:1])[0]  # (L, d)
            G = _grad_rows(mod, g[:1].unsqueeze(0))[0, 0]  # (L, o)
            gw = gw + G.T @ A
            gb = gb + G.sum(0)
        if uses:  # the factors carry the layer's constant multipliers (NTK parametrization)
            gw, gb = gw * spec.weight_scale, gb * spec.bias_scale
        for name, est in ((spec.weight, gw), (spec.bias, gb)):
            if not ok or name is None:
                continue
            ref = g_param[pos[name]]
            ref = torch.zeros_like(params[pos[name]]) if ref is None else ref
            est = torch.zeros_like(ref) if isinstance(est, int) else est.reshape(ref.shape)
            tol = (1e-8 if ref.dtype == torch.float64 else 1e-3) * (ref.abs().max().item() + 1e-12)
            ok = ok and (est - ref).abs().max().item() <= tol + 1e-30
        if ok:
            keep.append(spec)
        else:
            moved.extend(n for n in (spec.weight, spec.bias) if n)
            log.info(
                "ntkscale: layer %r %s; its parameters go through autodiff",
                spec.module_name,
                "is not called in the forward pass" if uses == 0
                else "is not used as a per-sample layer call alone (weights used elsewhere or a "
                "batch axis not in front)",
            )
    if moved:
        chosen = set(rest) | set(moved)
        rest = [n for n in fm.names if n in chosen]
    return keep, rest


@dataclass
class Factors:
    """Per-layer factors of one data side: ``A[l]`` (n, L, d), ``G[l]`` (n, C, L, o).

    ``A[l]`` already carries the layer's weight multiplier; ``bias_scale[l]`` multiplies the
    bias gradient (``G`` summed over positions)."""

    A: list[Tensor]
    G: list[Tensor]
    bias_scale: list[float] | None = None

    def bscale(self, l: int) -> float:
        return 1.0 if self.bias_scale is None else self.bias_scale[l]

    def select(self, sl) -> Factors:
        """Rows ``sl`` of every factor."""
        return Factors([A[sl] for A in self.A], [G[sl] for G in self.G], self.bias_scale)

    def layer(self, l: int) -> Factors:
        """The factors of layer ``l`` alone."""
        return Factors([self.A[l]], [self.G[l]], [self.bscale(l)])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.A, *self.G))


class _Capture:
    """Forward hooks recording each structured layer's inputs and adding a zero ``δ`` to its
    output; gradients with respect to the ``δ``s are the output gradients ``g``."""

    def __init__(self, fm: FunctionalModel, specs: list[LayerSpec]):
        mods = dict(fm.module.named_modules())
        self.layers = [mods[s.module_name] for s in specs]
        self.inputs: list[list[Tensor]] = [[] for _ in specs]
        self.deltas: list[list[Tensor]] = [[] for _ in specs]
        self.handles = []

    def __enter__(self):
        for idx, mod in enumerate(self.layers):
            self.handles.append(mod.register_forward_hook(self._hook(idx)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, idx):
        def hook(mod, args, out):
            self.inputs[idx].append(args[0].detach())
            delta = torch.zeros_like(out, requires_grad=True)
            self.deltas[idx].append(delta)
            return out + delta

        return hook


def _unfold_input(mod: nn.Module, x: Tensor) -> Tensor:
    """Layer input as (n, L, d) rows that multiply the flattened weight (o, d)."""
    if isinstance(mod, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
    return cols.transpose(1, 2)  # (n, L, C_in*kh*kw)


def _grad_rows(mod: nn.Module, g: Tensor) -> Tensor:
    """Output gradients (C, n, *out) -> (n, C, L, o)."""
    C, n = g.shape[:2]
    if isinstance(mod, nn.Linear):
        return g.reshape(C, n, -1, g.shape[-1]).transpose(0, 1)
    return g.reshape(C, n, g.shape[2], -1).permute(1, 0, 3, 2)  # (n, C, H*W, o)


def compute_factors(data: KernelData, specs: list[LayerSpec], X: Tensor) -> Factors:
    """Factors of one chunk: one forward pass, then C output gradients in one batched backward."""
    fm, C = data.fm, data.num_outputs
    with torch.enable_grad(), _Capture(fm, specs) as cap:
        out = fm(data.params, data.fixed, X)  # (n, C)
        flat_deltas = [d for ds in cap.deltas for d in ds]
        eye = torch.eye(C, dtype=out.dtype, device=out.device)
        cot = eye[:, None, :].expand(C, X.shape[0], C)
        try:
            grads = torch.autograd.grad(out, flat_deltas, cot, is_grads_batched=True, allow_unused=True)
        except RuntimeError:  # an op without a batching rule: one backward per output
            per_c = [
                torch.autograd.grad(out, flat_deltas, cot[c], retain_graph=True, allow_unused=True)
                for c in range(C)
            ]
            grads = [torch.stack([g[k] for g in per_c]) for k in range(len(flat_deltas))]
    A, G, k = [], [], 0
    for idx, mod in enumerate(cap.layers):
        uses = len(cap.deltas[idx])
        if uses == 0:
            raise RuntimeError(f"layer {specs[idx].module_name!r} was not called in the forward pass")
        a_list, g_list = [], []
        for use in range(uses):  # a layer used several times: its positions are concatenated
            g = grads[k]
            k += 1
            if g is None:
                g = torch.zeros(C, *cap.deltas[idx][use].shape, dtype=out.dtype, device=out.device)
            a = _unfold_input(mod, cap.inputs[idx][use])
            a_list.append(a * specs[idx].weight_scale if specs[idx].weight_scale != 1.0 else a)
            g_list.append(_grad_rows(mod, g))
        A.append(torch.cat(a_list, dim=1) if uses > 1 else a_list[0])
        G.append(torch.cat(g_list, dim=2) if uses > 1 else g_list[0])
    return Factors(A, G, [s.bias_scale for s in specs])


def build_factors(data: KernelData, specs: list[LayerSpec], X: Tensor) -> Factors:
    """Factors of all of ``X``, written chunk by chunk into preallocated tensors.

    Peak memory is the factors plus one chunk's temporaries: the chunk is cut so that its
    factor pass (about four times its factors: activations, the C batched output gradients and
    their copies) stays within the memory budget, never concatenated from parts held at once.
    """
    n = X.shape[0]
    one = compute_factors(data, specs, X[:1])
    per_sample = max(1, one.nbytes())
    rows = max(1, min(data.chunk_size, data.memory_budget // (4 * per_sample)))
    if n <= rows:
        return compute_factors(data, specs, X)
    A = [a.new_empty((n, *a.shape[1:])) for a in one.A]
    G = [g.new_empty((n, *g.shape[1:])) for g in one.G]
    bias_scale = one.bias_scale
    del one
    for sl in chunks(n, rows):
        part = compute_factors(data, specs, X[sl])
        for dst, src in zip((*A, *G), (*part.A, *part.G)):
            dst[sl].copy_(src)
        del part
    return Factors(A, G, bias_scale)


class StructuredBackend(Backend):
    """NTK products from cached per-layer factors (weight-space GEMMs), autodiff for the rest."""

    name = "structured"
    kernel_impl: str | None = None  # "keops" / "cuda": reduce dense layers in kernel space

    def __init__(self):
        self._rest_backend = AutodiffBackend()

    # -- layout --------------------------------------------------------------------------------
    def _layout(self, data: KernelData):
        """(specs, indices of each spec's weight/bias in data.params, rest-data or None)."""

        def build():
            specs, rest = factorable_layers(data)
            pos = {n: i for i, n in enumerate(data.fm.names)}
            idx = [(pos.get(s.weight), pos.get(s.bias)) for s in specs]
            return specs, idx, rest

        specs, idx, rest = data.cached("layout", (), build)
        if not rest:
            return specs, idx, None
        # one rest-data per operator, so that its cache (the autodiff linearization) persists
        return specs, idx, data.cached("rest-data", (), lambda: self._rest_data(data, rest))

    @staticmethod
    def _rest_data(data: KernelData, rest: list[str]) -> KernelData:
        fm = data.fm
        rest_set = set(rest)
        keep = [i for i, n in enumerate(fm.names) if n in rest_set]
        other = [i for i, n in enumerate(fm.names) if n not in rest_set]
        fm_rest = replace(
            fm,
            names=tuple(fm.names[i] for i in keep),
            fixed_names=tuple(fm.names[i] for i in other) + fm.fixed_names,
        )
        return replace(
            data,
            fm=fm_rest,
            params=tuple(data.params[i] for i in keep),
            fixed=tuple(data.params[i] for i in other) + tuple(data.fixed),
            cache={},
        )

    # -- factors -------------------------------------------------------------------------------
    def factor_bytes(self, data: KernelData, X: Tensor) -> int:
        """Bytes kept for ``X`` between products (measured on one sample, scaled by N): the
        factors, and the linearization of the parameters they do not cover when it fits
        ``memory_budget`` (see :mod:`.linearization`)."""
        _, _, rest = self._layout(data)
        total = self._layer_factor_bytes(data, X)
        if rest is not None:
            kept = self._rest_backend.factor_bytes(rest, X)
            total += kept if kept <= rest.memory_budget else 0
        return total

    def _layer_factor_bytes(self, data: KernelData, X: Tensor) -> int:
        """Bytes of the per-layer factors of ``X`` (measured on one sample, scaled by N)."""
        specs, _, _ = self._layout(data)
        return compute_factors(data, specs, X[:1]).nbytes() * X.shape[0]

    @staticmethod
    def _side_name(data: KernelData, X: Tensor) -> str | None:
        """Cache name of a data side's factors (None for other inputs)."""
        return "factors1" if X is data.X1 else ("factors2" if X is data.X2 else None)

    @staticmethod
    def _fits_factor_budget(data: KernelData, flag: str, need: float, what: str) -> bool:
        """Whether ``need`` bytes fit the factor budget; says once per ``flag`` when not."""
        budget = data.factor_budget or DEFAULT_FACTOR_BUDGET
        if need <= budget:
            return True
        if not data.cache.get(flag):
            data.cache[flag] = True
            log.info("ntkscale: %s (%.2f GiB) exceed the factor budget %.2f GiB; %s",
                     what, need / 2**30, budget / 2**30,
                     "recomputing them per chunk on every product" if flag.startswith("factors")
                     else "copying them on every product")
        return False

    def _factors(self, data: KernelData, X: Tensor, name: str) -> Factors | None:
        """Cached factors of ``X``, or None when they exceed the factor budget."""
        specs, _, _ = self._layout(data)
        if not specs:
            return None
        need = data.cached(f"{name}-bytes", (X,), lambda: self._layer_factor_bytes(data, X))
        if not self._fits_factor_budget(data, f"{name}-warned", need, "structured factors"):
            return None

        def build():
            fac = build_factors(data, specs, X)
            log.info("ntkscale: cached structured factors of %d samples: %.1f MiB", X.shape[0], fac.nbytes() / 2**20)
            return fac

        return data.cached(name, (X,), build)

    def _side(self, data: KernelData, X: Tensor, k: int | None = None):
        """Factors for X as (slice, Factors) pieces: slices of the cached factors, or factors
        recomputed chunk by chunk. With ``k`` right-hand sides, pieces are cut so that the
        per-piece temporaries (``k`` columns per output unit and sample) fit the memory budget."""
        name = self._side_name(data, X)
        fac = self._factors(data, X, name) if name else None
        if fac is None:
            specs, _, _ = self._layout(data)
            for sl in chunks(X.shape[0], data.chunk_size):
                yield sl, compute_factors(data, specs, X[sl])
            return
        if k is None:
            yield slice(0, X.shape[0]), fac
            return
        per_row = sum(G.shape[2] * G.shape[3] + A.shape[2] for A, G in zip(fac.A, fac.G))
        rows = max(1, data.memory_budget // max(1, 2 * k * per_row * fac.A[0].element_size()))
        for sl in chunks(X.shape[0], rows):
            yield sl, fac.select(sl)

    # -- weight-space primitives ------------------------------------------------------------
    def vjp(self, data: KernelData, X: Tensor, V: Tensor) -> ParamVec:
        specs, idx, rest = self._layout(data)
        k = V.shape[-1]
        out: list[Tensor | None] = [None] * len(data.params)
        for sl, fac in self._side(data, X, k):
            for (iw, ib), (Uw, Ub) in zip(idx, _weight_space_vjp(fac, idx, V[sl])):
                if iw is not None:
                    _acc(out, iw, Uw.reshape(k, *data.params[iw].shape))
                if ib is not None:
                    _acc(out, ib, Ub)
        if rest is not None:
            for i, u in zip(self._rest_positions(data, rest), self._rest_backend.vjp(rest, X, V)):
                out[i] = u
        return tuple(
            o if o is not None else torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device)
            for o, p in zip(out, data.params)
        )

    def jvp(self, data: KernelData, X: Tensor, U: ParamVec) -> Tensor:
        specs, idx, rest = self._layout(data)
        k = U[0].shape[0]
        per_layer = [
            (U[iw].reshape(k, U[iw].shape[1], -1) if iw is not None else None, U[ib] if ib is not None else None)
            for iw, ib in idx
        ]
        out = torch.zeros(X.shape[0], data.num_outputs, k, dtype=data.dtype, device=X.device)
        if idx:
            for sl, fac in self._side(data, X, k):
                out[sl] += _weight_space_jvp(fac, per_layer)
        if rest is not None:
            out += self._rest_backend.jvp(rest, X, tuple(U[i] for i in self._rest_positions(data, rest)))
        return out

    @staticmethod
    def _rest_positions(data: KernelData, rest: KernelData) -> list[int]:
        names = set(rest.fm.names)
        return [i for i, n in enumerate(data.fm.names) if n in names]

    # -- kernel operations ---------------------------------------------------------------------
    def matmul(self, data: KernelData, V: Tensor) -> Tensor:
        if self.kernel_impl is None:
            return self.jvp(data, data.X1, self.vjp(data, data.X2, V))
        return self._kernel_space_matmul(data, V)

    def diagonal(self, data: KernelData) -> Tensor:
        specs, idx, rest = self._layout(data)
        X = data.X1
        diag = torch.zeros(X.shape[0], data.num_outputs, dtype=data.dtype, device=X.device)
        for sl, fac in self._side(data, X):
            for l, (iw, ib) in enumerate(idx):
                A, G = fac.A[l], fac.G[l]  # (n, L, d), (n, C, L, o)
                if iw is not None:
                    L = A.shape[1]
                    if L == 1:
                        diag[sl] += A.square().sum((1, 2))[:, None] * G.square().sum((2, 3))
                    else:  # ‖Σ_p g_p a_pᵀ‖² = Σ_{p,q} (a_p·a_q)(g_p·g_q)
                        AA = A @ A.transpose(1, 2)  # (n, L, L)
                        GG = G @ G.transpose(2, 3)  # (n, C, L, L)
                        diag[sl] += (GG * AA[:, None]).sum((2, 3))
                if ib is not None:
                    diag[sl] += G.sum(2).square().sum(-1) * fac.bscale(l) ** 2
        if rest is not None:
            diag += self._rest_backend.diagonal(replace(rest, X1=X, X2=X, square=True))
        return diag

    def gram(self, data: KernelData, X1: Tensor, X2: Tensor, rows: Tensor | None = None) -> Tensor:
        specs, idx, rest = self._layout(data)
        dense_layers = self._dense_layers(data)
        if len(dense_layers) != len(specs):  # convolutions: weight-space, through the base path
            return Backend.gram(self, data, X1, X2, rows)
        from ..reductions.core import gram_block

        f1 = self._whole(data, X1)
        f2 = f1 if (X2 is X1) else self._whole(data, X2)
        A1, G1 = self._kernel_side(data, X1, f1, idx, dense_layers)
        A2, G2 = (A1, G1) if X2 is X1 else self._kernel_side(data, X2, f2, idx, dense_layers)
        out = gram_block(A1, G1, A2, G2)  # (n1*C, n2*C): GEMMs over the factors, cheap per row
        if rest is not None:
            out += self._rest_backend.gram(rest, X1, X2)
        return out if rows is None else out[rows.to(out.device)]

    # -- kernel space --------------------------------------------------------------------------
    def _dense_layers(self, data: KernelData) -> list[int]:
        """Indices of the structured layers with one position per sample (nn.Linear on vectors)."""

        def build():
            specs, _, _ = self._layout(data)
            fac = compute_factors(data, specs, data.X1[:1])
            return [l for l, A in enumerate(fac.A) if A.shape[1] == 1]

        return data.cached("dense-layers", (), build)

    def _whole(self, data: KernelData, X: Tensor) -> Factors:
        name = self._side_name(data, X)
        fac = self._factors(data, X, name) if name else None
        if fac is not None:
            return fac
        specs, _, _ = self._layout(data)
        return build_factors(data, specs, X)

    @staticmethod
    def _kernel_factors(fac: Factors, idx, layers=None):
        """Kernel-space factors: A (n, d [+1 for a bias]) and G (n, C, o) of dense layers."""
        A_out, G_out = [], []
        for l in layers if layers is not None else range(len(idx)):
            iw, ib = idx[l]
            A, G = fac.A[l][:, 0], fac.G[l][:, :, 0]
            if iw is None:
                A = A.new_full((A.shape[0], 1), fac.bscale(l))
            elif ib is not None:
                A = torch.cat([A, A.new_full((A.shape[0], 1), fac.bscale(l))], dim=1)
            A_out.append(A.contiguous())
            G_out.append(G.contiguous())
        return A_out, G_out

    def _kernel_side(self, data: KernelData, X: Tensor, fac: Factors, idx, layers: list[int]):
        """Kernel-space factors of the dense ``layers`` of side ``X`` (see :meth:`_kernel_factors`).

        For a data side whose per-layer factors are cached they are built once and cached too
        (their contiguous copies would otherwise be remade on every product), as long as the
        side's factors and these copies together fit the factor budget."""
        name = self._side_name(data, X)
        entry = data.cache.get(name) if name else None
        if entry is None or entry[1] is not fac or entry[0] != data.signature(X):
            return self._kernel_factors(fac, idx, layers)  # factors not cached: nor are these
        size = fac.A[0].element_size()
        extra = sum(
            fac.A[l].shape[0] * ((fac.A[l].shape[2] if idx[l][0] is not None else 0) + (idx[l][1] is not None))
            + fac.G[l].shape[0] * fac.G[l].shape[1] * fac.G[l].shape[3]
            for l in layers
        ) * size
        if not self._fits_factor_budget(data, f"kernel-{name}-warned", fac.nbytes() + extra,
                                        "the factors with their kernel-space copies"):
            return self._kernel_factors(fac, idx, layers)
        return data.cached(f"kernel-{name}", (X,), lambda: self._kernel_factors(fac, idx, layers))

    def _kernel_space_matmul(self, data: KernelData, V: Tensor) -> Tensor:
        from ..reductions.core import kernel_space_matmul

        specs, idx, rest = self._layout(data)
        dense = self._dense_layers(data)
        f1 = self._whole(data, data.X1)
        f2 = f1 if data.square else self._whole(data, data.X2)
        A1, G1 = self._kernel_side(data, data.X1, f1, idx, dense)
        A2, G2 = (A1, G1) if data.square else self._kernel_side(data, data.X2, f2, idx, dense)
        impl = self.kernel_impl
        if impl == "cuda" and V.device.type != "cuda":
            impl = "cpp"  # the csrc kernel's CPU twin
        out = kernel_space_matmul(A1, G1, A2, G2, V, impl=impl)
        others = [l for l in range(len(specs)) if l not in set(dense)]
        if others or rest is not None:
            # convolutions and non-structured parameters: weight space, restricted to them
            for l in others:
                sub2 = f2.layer(l)
                sub1 = f1.layer(l)
                out = out + _weight_space_jvp(sub1, _weight_space_vjp(sub2, [idx[l]], V))
            if rest is not None:
                out = out + self._rest_backend.matmul(rest, V)
        return out


def _weight_space_vjp(fac: Factors, idx, V: Tensor) -> list[tuple[Tensor | None, Tensor | None]]:
    """``Jᵀ V`` from factors, per layer: (weight (k, o, d) or None, bias (k, o) or None)."""
    k = V.shape[-1]
    Vt = V.transpose(1, 2)  # (n, k, C)
    res = []
    for l, (iw, ib) in enumerate(idx):
        A, G = fac.A[l], fac.G[l]
        n, C, L, o = G.shape
        # Gv[n, k, (l, o)] = Σ_c V[n, c, k] G[n, c, l, o]; G is read row by row (the fast order)
        Gv = torch.bmm(Vt, G.reshape(n, C, L * o))  # (n, k, L*o)
        Uw = Ub = None
        if k == 1:
            Gv = Gv.reshape(n * L, o)
            if iw is not None:
                Uw = (Gv.T @ A.reshape(n * L, -1)).unsqueeze(0)  # (1, o, d)
            if ib is not None:
                Ub = Gv.sum(0).unsqueeze(0) * fac.bscale(l)
        else:
            Gv = Gv.reshape(n, k, L, o).permute(1, 3, 0, 2).reshape(k * o, n * L)
            if iw is not None:
                Uw = (Gv @ A.reshape(n * L, -1)).reshape(k, o, -1)
            if ib is not None:
                Ub = Gv.sum(1).reshape(k, o) * fac.bscale(l)
        res.append((Uw, Ub))
    return res


def _weight_space_jvp(fac: Factors, U) -> Tensor:
    """``J U`` from factors: U per layer (weight (k, o, d) or None, bias (k, o) or None)."""
    out = None
    for l, (Uw, Ub) in enumerate(U):
        A, G = fac.A[l], fac.G[l]
        n, C, L, o = G.shape
        k = (Uw if Uw is not None else Ub).shape[0]
        Z = None
        if Uw is not None:
            Z = (A.reshape(n * L, -1) @ Uw.reshape(k * o, -1).T).reshape(n, L, k, o)
        if Ub is not None:
            Ub = Ub * fac.bscale(l) if fac.bscale(l) != 1.0 else Ub
            Z = Ub.expand(n, L, k, o) if Z is None else Z + Ub
        Zr = Z.permute(0, 2, 1, 3).reshape(n, k, L * o)
        # out[n, c, k] = Σ_{l,o} G[n, c, l, o] Z[n, l, k, o], as (n, k, L·o) @ (n, L·o, C)
        r = torch.bmm(Zr, G.reshape(n, C, L * o).transpose(1, 2)).transpose(1, 2)
        out = r if out is None else out + r
    return out


def _acc(out: list, i: int, value: Tensor) -> None:
    out[i] = value.clone() if out[i] is None else out[i].add_(value)


class KeOpsBackend(StructuredBackend):
    """Structured factors reduced in kernel space by a pykeops ``LazyTensor`` reduction."""

    name = "keops"
    kernel_impl = "keops"

    def __init__(self):
        import importlib.util

        from ..reductions.keops import _MISSING

        if importlib.util.find_spec("pykeops") is None:  # say so when the backend is chosen
            raise ImportError(_MISSING)
        super().__init__()


class CudaBackend(StructuredBackend):
    """Structured factors reduced in kernel space by the csrc fused kernel (C++ twin on CPU)."""

    name = "cuda"
    kernel_impl = "cuda"
