"""A network's NTK as a GPyTorch kernel: exact-GP hyperparameter training and predictions.

Trains a small MLP on a 1-D regression problem, then hands its empirical NTK to a standard
``gpytorch.models.ExactGP`` (``ScaleKernel(NTKKernel(net))`` with a ``GaussianLikelihood``),
fits the noise and output scale by maximizing GPyTorch's exact marginal likelihood, and predicts
— once with GPyTorch's defaults (a Cholesky factor, at this size) and once matrix-free (Cholesky
off, CG preconditioned by ntkscale's Nyström factor, LOVE variances by ``fast_pred_var``).

Run: ``python examples/gpytorch_ntk.py``  (seconds on a laptop CPU).
"""

from __future__ import annotations

import math

import gpytorch
import torch

from ntkscale.gpytorch import NTKKernel

torch.manual_seed(0)
DT = torch.float64

# -- data and a trained network ---------------------------------------------------------------
N = 120
X = torch.cat([torch.rand(N // 2, 1) * 2 - 3, torch.rand(N - N // 2, 1) * 2 + 1]).to(DT)  # two clusters
y = torch.sin(3 * X).squeeze(-1) + 0.1 * torch.randn(N, dtype=DT)
X_test = torch.linspace(-4, 4, 81, dtype=DT).unsqueeze(-1)

net = torch.nn.Sequential(
    torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
).to(DT)
opt = torch.optim.Adam(net.parameters(), lr=1e-2)
for _ in range(300):
    opt.zero_grad()
    ((net(X).squeeze(-1) - y) ** 2).mean().backward()
    opt.step()


# -- a standard ExactGP with the NTK as its kernel ---------------------------------------------
class NTKExactGP(gpytorch.models.ExactGP):
    def __init__(self, X, y, likelihood, net):
        super().__init__(X, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(NTKKernel(net, preconditioner_rank=30))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


likelihood = gpytorch.likelihoods.GaussianLikelihood()
model = NTKExactGP(X, y, likelihood, net).to(DT)
print("trainable:", [name for name, _ in model.named_parameters()])  # the network is not among them

mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
model.train()
likelihood.train()
for step in range(20):
    optimizer.zero_grad()
    loss = -mll(model(X), y)
    loss.backward()
    optimizer.step()
noise, outputscale = likelihood.noise.item(), model.covar_module.outputscale.item()
print(f"after 20 Adam steps: -mll/N = {loss.item():.4f}, noise = {noise:.4g}, outputscale = {outputscale:.4g}")

model.eval()
likelihood.eval()
with torch.no_grad():
    pred = likelihood(model(X_test))  # GPyTorch's defaults: Cholesky at this size
    mean, var = pred.mean, pred.variance

with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), gpytorch.settings.max_eager_kernel_size(0), \
        gpytorch.settings.min_preconditioning_size(50), gpytorch.settings.fast_pred_var():
    model.prediction_strategy = None  # drop the caches built with Cholesky
    pred_cg = likelihood(model(X_test))  # CG + Nyström preconditioner, LOVE variances
    mean_cg, var_cg = pred_cg.mean, pred_cg.variance

print(f"max |mean(Cholesky) - mean(CG)| = {(mean - mean_cg).abs().max().item():.2e}")
print(f"max |var(Cholesky) - var(LOVE)| = {(var - var_cg).abs().max().item():.2e}")
gap = X_test.squeeze(-1).abs() < 0.5  # between the two clusters of training data
inside = (X_test.squeeze(-1) > 1.2) & (X_test.squeeze(-1) < 2.8)
print(
    f"predictive sd: in the data {var[inside].sqrt().mean().item():.3f}, "
    f"in the gap {var[gap].sqrt().mean().item():.3f}"
)
rmse = math.sqrt(((mean[inside] - torch.sin(3 * X_test.squeeze(-1)[inside])) ** 2).mean().item())
print(f"RMSE against sin(3x) inside the data: {rmse:.3f}")
