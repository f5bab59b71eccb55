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


class SharedMLP(nn.Module):
    """One hidden Linear applied twice (shared weights): both uses count in the NTK."""

    def __init__(self, C: int):
        super().__init__()
        self.inp = nn.Linear(5, 9)
        self.hidden = nn.Linear(9, 9)
        self.out = nn.Linear(9, C)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.hidden(h))
        h = torch.tanh(self.hidden(h))  # the same layer again
        return self.out(h)


class TiedMLP(nn.Module):
    """A Linear called as a module and its weight used again functionally (tied weights)."""

    def __init__(self, C: int):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.hidden = nn.Linear(6, 6)
        self.out = nn.Linear(6, C)

    def forward(self, x):
        h = torch.tanh(self.hidden(torch.tanh(self.inp(x))))
        h = torch.tanh(nn.functional.linear(h, self.hidden.weight.T))  # the weight, used directly
        return self.out(h)


class SequenceLinear(nn.Module):
    """A Linear applied to every position of a sequence (n, T, d), then mean-pooled."""

    def __init__(self, C: int):
        super().__init__()
        self.proj = nn.Linear(4, 7)
        self.head = nn.Linear(7, C)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(1))


class TransformerClassifier(nn.Module):
    """Token ids (n, T) -> Embedding + learned positions -> TransformerEncoderLayer -> head."""

    def __init__(self, C: int, vocab: int = 11, T: int = 5, d: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, T, d) * 0.1)
        self.enc = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=12, dropout=0.1, batch_first=True)
        self.head = nn.Linear(d, C)

    def forward(self, ids):
        h = self.enc(self.embed(ids) + self.pos)
        return self.head(h.mean(1))


class PatchViT(nn.Module):
    """ViT-style: patches by a strided Conv2d, a class token, positions, attention, head."""

    def __init__(self, C: int, ch: int = 2, size: int = 6, patch: int = 3, d: int = 8):
        super().__init__()
        n_patches = (size // patch) ** 2
        self.patch = nn.Conv2d(ch, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, d) * 0.1)
        self.attn = nn.MultiheadAttention(d, num_heads=2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.head = nn.Linear(d, C)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)  # (n, patches, d)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h + a)
        h = h + self.mlp(h)
        return self.head(h[:, 0])


def _randn_data(n: int, in_shape, dtype) -> torch.Tensor:
    return torch.randn(n, *in_shape, dtype=dtype)


def _token_data(vocab: int):
    def data(n: int, in_shape, dtype) -> torch.Tensor:
        return torch.randint(0, vocab, (n, *in_shape))

    return data


@dataclass
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    C: int
    make_data: Callable = _randn_data


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


CASES = {
    "mlp-C1": Case("mlp-C1", _mlp(1), (5,), 1),
    "mlp-scalar": Case("mlp-scalar", _mlp(1, scalar=True), (5,), 1),
    "mlp-C3": Case("mlp-C3", _mlp(3), (5,), 3),
    "cnn-C2": Case("cnn-C2", _cnn(2), (2, 7, 7), 2),
    "resnet-C2": Case("resnet-C2", _resnet(2), (2, 5, 5), 2),
    "shared-C2": Case("shared-C2", lambda: SharedMLP(2), (5,), 2),
    "tied-C2": Case("tied-C2", lambda: TiedMLP(2), (5,), 2),
    "seqlinear-C2": Case("seqlinear-C2", lambda: SequenceLinear(2), (6, 4), 2),
    "transformer-C3": Case(
        "transformer-C3", lambda: TransformerClassifier(3).eval(), (5,), 3, _token_data(11)
    ),
    "vit-C2": Case("vit-C2", lambda: PatchViT(2).eval(), (2, 6, 6), 2),
}


def make(case: str, n: int = 6, m: int = 4, dtype=torch.float64, seed: int = 0):
    """Model (in ``dtype``), train data (n, *in), test data (m, *in)."""
    c = CASES[case]
    torch.manual_seed(seed)
    model = c.make_model().to(dtype)
    X = c.make_data(n, c.in_shape, dtype)
    Xt = c.make_data(m, c.in_shape, dtype)
    return model, X, Xt


def reference_jacobian(model: nn.Module, X: torch.Tensor, names=None) -> torch.Tensor:
    """Explicit float64 Jacobian, shape (n*C, P), row i*C + c, by one autograd.grad per row."""
    model = copy.deepcopy(model).double()
    params = [p for n, p in model.named_parameters() if (names is None and p.requires_grad) or (names is not None and n in names)]
    rows = []
    for i in range(X.shape[0]):
        x = X[i : i + 1]
        out = model(x.double() if x.is_floating_point() else x).reshape(-1)
        for c in range(out.numel()):
            g = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(g, params)]))
    return torch.stack(rows)


def reference_ntk(model, X1, X2=None, names=None) -> torch.Tensor:
    J1 = reference_jacobian(model, X1, names)
    J2 = J1 if X2 is None else reference_jacobian(model, X2, names)
    return J1 @ J2.T
