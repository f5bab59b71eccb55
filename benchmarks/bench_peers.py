"""Peers side by side: ntkscale, torch.func, curvlinops and laplace-torch on one problem.

One model (an MLP ``d-w-w-C`` trained briefly on a synthetic regression), one set of weights and
one data set are written once; every method then loads them in its own fresh process (spawned,
with a wall-clock timeout and an address-space cap), so the times and peak memories are
separate and a method that runs out of time or memory is recorded as ``timeout`` / ``oom``, not
raised. Three tasks, each answer compared with the float64 dense reference:

* ``gram`` — the full kernel ``Θ(X, X)`` (N·C × N·C): ntkscale's ``NTKOperator.to_dense()``;
  torch.func's two NTK recipes from its NTK tutorial, the Jacobian contraction
  (``vmap(jacrev)`` then ``einsum``) and NTK-vector products (``vjp`` then ``jvp`` for every
  pair of samples and every output unit vector, vmapped; run over blocks of rows so the
  intermediate stays within ``--ntk-vps-bytes``); curvlinops' ``JacobianLinearOperator @
  TransposedJacobianLinearOperator`` applied to the identity.
* ``matvec`` — ``Θ V`` for ``--rhs`` right-hand sides: ntkscale (``--backend`` and
  ``"autodiff"``) against curvlinops' ``J Jᵀ`` (median of ``--repeats``).
* ``variance`` — marginal NTK-GP / linearized-Laplace predictive variances at M test points,
  ``s² [Θ** − Θ*X (Θ + σ²/s² I)⁻¹ ΘX*]`` (prior ``N(θ*, s² I)``, Gaussian noise σ²):
  ``ntkscale.NTKGP(...).predict``, laplace-torch's ``FunctionalLaplace`` (the GP view with
  all N points as its subset, its ``"gp"`` predictive) and ``FullLaplace`` (the full P × P GGN
  posterior, its ``"glm"`` predictive), and a dense float64 Cholesky of ``Θ + σ²/s² I`` from
  explicit Jacobians — the
  reference of all three tasks (its Gram matrix is the reference ``Θ``).

laplace-torch's and ntkscale's predictive means are defined differently (laplace's GLM
predictive mean is the network's output; NTKGP's is the GP posterior mean), so only variances
are compared.

Needs the ``[peers]`` extra (``make peers-install`` installs it without touching torch). Usage:

    python benchmarks/bench_peers.py --out benchmarks/results/cpu/peers.json \\
        --figure docs/figures/peers_cpu.png
    python benchmarks/bench_peers.py --quick --out results/bench/peers.json
    python benchmarks/bench_peers.py --report benchmarks/results/cpu/peers.json   # table + figure
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, mlp, peak_during, run_isolated, timeit, write_json  # noqa: E402

QUICK = {"n": 100, "n_test": 20, "width": 32, "d_in": 8, "outputs": 3}
FULL = {"n": 300, "n_test": 50, "width": 64, "d_in": 20, "outputs": 10}

TASKS = ("gram", "matvec", "variance")
METHODS = {
    "gram": ("ntkscale", "torchfunc_jacobian_contraction", "torchfunc_ntk_vps", "curvlinops_jjt", "dense_cholesky"),
    "matvec": ("ntkscale", "ntkscale_autodiff", "curvlinops_jjt"),
    "variance": ("ntkscale", "laplace_functional", "laplace_full_glm", "dense_cholesky"),
}
LABELS = {
    "ntkscale": "ntkscale",
    "ntkscale_autodiff": "ntkscale (autodiff)",
    "torchfunc_jacobian_contraction": "torch.func Jacobian contraction",
    "torchfunc_ntk_vps": "torch.func NTK-vector products",
    "curvlinops_jjt": "curvlinops J Jᵀ",
    "laplace_functional": "laplace-torch FunctionalLaplace",
    "laplace_full_glm": "laplace-torch FullLaplace (GLM)",
    "dense_cholesky": "dense float64 Cholesky",
}


# ---------------------------------------------------------------------------------------------
# the shared problem


def make_problem(cfg: dict) -> dict:
    """Model, weights and data, made once from ``cfg['seed']`` (the same for every method)."""
    torch.manual_seed(cfg["seed"])
    dtype = getattr(torch, cfg["dtype"])
    widths = [cfg["d_in"], cfg["width"], cfg["width"], cfg["outputs"]]
    model = mlp(widths, torch.nn.Tanh).to(dtype)
    X = torch.randn(cfg["n"], cfg["d_in"], dtype=dtype)
    Xt = torch.randn(cfg["n_test"], cfg["d_in"], dtype=dtype)
    W = torch.randn(cfg["d_in"], cfg["outputs"], dtype=dtype) / math.sqrt(cfg["d_in"])
    y = torch.sin(X @ W) + 0.1 * torch.randn(cfg["n"], cfg["outputs"], dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(cfg["train_steps"]):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    model.eval()
    V = torch.randn(cfg["n"] * cfg["outputs"], cfg["rhs"], dtype=dtype)
    import ntkscale as nks

    mean_diag = nks.NTKOperator(model, X).diagonal().mean().item()
    noise = cfg["noise_rel"] * cfg["prior_scale"] * mean_diag
    P = sum(p.numel() for p in model.parameters())
    return {"widths": widths, "state": model.state_dict(), "X": X, "y": y, "X_test": Xt, "V": V,
            "noise": noise, "mean_diag": mean_diag, "P": P}


def _load(path: str):
    prob = torch.load(path, weights_only=False)
    model = mlp(prob["widths"], torch.nn.Tanh).to(prob["X"].dtype)
    model.load_state_dict(prob["state"])
    model.eval()
    return prob, model


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _timed(fn, rec: dict) -> object:
    out = {}
    rec.update(peak_during(lambda: out.__setitem__("value", fn())))
    return out["value"]


# ---------------------------------------------------------------------------------------------
# the methods: each runs in its own process, saves its answer beside the problem, returns a record


def gram_ntkscale(path: str, cfg: dict) -> torch.Tensor:
    import ntkscale as nks

    prob, model = _load(path)
    return nks.NTKOperator(model, prob["X"], backend=cfg["backend"]).to_dense()


def gram_torchfunc_jacobian_contraction(path: str, cfg: dict) -> torch.Tensor:
    """The torch.func NTK tutorial's first recipe: per-sample Jacobians, then their contraction."""
    from torch.func import functional_call, jacrev, vmap

    prob, model = _load(path)
    params = _params(model)

    def fnet_single(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    X = prob["X"]
    jac = vmap(jacrev(fnet_single), (None, 0))(params, X)
    jac = [j.flatten(2) for j in jac.values()]
    K = torch.stack([torch.einsum("Naf,Mbf->NMab", j, j) for j in jac]).sum(0)  # (N, N, C, C)
    N, C = K.shape[0], K.shape[2]
    return K.permute(0, 2, 1, 3).reshape(N * C, N * C)


def gram_torchfunc_ntk_vps(path: str, cfg: dict) -> torch.Tensor:
    """The torch.func NTK tutorial's second recipe, NTK-vector products, over blocks of rows."""
    from torch.func import functional_call, jvp, vjp, vmap

    prob, model = _load(path)
    params = _params(model)
    X = prob["X"]

    def fnet_single(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    def get_ntk(x1, x2):
        def func_x1(p):
            return fnet_single(p, x1)

        def func_x2(p):
            return fnet_single(p, x2)

        output, vjp_fn = vjp(func_x2, params)

        def get_ntk_slice(vec):
            (vjps,) = vjp_fn(vec)  # vec @ J(x2)
            _, jvps = jvp(func_x1, (params,), (vjps,))  # J(x1) @ vjps
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype).view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis).T  # (C, C): [a, b] = Θ(x1, x2)[a, b]

    N, C, P = X.shape[0], prob["y"].shape[1], prob["P"]
    block = max(1, min(N, int(cfg["ntk_vps_bytes"] // (N * C * P * X.element_size()))))
    rows = [vmap(vmap(get_ntk, (None, 0)), (0, None))(X[i : i + block], X) for i in range(0, N, block)]
    K = torch.cat(rows)  # (N, N, C, C)
    return K.permute(0, 2, 1, 3).reshape(N * C, N * C)


def _curvlinops_jjt(prob, model, batch: int):
    from curvlinops import JacobianLinearOperator, TransposedJacobianLinearOperator

    X, y = prob["X"], prob["y"]
    data = [(X[i : i + batch], y[i : i + batch]) for i in range(0, X.shape[0], batch)]
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(check_deterministic=False, num_data=X.shape[0])
    J = JacobianLinearOperator(model, params, data, **kw)
    JT = TransposedJacobianLinearOperator(model, params, data, **kw)
    return J @ JT


def gram_curvlinops_jjt(path: str, cfg: dict) -> torch.Tensor:
    prob, model = _load(path)
    K = _curvlinops_jjt(prob, model, cfg["batch"])
    n = K.shape[0]
    return K @ torch.eye(n, dtype=prob["X"].dtype)


def _dense_jacobian(model, X) -> torch.Tensor:
    from torch.func import functional_call, jacrev, vmap

    model = model.double()
    params = _params(model)

    def fnet_single(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(fnet_single), (None, 0))(params, X.double())
    return torch.cat([j.flatten(2) for j in jac.values()], dim=2).flatten(0, 1)  # (N*C, P)


def gram_dense_cholesky(path: str, cfg: dict) -> torch.Tensor:
    prob, model = _load(path)
    J = _dense_jacobian(model, prob["X"])
    return J @ J.T


def matvec_ntkscale(path: str, cfg: dict, backend: str | None = None) -> tuple[torch.Tensor, dict]:
    import ntkscale as nks

    prob, model = _load(path)
    K = nks.NTKOperator(model, prob["X"], backend=backend or cfg["backend"])
    V = prob["V"]
    out = K @ V
    return out, {"backend": K.backend, **timeit(lambda: K @ V, repeats=cfg["repeats"], warmup=0)}


def matvec_ntkscale_autodiff(path: str, cfg: dict) -> tuple[torch.Tensor, dict]:
    return matvec_ntkscale(path, cfg, backend="autodiff")


def matvec_curvlinops_jjt(path: str, cfg: dict) -> tuple[torch.Tensor, dict]:
    prob, model = _load(path)
    K = _curvlinops_jjt(prob, model, cfg["batch"])
    V = prob["V"]
    out = K @ V
    return out, timeit(lambda: K @ V, repeats=cfg["repeats"], warmup=0)


def variance_ntkscale(path: str, cfg: dict) -> tuple[torch.Tensor, dict]:
    import ntkscale as nks

    prob, model = _load(path)
    gp = nks.NTKGP(model, prob["X"], prob["y"], noise=prob["noise"], prior_scale=cfg["prior_scale"],
                   backend=cfg["backend"])
    _, var = gp.predict(prob["X_test"], mode="exact")
    return var, {"backend": gp.K.backend, "exact_solver": gp.info.solver}


def _loader(prob, batch: int):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(prob["X"], prob["y"]), batch_size=batch, shuffle=False)


def _laplace_variance(cls, path: str, cfg: dict, pred_type: str, **kwargs) -> tuple[torch.Tensor, dict]:
    """Fit the laplace-torch class ``cls`` on the training set; its predictive marginals."""
    prob, model = _load(path)
    la = cls(model, "regression", sigma_noise=math.sqrt(prob["noise"]),
             prior_precision=1.0 / cfg["prior_scale"], **kwargs)
    t0 = time.perf_counter()
    la.fit(_loader(prob, cfg["batch"]))
    fit_s = time.perf_counter() - t0
    _, f_var = la(prob["X_test"], pred_type=pred_type)
    return f_var.diagonal(dim1=-2, dim2=-1), {"fit_s": fit_s, "laplace_backend": type(la.backend).__name__}


def variance_laplace_functional(path: str, cfg: dict) -> tuple[torch.Tensor, dict]:
    from laplace import FunctionalLaplace

    # the GP over all training samples (n_subset = N: no subset of data points)
    return _laplace_variance(FunctionalLaplace, path, cfg, "gp", n_subset=cfg["n"])


def variance_laplace_full_glm(path: str, cfg: dict) -> tuple[torch.Tensor, dict]:
    from laplace import FullLaplace

    return _laplace_variance(FullLaplace, path, cfg, "glm")


def variance_dense_cholesky(path: str, cfg: dict) -> tuple[torch.Tensor, dict]:
    """``s² [Θ** − Θ*X (Θ + σ²/s² I)⁻¹ ΘX*]`` (marginals) from explicit float64 Jacobians."""
    prob, model = _load(path)
    J = _dense_jacobian(model, prob["X"])
    Js = _dense_jacobian(model, prob["X_test"])
    s2 = cfg["prior_scale"]
    A = J @ J.T
    A.diagonal().add_(prob["noise"] / s2)
    L = torch.linalg.cholesky(A)
    W = torch.linalg.solve_triangular(L, J @ Js.T, upper=False)  # L⁻¹ ΘX*
    var = s2 * ((Js * Js).sum(1) - (W * W).sum(0))
    return var.reshape(prob["X_test"].shape[0], -1), {}


def _run_method(task: str, method: str, path: str, cfg: dict, answer_path: str) -> dict:
    """One method in the current process: timed, with peak RSS growth; its answer saved."""
    if cfg.get("memory_limit_gib") and not cfg.get("inline"):
        cap = int(cfg["memory_limit_gib"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    import ntkscale  # noqa: F401  (imports are not timed)

    if method.startswith("laplace"):
        import laplace  # noqa: F401
    if method.startswith("curvlinops"):
        import curvlinops  # noqa: F401
    fn = globals()[f"{task}_{method}"]
    rec: dict = {"status": "ok"}
    value = _timed(lambda: fn(path, cfg), rec)
    if isinstance(value, tuple):
        value, extra = value
        rec.update(extra)
    torch.save(value.detach().cpu(), answer_path)
    rec["answer_shape"] = list(value.shape)
    return rec


# ---------------------------------------------------------------------------------------------
# comparison, table, figure


def compare(answer: torch.Tensor, reference: torch.Tensor) -> dict:
    """Relative Frobenius and max-entry differences of ``answer`` from ``reference`` (float64)."""
    a, r = answer.double().reshape(reference.shape), reference.double()
    scale = r.abs().max().item()
    return {
        "rel_frobenius": ((a - r).norm() / r.norm()).item(),
        "max_abs_rel": ((a - r).abs().max() / scale).item() if scale > 0 else float("nan"),
    }


def reference_answers(tmp: Path, prob: dict) -> dict:
    """The float64 dense answers: Θ from the dense-Cholesky run, Θ V from it, its variances."""
    ref = {}
    if (tmp / "gram_dense_cholesky.pt").exists():
        ref["gram"] = torch.load(tmp / "gram_dense_cholesky.pt")
        ref["matvec"] = ref["gram"] @ prob["V"].double()
    if (tmp / "variance_dense_cholesky.pt").exists():
        ref["variance"] = torch.load(tmp / "variance_dense_cholesky.pt")
    return ref


def _seconds(rec: dict) -> float | None:
    return rec.get("median_s", rec.get("seconds"))


def _label(task: str, method: str) -> str:
    if method == "dense_cholesky":
        return "dense float64 J Jᵀ (reference)" if task == "gram" else "dense float64 Cholesky (reference)"
    return LABELS[method]


def table(doc: dict) -> str:
    """A markdown table of every task and method: time, peak memory, difference from reference."""
    lines = ["| task | method | time (s) | peak memory (MiB) | rel. difference | note |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for task in doc["tasks"]:
        for method, rec in doc["results"][task].items():
            status = rec.get("status", "ok")
            t = _seconds(rec)
            if status != "ok":
                time_s, mem = status, "—"
            else:
                time_s = f"{t:.3g}" + (" / product" if task == "matvec" else "")
                mem = f"{rec['peak_growth_bytes'] / 2**20:.0f}"
            diff = rec.get("difference", {}).get("rel_frobenius")
            if method == "dense_cholesky":
                diff = "reference" if status == "ok" else "—"
            else:
                diff = "—" if diff is None else f"{diff:.1e}"
            note = []
            if "backend" in rec:
                note.append(f"backend {rec['backend']}")
            if "exact_solver" in rec:
                note.append(f"exact solver {rec['exact_solver']}")
            if rec.get("negative_variances"):
                note.append(f"{rec['negative_variances']} negative variances")
            if "fit_s" in rec:
                note.append(f"fit {rec['fit_s']:.3g} s")
            if status == "timeout":
                note.append(f"stopped after {doc['config']['timeout']:.0f} s")
            if status == "oom":
                note.append(f"over {doc['config']['memory_limit_gib']} GiB")
            if status == "error":
                note.append(str(rec.get("detail", rec.get("exitcode", "")))[:80])
            lines.append(f"| {task} | {_label(task, method)} | {time_s} | {mem} | {diff} | {'; '.join(note)} |")
    return "\n".join(lines)


def hardware(doc: dict) -> str:
    env = doc["environment"]
    load = env.get("load_average_1_5_15min_at_start")
    return (f"{env.get('cpu_model') or env['processor']}, {env['cpus']} CPUs, {env['threads']} threads, torch {env['torch']}"
            + (f", load average {load[0]:.0f}" if load else "")
            + (f", {env['device']}" if env.get("device") else ""))


def figure(doc: dict, path: str) -> None:
    """One panel per task: time of each method (log scale), failures marked; hardware in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = doc["config"]
    tasks = doc["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    titles = {"gram": f"full Gram Θ(X, X), N·C = {cfg['n'] * cfg['outputs']}",
              "matvec": f"Θ V, {cfg['rhs']} right-hand sides",
              "variance": f"predictive variances, M = {cfg['n_test']}"}
    for ax, task in zip(axes[0], tasks):
        recs = doc["results"][task]
        names = list(recs)
        times = [_seconds(recs[m]) if recs[m].get("status", "ok") == "ok" else None for m in names]
        ok = [t for t in times if t]
        top = max(ok) if ok else 1.0
        ok_bars = [t is not None for t in times]
        colors = ["tab:blue" if m.startswith("ntkscale") else ("tab:gray" if good else "whitesmoke")
                  for m, good in zip(names, ok_bars)]
        y = list(range(len(names)))
        bars = [t or top * 3 for t in times]
        ax.barh(y, bars, color=colors, edgecolor="black", linewidth=0.4,
                hatch=None)
        for i, (m, t) in enumerate(zip(names, times)):
            if t is None:
                ax.barh([i], [bars[i]], color="whitesmoke", edgecolor="black", linewidth=0.4, hatch="//")
            diff = recs[m].get("difference", {}).get("rel_frobenius")
            label = (f"{t:.2g} s" if t else recs[m].get("status", "?")) + (f"  (Δ {diff:.0e})" if diff else "")
            ax.text(bars[i] * 1.08, i, label, va="center", fontsize=8)
        ax.set_xlim(left=min(ok or [1.0]) / 4)
        ax.set_yticks(y, [_label(task, m) for m in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(right=top * 30)
        ax.set_xlabel("seconds (lower is better)")
        ax.set_title(titles[task], fontsize=9)
    fig.suptitle(f"MLP {'-'.join(map(str, [cfg['d_in'], cfg['width'], cfg['width'], cfg['outputs']]))}, "
                 f"N = {cfg['n']}, P = {doc['P']:,}, {cfg['dtype']}; Δ: relative difference from the float64 "
                 f"reference\n{hardware(doc)}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small preset (seconds): {QUICK}")
    p.add_argument("--n", type=int, default=None, help=f"training points (default {FULL['n']})")
    p.add_argument("--n-test", type=int, default=None, help=f"test points (default {FULL['n_test']})")
    p.add_argument("--width", type=int, default=None, help=f"hidden width (default {FULL['width']})")
    p.add_argument("--d-in", type=int, default=None, help=f"input features (default {FULL['d_in']})")
    p.add_argument("--outputs", type=int, default=None, help=f"outputs C (default {FULL['outputs']})")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--backend", default="auto", help="ntkscale's backend (default auto)")
    p.add_argument("--rhs", type=int, default=8, help="right-hand sides of the matvec task")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the matvec task")
    p.add_argument("--noise-rel", type=float, default=0.1, help="σ² = noise_rel · s² · mean diag Θ")
    p.add_argument("--prior-scale", type=float, default=1.0, help="prior variance s² of the weights")
    p.add_argument("--batch", type=int, default=256, help="data batch of curvlinops and laplace-torch")
    p.add_argument("--ntk-vps-bytes", type=float, default=2**28,
                   help="bound on the NTK-vector-product recipe's per-block intermediate (bytes)")
    p.add_argument("--train-steps", type=int, default=50)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--timeout", type=float, default=300, help="seconds each method may run")
    p.add_argument("--memory-limit-gib", type=float, default=6.0,
                   help="address-space cap of every method's process (and of the set-up)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inline", action="store_true", help="run the methods in this process (tests)")
    p.add_argument("--out", default="results/bench/peers.json")
    p.add_argument("--figure", default=None, help="also write the figure here (PNG)")
    p.add_argument("--report", metavar="JSON", default=None,
                   help="only print the table of a finished run (and write --figure)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def run(args: argparse.Namespace) -> dict:
    """Make the problem, run every method of every task, compare the answers; returns the doc."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_limit_gib and not args.inline:  # the problem set-up stays within the cap too
        cap = int(args.memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    cfg = {k: v for k, v in vars(args).items() if k not in ("report",)}
    env = {**environment(), "cpu_model": _cpu_model(),
           "load_average_1_5_15min_at_start": list(os.getloadavg())}
    doc = {"benchmark": "peers", "config": cfg, "environment": env, "tasks": list(args.tasks),
           "results": {}, "complete": False}
    with tempfile.TemporaryDirectory(prefix="ntkscale-peers-") as tmpdir:
        tmp = Path(tmpdir)
        prob = make_problem(cfg)
        torch.save(prob, tmp / "problem.pt")
        doc.update(P=prob["P"], noise=prob["noise"], mean_diag=prob["mean_diag"])
        # the reference runs first, so that every later answer can be compared as it comes
        order = sorted(((t, m) for t in args.tasks for m in METHODS[t]),
                       key=lambda tm: (tm[1] != "dense_cholesky", TASKS.index(tm[0])))
        for task in args.tasks:
            doc["results"][task] = {m: {"status": "pending"} for m in METHODS[task]}
        for i, (task, method) in enumerate(order, 1):
            answer = str(tmp / f"{task}_{method}.pt")
            print(f"[{i}/{len(order)}] {task:8s} {LABELS[method]} ...", end=" ", flush=True)
            if args.inline:
                rec = _run_method(task, method, str(tmp / "problem.pt"), cfg, answer)
            else:
                rec = run_isolated(_run_method, task, method, str(tmp / "problem.pt"), cfg, answer,
                                   timeout=args.timeout)
            rec.setdefault("status", "ok")
            ref = reference_answers(tmp, prob).get(task)
            if rec["status"] == "ok" and ref is not None and method != "dense_cholesky":
                rec["difference"] = compare(torch.load(answer), ref)
            if rec["status"] == "ok" and task == "variance":
                rec["negative_variances"] = int((torch.load(answer) < 0).sum())
            doc["results"][task][method] = rec
            write_json(args.out, doc)
            shown = f"{_seconds(rec):.3g} s" if rec["status"] == "ok" else rec["status"]
            diff = rec.get("difference", {}).get("rel_frobenius")
            print(shown + (f", rel. difference {diff:.1e}" if diff is not None else ""), flush=True)
    doc["environment"]["load_average_1_5_15min_at_end"] = list(os.getloadavg())
    doc["complete"] = True
    write_json(args.out, doc)
    return doc


def _stop(signum, frame):
    """Stopping this process stops the method running in its child too: never leave it running."""
    import multiprocessing as mp

    for child in mp.active_children():
        child.kill()
    sys.exit(128 + signum)


def missing_peers() -> str | None:
    """Why the peers cannot run (a package of the ``[peers]`` extra is missing), or ``None``."""
    for mod in ("laplace", "curvlinops"):
        try:
            __import__(mod)
        except ImportError as err:
            return (f"needs the [peers] extra ({mod}: {err}); install it with `make peers-install` "
                    "(see the README's Optional extras)")
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = None if args.report else missing_peers()
    if reason:  # skipped, not failed: the rest of `ntkscale bench` goes on
        print(f"bench_peers: skipped: {reason}")
        write_json(args.out, {"benchmark": "peers", "status": "skipped", "reason": reason,
                              "environment": environment()})
        return 0
    if not args.inline:
        import signal

        signal.signal(signal.SIGTERM, _stop)
    if args.report:
        doc = json.loads(Path(args.report).read_text())
    else:
        doc = run(args)
    print(table(doc))
    print(f"hardware: {hardware(doc)}")
    if args.figure:
        figure(doc, args.figure)
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
