"""The test case registry: model factories x data factories, and an independent reference NTK.

The reference Jacobian is built with plain ``torch.autograd.grad``, one (sample, output) row at a
time, in float64 — nothing shared with the library's torch.func code paths.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class Squeeze(nn.Module):
    def forward(self, x):
        return x.squeeze(-1)


class ResBlock(nn.Module):
    """A ResNet-style block with BatchNorm (used in eval mode)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics and affine parameters, then eval mode."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


@dataclass
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    C: int


def _mlp(C: int, scalar: bool = False) -> Callable[[], nn.Module]:
    def make():
        layers = [nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 10), nn.GELU(), nn.Linear(10, C)]
        if scalar:
            layers.append(Squeeze())
        return nn.Sequential(*layers)

    return make


def _cnn(C: int) -> Callable[[], nn.Module]:
    def make():
        return _randomize_bn(
            nn.Sequential(
                nn.Conv2d(2, 3, 3),
                nn.BatchNorm2d(3),
                nn.Tanh(),
                nn.Conv2d(3, 4, 3, stride=2),
                nn.Flatten(),
                nn.Linear(4 * 2 * 2, C),
            )
        )

    return make


def _resnet(C: int) -> Callable[[], nn.Module]:
    def make():
        return _randomize_bn(
            nn.Sequential(
                nn.Conv2d(2, 3, 3, padding=1),
                ResBlock(3),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
                nn.Linear(12, C),
            )
        )

    return make


def _ntk_mlp(parametrization: str, b_std: float) -> Callable[[], nn.Module]:
    def make():
        from ntkscale.models import MLP

        return MLP(5, [9, 7], 3, activation="tanh", W_std=1.3, b_std=b_std, parametrization=parametrization)

    return make


def _ntk_cnn(parametrization: str) -> Callable[[], nn.Module]:
    def make():
        from ntkscale.models import CNN

        return CNN(2, [3, 4], 2, activation="erf", W_std=1.5, b_std=0.4, parametrization=parametrization)

    return make


CASES = {
    "mlp-C1": Case("mlp-C1", _mlp(1), (5,), 1),
    "mlp-scalar": Case("mlp-scalar", _mlp(1, scalar=True), (5,), 1),
    "mlp-C3": Case("mlp-C3", _mlp(3), (5,), 3),
    "cnn-C2": Case("cnn-C2", _cnn(2), (2, 7, 7), 2),
    "resnet-C2": Case("resnet-C2", _resnet(2), (2, 5, 5), 2),
    # ntkscale.models: the layers' multipliers are factored by the structured backends
    "models-mlp-ntk": Case("models-mlp-ntk", _ntk_mlp("ntk", 0.7), (5,), 3),
    "models-mlp-ntk-b0": Case("models-mlp-ntk-b0", _ntk_mlp("ntk", 0.0), (5,), 3),
    "models-mlp-standard": Case("models-mlp-standard", _ntk_mlp("standard", 0.7), (5,), 3),
    "models-cnn-ntk": Case("models-cnn-ntk", _ntk_cnn("ntk"), (2, 5, 5), 2),
    "models-cnn-standard": Case("models-cnn-standard", _ntk_cnn("standard"), (2, 5, 5), 2),
}


def make(case: str, n: int = 6, m: int = 4, dtype=torch.float64, seed: int = 0):
    """Model (in ``dtype``), train data (n, *in), test data (m, *in)."""
    c = CASES[case]
    torch.manual_seed(seed)
    model = c.make_model().to(dtype)
    X = torch.randn(n, *c.in_shape, dtype=dtype)
    Xt = torch.randn(m, *c.in_shape, dtype=dtype)
    return model, X, Xt


def reference_jacobian(model: nn.Module, X: torch.Tensor, names=None) -> torch.Tensor:
    """Explicit float64 Jacobian, shape (n*C, P), row i*C + c, by one autograd.grad per row."""
    model = copy.deepcopy(model).double()
    params = [p for n, p in model.named_parameters() if (names is None and p.requires_grad) or (names is not None and n in names)]
    rows = []
    for i in range(X.shape[0]):
        out = model(X[i : i + 1].double()).reshape(-1)
        for c in range(out.numel()):
            g = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(g, params)]))
    return torch.stack(rows)


def reference_ntk(model, X1, X2=None, names=None) -> torch.Tensor:
    J1 = reference_jacobian(model, X1, names)
    J2 = J1 if X2 is None else reference_jacobian(model, X2, names)
    return J1 @ J2.T
