"""Fully connected and convolutional networks in NTK or standard parametrization.

A dense or convolutional layer with fan-in ``n`` (``in_features``, or ``in_channels · k²``) is

- ``parametrization="ntk"``: ``z = (W_std / √n) W a + b_std b`` with ``W, b ~ N(0, 1)`` — the
  convention of neural-tangents' ``stax.Dense(W_std, b_std, parameterization="ntk")``, whose
  infinite-width limits are :func:`ntkscale.kernels.infinite_nngp` /
  :func:`ntkscale.kernels.infinite_ntk`;
- ``parametrization="standard"``: ``z = W a + b`` with ``W ~ N(0, W_std² / n)``,
  ``b ~ N(0, b_std²)`` — the same function class at initialization, a different NTK scaling.

The multipliers live on the layers (:class:`ScaledLinear`, :class:`ScaledConv2d`, subclasses of
``nn.Linear`` / ``nn.Conv2d`` with ``weight_scale`` and ``bias_scale``), so the structured NTK
backends factor them like plain layers. A bias with ``b_std = 0`` in NTK parametrization is still a
parameter (with zero gradient). Initialization draws from the global torch seed.

>>> import torch
>>> from ntkscale.models import MLP
>>> _ = torch.manual_seed(0)
>>> MLP(3, [16, 16], 2)(torch.randn(5, 3)).shape
torch.Size([5, 2])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "CNN", "ScaledLinear", "ScaledConv2d", "ACTIVATIONS", "PARAMETRIZATIONS"]

ACTIVATIONS = ("relu", "erf", "tanh", "gelu")
PARAMETRIZATIONS = ("ntk", "standard")


class Erf(nn.Module):
    """Elementwise ``erf``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.erf(x)


def activation_module(name: str) -> nn.Module:
    """The module of an activation name in :data:`ACTIVATIONS`."""
    if name == "relu":
        return nn.ReLU()
    if name == "erf":
        return Erf()
    if name == "tanh":
        return nn.Tanh()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


class ScaledLinear(nn.Linear):
    """``z = weight_scale · W a + bias_scale · b`` (``nn.Linear`` with constant multipliers)."""

    def __init__(self, in_features: int, out_features: int, weight_scale: float = 1.0, bias_scale: float = 1.0,
                 **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        self.weight_scale = float(weight_scale)
        self.bias_scale = float(bias_scale)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias * self.bias_scale
        return F.linear(x, self.weight * self.weight_scale, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_scale={self.weight_scale:.4g}, bias_scale={self.bias_scale:.4g}"


class ScaledConv2d(nn.Conv2d):
    """``z = weight_scale · W ⋆ a + bias_scale · b`` (``nn.Conv2d`` with constant multipliers)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, weight_scale: float = 1.0,
                 bias_scale: float = 1.0, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.weight_scale = float(weight_scale)
        self.bias_scale = float(bias_scale)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias * self.bias_scale
        return self._conv_forward(x, self.weight * self.weight_scale, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_scale={self.weight_scale:.4g}, bias_scale={self.bias_scale:.4g}"


def _check(activation, W_std, b_std, parametrization) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
    if not (isinstance(W_std, (int, float)) and math.isfinite(W_std) and W_std > 0):
        raise ValueError(f"W_std must be a finite number > 0, got {W_std!r}")
    if not (isinstance(b_std, (int, float)) and math.isfinite(b_std) and b_std >= 0):
        raise ValueError(f"b_std must be a finite number >= 0, got {b_std!r}")


def _check_sizes(name: str, sizes, what: str) -> list[int]:
    try:
        sizes = list(sizes)
    except TypeError:
        raise ValueError(f"{name} must be a non-empty list of positive ints, got {sizes!r}") from None
    if not sizes or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in sizes):
        raise ValueError(f"{name} must be a non-empty list of positive ints ({what}), got {sizes!r}")
    return sizes


def _positive_int(name: str, v) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _init(layer: nn.Module, fan_in: int, W_std: float, b_std: float, parametrization: str) -> nn.Module:
    """Draw the layer's parameters and set its multipliers for the parametrization."""
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
        if parametrization == "ntk":
            layer.weight_scale, layer.bias_scale = W_std / math.sqrt(fan_in), float(b_std)
        else:
            layer.weight.mul_(W_std / math.sqrt(fan_in))
            layer.bias.mul_(b_std)
            layer.weight_scale, layer.bias_scale = 1.0, 1.0
    return layer


class MLP(nn.Sequential):
    """A fully connected network: ``len(widths)`` hidden layers with ``activation``, then a dense
    readout to ``out_features``.

    Args:
        in_features: input dimension ``d``.
        widths: hidden widths, a non-empty list of positive ints.
        out_features: number of outputs ``C``.
        activation: ``"relu"``, ``"erf"``, ``"tanh"`` or ``"gelu"``.
        W_std: weight standard deviation ``σ_w > 0`` (times ``1/√fan_in``).
        b_std: bias standard deviation ``σ_b ≥ 0``.
        parametrization: ``"ntk"`` or ``"standard"`` (see the module docstring).

    Input (n, in_features), output (n, out_features).
    """

    def __init__(self, in_features: int, widths, out_features: int = 1, activation: str = "relu",
                 W_std: float = 1.0, b_std: float = 0.0, parametrization: str = "ntk"):
        _positive_int("in_features", in_features)
        _positive_int("out_features", out_features)
        widths = _check_sizes("widths", widths, "the hidden widths")
        _check(activation, W_std, b_std, parametrization)
        layers: list[nn.Module] = []
        fan_in = in_features
        for w in widths:
            layers += [_init(ScaledLinear(fan_in, w), fan_in, W_std, b_std, parametrization), activation_module(activation)]
            fan_in = w
        layers.append(_init(ScaledLinear(fan_in, out_features), fan_in, W_std, b_std, parametrization))
        super().__init__(*layers)
        self.in_features, self.widths, self.out_features = in_features, widths, out_features
        self.activation, self.W_std, self.b_std, self.parametrization = activation, float(W_std), float(b_std), parametrization


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions: (n, c, h, w) -> (n, c)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))


class CNN(nn.Sequential):
    """A convolutional network: ``len(channels)`` zero-padded ("same") ``kernel_size`` convolutions
    with ``activation``, global average pooling, then a dense readout to ``out_features``.

    Args:
        in_channels: input channels.
        channels: channels of the convolutions, a non-empty list of positive ints.
        out_features: number of outputs ``C``.
        kernel_size: odd positive int (so zero padding keeps the spatial size).
        activation, W_std, b_std, parametrization: as for :class:`MLP`; a convolution's fan-in is
            ``in_channels · kernel_size²``.

    Input (n, in_channels, H, W), output (n, out_features).
    """

    def __init__(self, in_channels: int, channels, out_features: int, kernel_size: int = 3,
                 activation: str = "relu", W_std: float = 1.0, b_std: float = 0.0, parametrization: str = "ntk"):
        _positive_int("in_channels", in_channels)
        _positive_int("out_features", out_features)
        channels = _check_sizes("channels", channels, "the convolutions' channels")
        _positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (zero padding keeps the size), got {kernel_size}")
        _check(activation, W_std, b_std, parametrization)
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            conv = ScaledConv2d(c_in, c, kernel_size, padding=kernel_size // 2)
            layers += [_init(conv, c_in * kernel_size**2, W_std, b_std, parametrization), activation_module(activation)]
            c_in = c
        layers += [GlobalAvgPool(), _init(ScaledLinear(c_in, out_features), c_in, W_std, b_std, parametrization)]
        super().__init__(*layers)
        self.in_channels, self.channels, self.out_features, self.kernel_size = in_channels, channels, out_features, kernel_size
        self.activation, self.W_std, self.b_std, self.parametrization = activation, float(W_std), float(b_std), parametrization
