"""The cost model behind ``backend="auto"``: FLOP and memory estimates per backend.

One probe (the per-layer factors of a single sample) gives each structured layer's shape:
positions L, input width d, output width o. From them, per matrix-vector product with one
right-hand side, in multiply-adds (MACs):

* forward pass per sample ``F = Σ_l L·d·o`` (plus the parameters the probe could not structure);
* ``autodiff``: a VJP pass (forward + backward, ≈ 3F) and a JVP pass (≈ 3F) per sample;
* ``structured``: two GEMMs per layer, ``2·L·d·o`` per sample, after a one-off factor pass
  (a forward and C batched backward passes, ``≈ (1 + 2C)·F``) amortized over ``AMORTIZE``
  products (a CG solve); ``∞`` when the factors exceed the factor budget;
* kernel space (``keops``, ``cuda``): ``N1·N2·(d + o)`` per dense layer (the sum over j comes
  before the contraction with the output gradients; the CUDA kernel recomputes the ``d`` part
  once per 64 columns of ``o``) — independent of the product ``d·o``, which is why it wins when
  layers are wide relative to N — run at a lower rate than BLAS GEMMs (``RATE``);
* ``dense``: ``2·N·C·P`` per product after building the explicit Jacobian; only when that is small.

Each estimate is divided by its implementation's relative rate (GEMM = 1), which was calibrated
against ``benchmarks/bench_crossover.py`` on a 2-core CPU; the kernel-space rates are the least
certain part (see the benchmark's JSON for where the model is still wrong).
"""

from __future__ import annotations

import importlib.util

from torch import Tensor

from ..functional import FunctionalModel

__all__ = ["choose", "estimate"]

KS_CONTRACT = 40  # cost of a multiply-add in the kernel-space G contractions, in GEMM multiply-adds
AMORTIZE = 20  # products a factor pass is amortized over (a typical preconditioned CG solve)
DENSE_MAX_ROWS = 4096
DENSE_MAX_BYTES = 64 * 2**20

# Throughput relative to BLAS GEMMs on the same device.
RATE = {
    "cpu": {"autodiff": 0.8, "structured": 1.0, "dense": 1.0, "keops": 0.015, "cuda": 0.9},
    "cuda": {"autodiff": 0.8, "structured": 1.0, "dense": 1.0, "keops": 0.35, "cuda": 0.5},
}


def _layer_shapes(fm: FunctionalModel, params, fixed, X1: Tensor):
    """[(L, d, o, has_weight, has_bias)] of the structured layers, and the unstructured P."""
    from .base import KernelData
    from .structured import compute_factors, factorable_layers

    data = KernelData(fm, tuple(params), tuple(fixed), X1[:2], X1[:2], True, 1, 2**30)
    specs, rest = factorable_layers(data)
    shapes = []
    if specs:
        fac = compute_factors(data, specs, X1[:1])
        for spec, A, G in zip(specs, fac.A, fac.G):
            shapes.append((A.shape[1], A.shape[2], G.shape[3], spec.weight is not None, spec.bias is not None))
    pos = {n: p for n, p in zip(fm.names, params)}
    p_rest = sum(pos[n].numel() for n in rest)
    return shapes, p_rest


def estimate(fm: FunctionalModel, params, fixed, X1: Tensor, X2: Tensor, square: bool,
             budget: int, factor_budget: int | None = None) -> dict:
    """Per-backend cost (seconds-like units: MACs / relative rate) and memory (bytes)."""
    from .structured import DEFAULT_FACTOR_BUDGET

    factor_budget = factor_budget or DEFAULT_FACTOR_BUDGET
    P = sum(p.numel() for p in params)
    C = fm.num_outputs
    N1, N2 = X1.shape[0], (X1.shape[0] if square else X2.shape[0])
    el = params[0].element_size()
    dev = "cuda" if X1.device.type == "cuda" else "cpu"
    rate = RATE[dev]
    shapes, p_rest = _layer_shapes(fm, params, fixed, X1)
    F_struct = sum(L * d * o for L, d, o, _, _ in shapes)
    F = F_struct + p_rest  # an unstructured parameter costs at least one MAC per sample
    N_sum = N1 + (0 if square else N2)

    cost: dict[str, float] = {}
    memory: dict[str, float] = {}
    # autodiff: VJP over the columns' data, JVP over the rows' data
    cost["autodiff"] = 3 * F * (N1 + N2) / rate["autodiff"]
    memory["autodiff"] = 0.0

    # structured: GEMMs on cached factors; the rest through autodiff
    factor_bytes = sum(N_sum * L * (d + C * o) * el for L, d, o, _, _ in shapes)
    rest_cost = 3 * p_rest * (N1 + N2) / rate["autodiff"]
    setup = (1 + 2 * C) * F * N_sum / rate["structured"]
    per = sum((N1 + N2) * L * d * o + 2 * (N1 + N2) * C * L * o for L, d, o, _, _ in shapes)
    if shapes and factor_bytes <= factor_budget:
        cost["structured"] = per / rate["structured"] + setup / AMORTIZE + rest_cost
    elif shapes:  # factors recomputed on every product
        cost["structured"] = per / rate["structured"] + 2 * setup + rest_cost
    memory["structured"] = float(factor_bytes)

    # kernel space: dense layers reduced over sample pairs, the others in weight space
    dense = [(d + (1 if b else 0), o) for L, d, o, _, b in shapes if L == 1]
    others = [(L, d, o) for L, d, o, _, _ in shapes if L != 1]
    if dense and factor_bytes <= factor_budget:
        ws = sum((N1 + N2) * L * d * o for L, d, o in others) / rate["structured"]
        for name in ("keops", "cuda"):
            if name == "keops" and importlib.util.find_spec("pykeops") is None:
                continue
            col_tiles = (lambda o: -(-o // 64)) if (name == "cuda" and dev == "cuda") else (lambda o: 1)
            # the contractions with the output gradients (W = VᵀG2, G1·Y) are per-sample small
            # products, memory-bound: each multiply-add costs about KS_CONTRACT GEMM ones
            ks = sum(N1 * N2 * (d * col_tiles(o) + o) + KS_CONTRACT * (N1 + N2) * C * o for d, o in dense)
            cost[name] = ks / rate[name] + ws + setup / AMORTIZE + rest_cost
            memory[name] = float(factor_bytes)

    # dense: explicit Jacobians, only when small
    dense_bytes = N_sum * C * P * el
    if dense_bytes <= min(budget, DENSE_MAX_BYTES) and N1 * C <= DENSE_MAX_ROWS:
        cost["dense"] = 2 * (N1 + N2) * C * P / rate["dense"] + 3 * C * F * N_sum / AMORTIZE
        memory["dense"] = float(dense_bytes)

    return {"cost": cost, "memory": memory, "P": P, "C": C, "N1": N1, "N2": N2, "device": dev,
            "layers": [(L, d, o) for L, d, o, _, _ in shapes], "unstructured_params": p_rest}


def choose(fm: FunctionalModel, params, fixed, X1: Tensor, X2: Tensor, square: bool, budget: int,
           factor_budget: int | None = None) -> dict:
    """Pick the cheapest feasible backend; returns the estimates with ``backend`` and ``reason``."""
    est = estimate(fm, params, fixed, X1, X2, square, budget, factor_budget)
    cost = est["cost"]
    best = min(cost, key=cost.get)
    ranked = ", ".join(f"{k}={v:.3g}" for k, v in sorted(cost.items(), key=lambda kv: kv[1]))
    reason = f"estimated MACs/rate per product: {ranked}"
    return {**est, "backend": best, "reason": reason}
