"""GPyTorch ExactGP with ``NTKKernel``: marginal-likelihood training at N = 10,000, matrix-free.

A trained MLP (8-64-64-1, tanh) on a synthetic regression problem; ``ScaleKernel(NTKKernel(net))``
with a ``GaussianLikelihood`` in a standard ``gpytorch.models.ExactGP``. With Cholesky off
(``max_cholesky_size(0)``, ``max_eager_kernel_size(0)``), 20 Adam steps on the noise and output
scale (GPyTorch's exact MLL: CG solves and a stochastic log-determinant), then predictions with
``fast_pred_var``. Records time per step, peak memory (RSS growth in a fresh process; the dense
float64 kernel alone would be 8·N² bytes), the number of ``to_dense`` calls on any NTK operator
(instrumented: must be 0), NTK products, and the same first MLL step with GPyTorch's own rank-15
pivoted-Cholesky preconditioner (``NTKKernel(..., preconditioner=None)``) for comparison: NTK
products and the relative residual of one solve at a fixed CG budget.

Usage:
    python benchmarks/bench_gpytorch.py --out benchmarks/results/cpu/gpytorch.json
    python benchmarks/bench_gpytorch.py --quick --out /tmp/gpytorch_quick.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import ntkscale as nks

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

QUICK = {"n": 2000, "width": 64, "steps": 5, "n_test": 200}
FULL = {"n": 10_000, "width": 64, "steps": 20, "n_test": 500}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small preset: {QUICK}")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="Adam steps on noise and output scale")
    p.add_argument("--rank", type=int, default=100, help="Nyström preconditioner rank")
    p.add_argument("--compare-budget", type=int, default=50, help="CG iterations of the preconditioner comparison")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/cpu/gpytorch.json")
    return _common.apply_preset(p.parse_args(argv), QUICK, FULL)


def _problem(args):
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    d = 8
    X = torch.randn(args.n, d, generator=g).to(dtype)
    w = torch.randn(d, generator=g).to(dtype)
    y = torch.sin(X @ w / d**0.5 * 2) + 0.1 * torch.randn(args.n, generator=g).to(dtype)
    Xt = torch.randn(args.n_test, d, generator=g).to(dtype)
    torch.manual_seed(args.seed)
    net = _common.mlp([d, args.width, args.width, 1], torch.nn.Tanh).to(dtype)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(200):
        opt.zero_grad()
        ((net(X).squeeze(-1) - y) ** 2).mean().backward()
        opt.step()
    return net, X, y, Xt


def _model(net, X, y, rank, preconditioner):
    import gpytorch

    from ntkscale.gpytorch import NTKKernel

    class NTKExactGP(gpytorch.models.ExactGP):
        def __init__(self, X, y, likelihood):
            super().__init__(X, y, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(
                NTKKernel(net, preconditioner_rank=rank, preconditioner=preconditioner, backend="structured")
            )

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    lik = gpytorch.likelihoods.GaussianLikelihood()
    return NTKExactGP(X, y, lik).to(X.dtype), lik



def train_and_predict(args_dict: dict) -> dict:
    """In a fresh process: train 20 steps matrix-free, predict; counters, times, peak memory."""
    import gpytorch

    args = argparse.Namespace(**args_dict)
    net, X, y, Xt = _problem(args)
    model, lik = _model(net, X, y, args.rank, "nystrom")
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    out: dict = {"steps": []}

    def run():
        with nks.count_products() as cnt, gpytorch.settings.max_cholesky_size(0), \
                gpytorch.settings.max_eager_kernel_size(0):
            model.train()
            lik.train()
            for step in range(args.steps):
                t0 = time.perf_counter()
                p0 = cnt.columns
                opt.zero_grad()
                loss = -mll(model(X), y)
                loss.backward()
                opt.step()
                out["steps"].append({
                    "step": step, "seconds": time.perf_counter() - t0, "neg_mll_per_n": loss.item(),
                    "noise": lik.noise.item(), "outputscale": model.covar_module.outputscale.item(),
                    "ntk_product_columns": cnt.columns - p0,
                })
                print(f"step {step}: -mll/N {loss.item():.4f} noise {lik.noise.item():.4g} "
                      f"outputscale {model.covar_module.outputscale.item():.4g} "
                      f"({out['steps'][-1]['seconds']:.1f} s)", flush=True)
            out["train_seconds"] = sum(s["seconds"] for s in out["steps"])
            model.eval()
            lik.eval()
            t0 = time.perf_counter()
            with torch.no_grad(), gpytorch.settings.fast_pred_var():
                pred = lik(model(Xt))
                mean, var = pred.mean, pred.variance
            out["predict_seconds"] = time.perf_counter() - t0
            out["to_dense_calls"] = cnt.dense
            out["ntk_products"] = cnt.products
            out["ntk_product_columns"] = cnt.columns
            out["test_rmse_vs_net"] = ((mean - net(Xt).squeeze(-1).detach()) ** 2).mean().sqrt().item()
            out["mean_predictive_sd"] = var.sqrt().mean().item()

    mem = _common.peak_during(run)
    out["memory"] = mem
    out["dense_kernel_bytes"] = 8 * args.n**2 if args.dtype == "float64" else 4 * args.n**2
    return out


def compare_preconditioners(args_dict: dict) -> dict:
    """One MLL step and one solve at a fixed CG budget: ntkscale's Nyström vs GPyTorch's default."""
    import gpytorch

    args = argparse.Namespace(**args_dict)
    net, X, y, Xt = _problem(args)
    res = {}
    for name, pre in (("nystrom", "nystrom"), ("gpytorch_pivoted_cholesky", None)):
        model, lik = _model(net, X, y, args.rank, pre)
        model.train()
        lik.train()
        with torch.no_grad(), nks.count_products() as cnt, gpytorch.settings.max_cholesky_size(0), \
                gpytorch.settings.max_eager_kernel_size(0), \
                gpytorch.settings.max_cg_iterations(args.compare_budget), gpytorch.settings.cg_tolerance(1e-10):
            covar = lik(model(X)).lazy_covariance_matrix.evaluate_kernel()  # c Θ + σ² I
            rhs = (y - y.mean()).unsqueeze(-1)
            t0 = time.perf_counter()
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # CG stops at the budget, not at the tolerance
                x = covar.solve(rhs)  # GPyTorch's preconditioned CG: its preconditioner, then the solve
            solve_s = time.perf_counter() - t0
            r = (covar @ x - rhs).norm() / rhs.norm()
            res[name] = {"cg_iterations": args.compare_budget, "solve_seconds": solve_s,
                         "relative_residual": r.item(), "to_dense_calls": cnt.dense}
        print(f"{name}: relative residual {r.item():.2e} after {args.compare_budget} CG iterations "
              f"(preconditioner and solve {solve_s:.1f} s)", flush=True)
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    doc = {"benchmark": "gpytorch", "config": vars(args), "environment": _common.environment(), "complete": False}
    doc["train"] = _common.run_isolated(train_and_predict, vars(args))
    _common.write_json(args.out, doc)
    doc["preconditioners"] = _common.run_isolated(compare_preconditioners, vars(args))
    doc["complete"] = True
    _common.write_json(args.out, doc)
    t = doc["train"]
    if "steps" in t:
        print(f"{args.steps} Adam steps in {t['train_seconds']:.1f} s; peak RSS growth "
              f"{t['memory']['peak_growth_bytes'] / 2**20:.0f} MiB (dense kernel alone: "
              f"{t['dense_kernel_bytes'] / 2**20:.0f} MiB); to_dense calls: {t['to_dense_calls']}")
    else:
        print(t)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
