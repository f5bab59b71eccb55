"""The cost model behind ``backend="auto"``: which backends can run here, and which is fastest.

``choose`` first asks each backend whether it can run at all in this process:

* ``autodiff``: a forward-mode product through the model on one sample succeeds (PyTorch's
  fused attention fast path, for one, has no forward-mode rule);
* ``structured``: the per-layer factors of one sample can be taken (every ``nn.Linear`` /
  ``nn.Conv2d`` whose parameters are differentiated is called as a module), and autodiff runs
  for the parameters it cannot factor;
* ``cuda`` (the csrc kernel; its C++ twin on a CPU): the extension is loaded or built in its
  cache folder, or can be built — a C++ compiler, ``ninja``, the sources, and ``nvcc`` for
  tensors on a GPU (see :func:`extension_status`);
* ``keops``: pykeops imports and a C++ compiler is there for its formulas;
* ``dense``: its explicit Jacobians fit in memory.

Then it estimates, from one probe of the model on one sample (the forward FLOPs counted by
``torch.utils.flop_counter``, the structured layers' shapes, the bytes of activations), the
seconds of each runnable backend:

* ``setup_s``: the one-off work of the first product — the structured factor pass (a forward and
  C batched backward passes), the explicit Jacobians of ``dense``, and the compile of the csrc
  extension (``COMPILE_S``) or of a KeOps formula when not cached;
* ``product_s``: each product — FLOPs at the device's GEMM rate scaled by each implementation's
  relative rate, plus the bytes it streams (cached factors, Jacobians, activations) at the
  memory bandwidth, plus a per-call overhead for small problems.

and picks the least ``setup_s + EXPECTED_PRODUCTS · product_s`` (a CG solve's worth of products
by default; pass ``products=`` to :func:`choose` for another workload). Parameters the structured
backend cannot factor (BatchNorm, LayerNorm, embeddings) cost it an autodiff pass from the first
module that holds one to the output: a BatchNorm after a ResNet's first convolution makes the
structured product no cheaper than autodiff's.

The rates (``RATES``, one CPU thread's, scaled by ``torch.get_num_threads()``) were calibrated
with ``benchmarks/bench_auto.py`` (MLPs, CNNs with and without BatchNorm, a ResNet-18-shaped CNN,
transformers) and ``benchmarks/bench_crossover.py`` on a shared 2-core x86-64 CPU; only their
ratios matter for the pick, except against the fixed compile times. The GPU rates are nominal
until measured.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import shutil
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..functional import FunctionalModel, activation_bytes_per_sample, default_chunk_size

__all__ = [
    "choose",
    "estimate",
    "extension_status",
    "keops_status",
    "ExtensionStatus",
    "ModelProfile",
    "profile_model",
    "EXPECTED_PRODUCTS",
]

EXPECTED_PRODUCTS = 20  # products a one-off setup is weighed against (a preconditioned CG solve)
DENSE_MAX_ROWS = 4096
DENSE_MAX_BYTES = 64 * 2**20
DENSE_FALLBACK_BYTES = 2**30  # explicit Jacobians allowed when no other backend can run
COMPILE_S = {"cpu": 30.0, "cuda": 90.0}  # building the csrc extension (C++ only / with nvcc)
STRIDED_COPY = 8.0  # a strided copy's cost, in contiguous streams of the same bytes
EXT_LOAD_S = 0.1  # loading the built extension into the process
KEOPS_COMPILE_S = 15.0  # a new KeOps formula, compiled on first use (cached by KeOps afterwards)


@dataclass(frozen=True)
class DeviceRates:
    """Throughputs of one device kind.

    Attributes:
        gemm_macs: multiply-adds per second of a large float32 GEMM.
        bandwidth: bytes per second streamed from memory.
        rel: each implementation's compute rate relative to ``gemm_macs``.
        call_s: fixed seconds per layer call of a product (Python and dispatch), per backend.
    """

    gemm_macs: float
    bandwidth: float
    rel: dict = field(default_factory=dict)
    call_s: dict = field(default_factory=dict)


RATES = {
    "cpu": DeviceRates(
        gemm_macs=1.8e10,
        bandwidth=3.0e9,
        rel={"autodiff": 0.6, "autodiff_conv": 0.25, "structured": 0.8, "dense": 1.0,
             "factor": 0.5, "factor_conv": 0.1, "cuda": 0.4, "keops": 0.003},
        call_s={"autodiff": 1.0e-4, "structured": 4.0e-5, "dense": 2.0e-5, "cuda": 1.0e-4,
                "keops": 2.0e-3},
    ),
    "cuda": DeviceRates(
        gemm_macs=2.0e13,
        bandwidth=3.0e12,
        rel={"autodiff": 0.6, "autodiff_conv": 0.4, "structured": 0.8, "dense": 1.0,
             "factor": 0.5, "factor_conv": 0.3, "cuda": 0.3, "keops": 0.2},
        call_s={"autodiff": 1.5e-4, "structured": 6.0e-5, "dense": 3.0e-5, "cuda": 2.0e-4,
                "keops": 2.0e-3},
    ),
}


def _rates(dev: str) -> DeviceRates:
    """The device's rates; on a CPU, GEMMs and memory traffic scale with torch's threads (the
    table holds one thread's)."""
    r = RATES[dev]
    if dev != "cpu":
        return r
    t = max(1, torch.get_num_threads())
    return replace(r, gemm_macs=r.gemm_macs * t, bandwidth=r.bandwidth * min(t, 2))


# -- can it run? ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtensionStatus:
    """Whether the compiled csrc extension can be used.

    Attributes:
        built: loaded in this process, or a library newer than its sources is in the cache folder.
        buildable: a compiler, ninja and the sources are there (and nvcc when ``cuda`` is needed).
        cuda: whether the (built or to-be-built) library has the CUDA kernel.
        reason: why it can be neither loaded nor built ("" when it can).
    """

    built: bool
    buildable: bool
    cuda: bool
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.built or self.buildable


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


@functools.lru_cache(maxsize=None)
def _ninja() -> bool:
    from torch.utils import cpp_extension

    try:
        return bool(cpp_extension.is_ninja_available())
    except Exception:  # noqa: BLE001 - any failure to run ninja means no ninja
        return False


def extension_status(device: str = "cpu") -> ExtensionStatus:
    """Whether the csrc extension is built, or can be built, for tensors on ``device``.

    Args:
        device: ``"cpu"`` (the C++ twin is enough) or ``"cuda"`` (the CUDA kernel is needed).

    Returns:
        An :class:`ExtensionStatus`; nothing is compiled or loaded.
    """
    from ..reductions import compiled

    need_cuda = device == "cuda"
    mod = compiled.loaded_extension()
    if mod is not None:
        has_cuda = bool(getattr(mod, "with_cuda", lambda: False)())
        if has_cuda or not need_cuda:
            return ExtensionStatus(True, True, has_cuda)
        return ExtensionStatus(False, False, False, "the loaded extension was built without CUDA")
    want_cuda = compiled.wants_cuda()
    if need_cuda and not want_cuda:
        return ExtensionStatus(False, False, False,
                               "tensors are on a GPU but nvcc (CUDA_HOME) or a CUDA device is missing")
    try:
        compiled.csrc_dir()
    except FileNotFoundError as err:
        return ExtensionStatus(False, False, want_cuda, str(err))
    built = compiled.is_built()
    missing = []
    if _compiler() is None:
        missing.append("a C++ compiler (c++/g++ on PATH, or $CXX)")
    if not built and not _ninja():  # running ninja costs a process: only when it would build
        missing.append("ninja (pip install ninja)")
    reason = "" if built or not missing else (
        "cannot build the csrc extension: no " + " and no ".join(missing))
    return ExtensionStatus(built, not missing, want_cuda, reason)


_NO_PYKEOPS = "pykeops is not installed (pip install 'ntkscale[keops]')"


@functools.lru_cache(maxsize=None)
def _keops_importable() -> str:
    if importlib.util.find_spec("pykeops") is None:
        return _NO_PYKEOPS
    try:
        importlib.import_module("pykeops")
    except Exception as err:  # noqa: BLE001 - any import failure makes the backend unusable
        return f"pykeops does not import: {type(err).__name__}: {err}"
    return ""


def keops_status(import_check: bool = True) -> str:
    """Why the KeOps backend cannot run here ("" when it can): pykeops must import, and its
    formulas need a C++ compiler.

    Args:
        import_check: import pykeops (about a second, once per process); ``False`` only looks
            for the package.
    """
    if import_check:
        first = _keops_importable()
    else:
        first = _NO_PYKEOPS if importlib.util.find_spec("pykeops") is None else ""
    why = [first] if first else []
    if _compiler() is None:
        why.append("KeOps compiles its formulas with a C++ compiler, and none was found")
    return "; ".join(why)


# -- what does the model cost? -----------------------------------------------------------------
@dataclass
class ModelProfile:
    """What one probe of the model on one sample tells the cost model.

    Attributes:
        forward_macs: multiply-adds of one sample's forward pass (FLOP counter / 2).
        conv_macs: of those, the ones in convolutions (slower than GEMMs under torch.func).
        after_rest_macs: of those, the ones at or after the first module holding a parameter the
            structured backend cannot factor (what autodiff must differentiate for it).
        activation_bytes: bytes of the module outputs of one sample's forward pass.
        calls: module calls in one forward pass (a proxy for per-op overhead).
        layers: per structured layer ``(L, d, o, has_weight, has_bias)``.
        rest_params: number of parameters outside the structured layers.
        num_outputs: C.
        param_bytes: bytes per parameter element.
        num_params: P.
        autodiff_error: why a forward-mode product failed on one sample ("" when it ran).
        structured_error: why the factors of one sample could not be taken ("" when they could).
    """

    forward_macs: float
    conv_macs: float
    after_rest_macs: float
    activation_bytes: float
    calls: int
    layers: list
    rest_params: int
    num_outputs: int
    param_bytes: int
    num_params: int
    autodiff_error: str = ""
    structured_error: str = ""

    @property
    def factor_bytes_per_sample(self) -> float:
        C = self.num_outputs
        return float(sum(L * (d + C * o) for L, d, o, _, _ in self.layers) * self.param_bytes)

    @property
    def structured_macs(self) -> float:
        return float(sum(L * d * o for L, d, o, _, _ in self.layers))


def _owner(fm: FunctionalModel, name: str, called: set[str]) -> str:
    """The nearest module that owns parameter ``name`` and was called in the forward pass."""
    parts = name.split(".")[:-1]
    while parts and ".".join(parts) not in called:
        parts.pop()
    return ".".join(parts)


def profile_model(fm: FunctionalModel, params, fixed, X: Tensor) -> ModelProfile:
    """Probe the model on the first sample of ``X`` (the first two tell which layers the
    structured backend can factor); see :class:`ModelProfile`."""
    from torch.utils.flop_counter import FlopCounterMode

    from .base import KernelData
    from .structured import compute_factors, factorable_layers

    params, fixed = tuple(params), tuple(fixed)
    x1 = X[:1]
    data = KernelData(fm, params, fixed, X[:2], X[:2], True, 1, 2**30)
    try:
        specs, rest = factorable_layers(data)
    except Exception as err:  # noqa: BLE001 - the check itself failed: nothing can be factored
        specs, rest, check_error = [], list(fm.names), f"{type(err).__name__}: {err}"[:300]
    else:
        check_error = ""
    # forward order: the FLOP count so far at each module call
    mods = dict(fm.module.named_modules())
    counter = FlopCounterMode(display=False)
    at: dict[str, float] = {}
    handles = []
    for mname, mod in mods.items():
        def pre(_m, _a, mname=mname):
            at.setdefault(mname, counter.get_total_flops() / 2)
        handles.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad(), counter:
            fm(params, fixed, x1)
    finally:
        for h in handles:
            h.remove()
    F = counter.get_total_flops() / 2
    F_conv = sum(v for op, v in counter.get_flop_counts().get("Global", {}).items()
                 if "convolution" in str(op)) / 2
    called = set(at)
    rest_set = set(rest)
    firsts = [at.get(_owner(fm, n, called), 0.0) for n in rest_set]
    after = F - min(firsts) if firsts else 0.0
    pos = dict(zip(fm.names, params))
    p_rest = sum(pos[n].numel() for n in rest)

    autodiff_error = ""
    try:
        tangents = tuple(torch.ones_like(p) for p in params)
        torch.func.jvp(fm.bind(fixed, x1), (params,), (tangents,))
    except Exception as err:  # noqa: BLE001 - any failure means autodiff cannot run this model
        autodiff_error = f"{type(err).__name__}: {err}"[:300]

    layers, structured_error = [], ""
    if specs:
        try:
            fac = compute_factors(data, specs, x1)
            for spec, A, G in zip(specs, fac.A, fac.G):
                layers.append((A.shape[1], A.shape[2], G.shape[3], spec.weight is not None,
                               spec.bias is not None))
        except Exception as err:  # noqa: BLE001 - recorded as the reason it cannot run
            structured_error = f"{type(err).__name__}: {err}"[:300]
    else:
        structured_error = check_error or (
            "no nn.Linear or nn.Conv2d layer among the differentiated parameters")
    if rest and autodiff_error and not structured_error:
        structured_error = (f"its {len(rest)} unstructured parameters need autodiff, which fails: "
                            f"{autodiff_error}")
    return ModelProfile(
        forward_macs=float(F) or float(sum(p.numel() for p in params)),
        conv_macs=float(F_conv),
        after_rest_macs=float(after),
        activation_bytes=float(activation_bytes_per_sample(fm, params, fixed, x1)),
        calls=len(called),
        layers=layers,
        rest_params=int(p_rest),
        num_outputs=fm.num_outputs,
        param_bytes=params[0].element_size(),
        num_params=sum(p.numel() for p in params),
        autodiff_error=autodiff_error,
        structured_error=structured_error,
    )


def _mac_s(prof: ModelProfile, macs: float, r: DeviceRates, kind: str) -> float:
    """Seconds for ``macs`` multiply-adds of the model's mix of convolutions and the rest, by
    ``kind`` of pass ("autodiff" or "factor")."""
    share = prof.conv_macs / prof.forward_macs if prof.forward_macs else 0.0
    return macs * ((1 - share) / r.rel[kind] + share / r.rel[kind + "_conv"]) / r.gemm_macs


def _autodiff_pass_s(prof: ModelProfile, n: int, chunk: int, r: DeviceRates, macs_per_sample: float,
                     act_passes: float) -> float:
    """One chunked torch.func pass over n samples."""
    n_chunks = math.ceil(n / max(1, chunk))
    return (_mac_s(prof, n * macs_per_sample, r, "autodiff")
            + act_passes * n * prof.activation_bytes / r.bandwidth
            + n_chunks * prof.calls * r.call_s["autodiff"])


def estimate(fm: FunctionalModel, params, fixed, X1: Tensor, X2: Tensor, square: bool,
             budget: int, factor_budget: int | None = None, chunk_size: int | None = None,
             profile: ModelProfile | None = None) -> dict:
    """Per-backend ``setup_s`` and ``product_s`` (seconds), memory (bytes), and why the others
    cannot run (``cannot_run``). ``cost`` is the setup spread over ``EXPECTED_PRODUCTS`` plus one
    product, per backend."""
    from ..reductions import compiled
    from .base import DEFAULT_FACTOR_BUDGET

    factor_budget = factor_budget or DEFAULT_FACTOR_BUDGET
    prof = profile or profile_model(fm, params, fixed, X1[:2])
    dev = "cuda" if X1.device.type == "cuda" else "cpu"
    r = _rates(dev)
    C, P, el = prof.num_outputs, prof.num_params, prof.param_bytes
    N1, N2 = X1.shape[0], (X1.shape[0] if square else X2.shape[0])
    N_sum = N1 + (0 if square else N2)  # samples whose factors / Jacobians are cached
    if chunk_size is None:
        chunk_size = default_chunk_size(int(prof.activation_bytes), budget)
    F = prof.forward_macs
    setup: dict[str, float] = {}
    product: dict[str, float] = {}
    memory: dict[str, float] = {}
    cannot: dict[str, str] = {}

    # autodiff: a VJP pass (forward + backward ≈ 3F) over X2, a JVP pass (≈ 3F) over X1
    if prof.autodiff_error:
        cannot["autodiff"] = prof.autodiff_error
    else:
        setup["autodiff"] = 0.0
        product["autodiff"] = (_autodiff_pass_s(prof, N2, chunk_size, r, 3 * F, 3.0)
                               + _autodiff_pass_s(prof, N1, chunk_size, r, 3 * F, 3.0))
        memory["autodiff"] = 0.0

    # structured family: factor pass once, then GEMMs on the cached factors; the rest by autodiff
    fb = prof.factor_bytes_per_sample * N_sum
    n_layers = len(prof.layers)
    if prof.structured_error:
        for b in ("structured", "cuda", "keops"):
            cannot[b] = prof.structured_error
    else:
        # a forward, then C cotangents batched through a backward to the layer outputs only
        factor_pass = _mac_s(prof, (1 + C) * F * N_sum, r, "factor") + 2 * fb / r.bandwidth
        rest = 0.0
        if prof.rest_params:
            # forward through everything; backward and tangents from the first such module on
            rest = (_autodiff_pass_s(prof, N2, chunk_size, r, F + 2 * prof.after_rest_macs, 1.0)
                    + _autodiff_pass_s(prof, N1, chunk_size, r, F + 2 * prof.after_rest_macs, 1.0))
        cached = fb <= factor_budget
        ws_macs = sum((N1 + N2) * L * d * o for L, d, o, _, _ in prof.layers)
        # factors streamed twice (the VJP reads side 2, the JVP side 1); layers with several
        # positions (convolutions) also permute copies of their (n, L, o) blocks
        ws_bytes = sum((1 if L == 1 else 4) * L * (d + C * o) * el * (N1 + N2)
                       for L, d, o, _, _ in prof.layers)
        ws = (ws_macs / (r.gemm_macs * r.rel["structured"]) + ws_bytes / r.bandwidth
              + 2 * n_layers * r.call_s["structured"])
        if cached:
            setup["structured"] = factor_pass
            product["structured"] = ws + rest
        else:  # factors recomputed chunk by chunk on every product
            setup["structured"] = 0.0
            product["structured"] = ws + rest + factor_pass
        memory["structured"] = float(fb)

        dense = [(d + (1 if b else 0), o) for L, d, o, _, b in prof.layers if L == 1]
        others = [(L, d, o) for L, d, o, _, _ in prof.layers if L != 1]
        if not dense:
            for b in ("cuda", "keops"):
                cannot[b] = "no dense (nn.Linear on vectors) layer to reduce in kernel space"
        elif not cached:
            for b in ("cuda", "keops"):
                cannot[b] = f"factors of {fb / 2**30:.2f} GiB exceed the factor budget"
        else:
            ws_other = (
                sum((N1 + N2) * L * d * o for L, d, o in others) / (r.gemm_macs * r.rel["structured"])
                + 4 * sum(L * (d + C * o) for L, d, o in others) * el * (N1 + N2) / r.bandwidth
            )
            for b in ("cuda", "keops"):
                if b == "cuda":
                    st = extension_status(dev)
                    if not st.usable:
                        cannot[b] = st.reason
                        continue
                    compile_s = (0.0 if compiled.loaded_extension() is not None
                                 else EXT_LOAD_S if st.built else COMPILE_S[dev])
                    tiles = (lambda o: -(-o // 64)) if dev == "cuda" else (lambda o: 1)
                else:
                    why = keops_status(import_check=False)  # imported by choose() if picked
                    if why:
                        cannot[b] = why
                        continue
                    compile_s = KEOPS_COMPILE_S
                    tiles = lambda o: 1  # noqa: E731
                # per pair of samples: the A inner product (d) and the o-long sum of W over j;
                # the contraction with G1 comes after the sum over j
                ks_macs = sum(N1 * N2 * (d * tiles(o) + o) for d, o in dense)
                g_elems = sum((N1 + N2) * C * o for _, o in dense)
                contract = g_elems / r.gemm_macs
                if C > 1:  # the output gradients (n, C, o) are re-laid out (strided) per product
                    contract += STRIDED_COPY * g_elems * el / r.bandwidth
                setup[b] = factor_pass + compile_s
                product[b] = (ks_macs / (r.gemm_macs * r.rel[b]) + contract + ws_other + rest
                              + len(dense) * r.call_s[b])
                memory[b] = float(fb)

    # dense: explicit Jacobians (N·C × P), only when small -- or larger when nothing else runs
    dense_bytes = N_sum * C * P * el
    cap = min(budget, DENSE_MAX_BYTES) if product else DENSE_FALLBACK_BYTES
    if dense_bytes <= cap and (N1 * C <= DENSE_MAX_ROWS or not product):
        # jacrev per sample: a forward and C backward passes, vmapped
        setup["dense"] = _mac_s(prof, (1 + 2 * C) * F * N_sum, r, "factor") + dense_bytes / r.bandwidth
        product["dense"] = (2 * dense_bytes * (N1 + N2) / (2 * N_sum) / r.bandwidth
                            + 2 * r.call_s["dense"])
        memory["dense"] = float(dense_bytes)
    else:
        cannot["dense"] = (f"explicit Jacobians of {dense_bytes / 2**20:.0f} MiB / {N1 * C} rows "
                           f"exceed {cap / 2**20:.0f} MiB / {DENSE_MAX_ROWS} rows")

    cost = {b: setup[b] / EXPECTED_PRODUCTS + product[b] for b in product}
    return {"cost": cost, "setup_s": setup, "product_s": product, "memory": memory,
            "cannot_run": cannot, "P": P, "C": C, "N1": N1, "N2": N2, "device": dev,
            "gemm_macs": r.gemm_macs,
            "chunk_size": chunk_size, "forward_macs": F, "after_rest_macs": prof.after_rest_macs,
            "activation_bytes": prof.activation_bytes, "calls": prof.calls,
            "layers": [(L, d, o) for L, d, o, _, _ in prof.layers],
            "unstructured_params": prof.rest_params}


def choose(fm: FunctionalModel, params, fixed, X1: Tensor, X2: Tensor, square: bool, budget: int,
           factor_budget: int | None = None, products: int | None = None,
           chunk_size: int | None = None) -> dict:
    """Pick the backend with the least ``setup_s + products · product_s`` among those that can run.

    Args:
        fm, params, fixed, X1, X2, square, budget, factor_budget: the operator's model and data.
        products: products the setup is weighed against (default ``EXPECTED_PRODUCTS``).
        chunk_size: samples per autodiff pass (default: from the memory budget).

    Returns:
        The estimates of :func:`estimate` with ``backend``, ``total_s`` and ``reason``.

    Raises:
        RuntimeError: when no backend can run, with each one's reason.
    """
    products = EXPECTED_PRODUCTS if products is None else int(products)
    est = estimate(fm, params, fixed, X1, X2, square, budget, factor_budget, chunk_size)
    total = {b: est["setup_s"][b] + products * est["product_s"][b] for b in est["product_s"]}
    if not total:
        why = "; ".join(f"{b}: {msg}" for b, msg in est["cannot_run"].items())
        raise RuntimeError(f"backend='auto' found no backend that can run this model: {why}")
    best = min(total, key=total.get)
    if best == "keops" and keops_status():  # found but does not import: drop it
        est["cannot_run"]["keops"] = keops_status()
        del total["keops"]
        best = min(total, key=total.get)  # dense/autodiff/structured remain when keops could be costed
    ranked = ", ".join(f"{k}={v:.3g}s" for k, v in sorted(total.items(), key=lambda kv: kv[1]))
    reason = f"estimated seconds for setup + {products} products: {ranked}"
    if est["cannot_run"]:
        reason += "; cannot run: " + "; ".join(f"{b} ({m})" for b, m in est["cannot_run"].items())
    return {**est, "backend": best, "total_s": total, "products": products, "reason": reason}
