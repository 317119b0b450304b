"""Coupling sub-networks. Couplings take a constructor ``net(in_channels, out_channels)``, so
any network can be injected; these are the defaults from Glow."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .actnorm import ActNorm


class ZeroConv2d(nn.Module):
    """Zero-initialised conv with a per-channel log-scale (Glow's ``conv2d_zeros``): the
    coupling starts as the identity and the scale lets the output grow quickly."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, logscale_factor: float = 3.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x):
        return self.conv(x) * torch.exp(self.logs * self.logscale_factor).to(x.dtype)


class GlowNet(nn.Module):
    """conv3x3(width) -> ActNorm -> ReLU -> conv1x1(width) -> ActNorm -> ReLU -> ZeroConv3x3(out)."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.norm1 = ActNorm(width)
        self.conv2 = nn.Conv2d(width, width, 1, bias=False)
        self.norm2 = ActNorm(width)
        self.out = ZeroConv2d(width, out_channels)
        nn.init.normal_(self.conv1.weight, std=0.05)
        nn.init.normal_(self.conv2.weight, std=0.05)

    def forward(self, x):
        h, _ = self.norm1(self.conv1(x))
        h, _ = self.norm2(self.conv2(F.relu(h)))
        return self.out(F.relu(h))


def glow_net(width: int):
    """A constructor ``(in_channels, out_channels) -> GlowNet`` of the given hidden width."""

    def make(in_channels: int, out_channels: int) -> nn.Module:
        return GlowNet(in_channels, out_channels, width)

    return make
