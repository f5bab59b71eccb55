"""Model builders for the benchmarks that need architectures beyond an MLP.

``resnet18`` follows torchvision's ResNet-18 layer for layer (7×7 stride-2 stem, max-pool, four
stages of two BasicBlocks, BatchNorm after every convolution, global average pool, a linear
head), built here so the benchmarks need no torchvision. The transformer models are the ones
people reach for: ``nn.TransformerEncoderLayer`` on token ids, a ViT-style patch model, and an
Embedding + LayerNorm + GELU model without attention.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["resnet18", "small_cnn", "TokenTransformer", "PatchTransformer", "EmbedLNGelu"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.down is None else self.down(x)))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 layout (11.2 M parameters with 10 classes), in eval mode."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


def small_cnn(num_classes: int = 10, width: int = 32, batchnorm: bool = False) -> nn.Module:
    """Three 3×3 convolutions (stride 1, 2, 2) and a linear head, for 3×32×32 inputs."""
    def block(cin, cout, stride):
        norm = [nn.BatchNorm2d(cout)] if batchnorm else []
        return [nn.Conv2d(cin, cout, 3, stride, 1), *norm, nn.ReLU()]

    model = nn.Sequential(
        *block(3, width, 1), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, num_classes),
    )
    return model.eval()


class TokenTransformer(nn.Module):
    """Token ids (n, T) -> Embedding + position -> TransformerEncoderLayer -> mean -> Linear."""

    def __init__(self, vocab=100, seq=16, d=64, heads=4, ff=128, num_classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.enc = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, num_classes)
        self.eval()

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids) + self.pos).mean(1))


class PatchTransformer(nn.Module):
    """ViT-style: 8×8 patches of a 3×32×32 image -> Conv2d embedding -> one encoder layer -> head."""

    def __init__(self, d=64, heads=4, ff=128, patch=8, num_classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        n = (32 // patch) ** 2
        self.pos = nn.Parameter(0.02 * torch.randn(n, d))
        self.enc = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)
        self.eval()

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.enc(h)).mean(1))


class EmbedLNGelu(nn.Module):
    """Token ids (n, T) -> Embedding -> LayerNorm -> Linear + GELU -> mean -> Linear."""

    def __init__(self, vocab=100, d=64, hidden=128, num_classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.eval()

    def forward(self, ids):
        return self.head(torch.nn.functional.gelu(self.fc(self.norm(self.emb(ids)))).mean(1))
