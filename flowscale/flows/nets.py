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

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, logscale_factor: float = 3.0,
                 bias: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.constant_(self.conv.bias, bias)  # DLF's conv2d_zeros starts its bias at 1
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x):
        return self.conv(x) * torch.exp(self.logs * self.logscale_factor).to(x.dtype)


class GlowNet(nn.Module):
    """conv3x3(width) -> ActNorm -> ReLU -> conv1x1(width) -> ActNorm -> ReLU -> ZeroConv3x3(out).

    ``out_bias``: initial bias of the zero-initialised output conv. ``spectral_norm``: bound
    the spectral norm of the two hidden convs at 1 (see :mod:`flowscale.flows.spectral`) and
    replace their ActNorms by plain biases -- a learned scale after the conv would undo the
    bound. The zero-initialised output conv is left free (its norm is 0 at init); the
    coupling's bounded scale function limits what it can do.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 512, out_bias: float = 0.0,
                 spectral_norm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=spectral_norm)
        self.norm1 = nn.Identity() if spectral_norm else ActNorm(width)
        self.conv2 = nn.Conv2d(width, width, 1, bias=spectral_norm)
        self.norm2 = nn.Identity() if spectral_norm else ActNorm(width)
        self.out = ZeroConv2d(width, out_channels, bias=out_bias)
        if self.conv1.weight.device.type != "meta":  # meta (flowscale plan): nothing to fill, and slow to "fill"
            nn.init.normal_(self.conv1.weight, std=0.05)
            nn.init.normal_(self.conv2.weight, std=0.05)
        if spectral_norm:
            from .spectral import spectral_norm_

            spectral_norm_(self.conv1, seed=1)
            spectral_norm_(self.conv2, seed=2)

    def forward(self, x):
        h = _first(self.norm1(self.conv1(x)))
        h = _first(self.norm2(self.conv2(F.relu(h))))
        return self.out(F.relu(h))


def _first(out):
    """ActNorm returns (h, logdet); nn.Identity returns h."""
    return out[0] if isinstance(out, tuple) else out


def glow_net(width: int, out_bias: float = 0.0, spectral_norm: bool = False):
    """A constructor ``(in_channels, out_channels) -> GlowNet`` of the given hidden width."""

    def make(in_channels: int, out_channels: int) -> nn.Module:
        return GlowNet(in_channels, out_channels, width, out_bias, spectral_norm)

    return make
