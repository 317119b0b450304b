"""Coupling sub-networks. Couplings take a constructor ``net(in_channels, out_channels)``, so
any network can be injected; these are the defaults from Glow."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .actnorm import ActNorm
from .base import watched


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

    fold_norms: bool = False
    """Fold each ActNorm into the conv before it: (W x + b) * s = (s W) x + s b, one convolution
    and no elementwise pass over the activations (5-13% of a Glow training step on 2 CPU cores,
    docs/bench/reference_cpu; plain autograd saves 2 instead of 4 hidden activations per network,
    -31% activation memory at width 512).
    Off by default while the GPU memory measurements that ``flowscale plan`` is checked against
    (docs/bench/memory_h100.json) describe the unfolded network; :func:`fold_norms` turns it on."""

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
        mode = self._norm_path()
        if mode == "folded":
            # The conv output is only read by the ReLU, so the ReLU may overwrite it.
            h = F.relu(_conv_actnorm(x, self.conv1, self.norm1), inplace=True)
            h = F.relu(_conv_actnorm(h, self.conv2, self.norm2), inplace=True)
            return self.out(h)
        if mode == "fused":
            h = _actnorm_relu(self.conv1(x), self.norm1)
            h = _actnorm_relu(self.conv2(h), self.norm2)
            return self.out(h)
        h = _first(self.norm1(self.conv1(x)))
        h = _first(self.norm2(self.conv2(F.relu(h))))
        return self.out(F.relu(h))

    def _norm_path(self) -> str:
        """How the hidden ActNorms run: "modules" (called as modules: spectral norm, or when
        something watches the calls -- the data-dependent init of
        :func:`flowscale.flows.actnorm.initialize_actnorm` and DeepSpeed ZeRO-3, which gathers a
        module's parameters in its forward hooks), else "folded" into the convs
        (``fold_norms``) or "fused": one multiply-add pass, and no log-det (the coupling would
        discard it)."""
        if not isinstance(self.norm1, ActNorm):
            return "modules"  # spectral norm: plain biased convs
        if watched(self.conv1, self.norm1, self.conv2, self.norm2):
            return "modules"
        return "folded" if self.fold_norms else "fused"


def fold_norms(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Set :attr:`GlowNet.fold_norms` on every coupling network of ``model`` (in place)."""
    for m in model.modules():
        if isinstance(m, GlowNet):
            m.fold_norms = enabled
    return model


def compile_networks(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every coupling network of ``model`` in place (``nn.Module.compile``: the
    module and its parameter names stay, so state dicts and checkpoints are unchanged). Inverse
    recompute calls the compiled networks too, with a graph in its fused backward. Returns the
    number of networks compiled: the submodule ``net`` of every flow layer (couplings, learned
    split priors)."""
    from .base import Flow

    nets = [m.net for m in model.modules() if isinstance(m, Flow) and isinstance(getattr(m, "net", None), nn.Module)]
    for net in nets:
        net.compile(backend=backend)
    return len(nets)


def _actnorm_relu(y, norm: ActNorm):
    """``relu(ActNorm(y)[0])`` in one pass: relu(y * s + b * s), s = exp(logs). Saves y and s for
    backward, as ActNorm's (y + b) * s saved y + b; the log-det is not computed."""
    s = torch.exp(norm.logs).to(y.dtype)
    return F.relu(torch.addcmul(norm.bias.to(y.dtype) * s, y, s), inplace=True)


def _conv_actnorm(x, conv: nn.Conv2d, norm: ActNorm):
    """``ActNorm(conv(x))[0]`` as one convolution with weight s W and bias s b (s = exp(logs))."""
    s = torch.exp(norm.logs).reshape(-1)
    w = conv.weight * s.reshape(-1, 1, 1, 1).to(conv.weight.dtype)
    b = norm.bias.reshape(-1) * s
    if conv.bias is not None:
        b = b + conv.bias * s
    return F.conv2d(x, w, b.to(w.dtype), conv.stride, conv.padding, conv.dilation, conv.groups)


def _first(out):
    """ActNorm returns (h, logdet); nn.Identity returns h."""
    return out[0] if isinstance(out, tuple) else out


def glow_net(width: int, out_bias: float = 0.0, spectral_norm: bool = False):
    """A constructor ``(in_channels, out_channels) -> GlowNet`` of the given hidden width."""

    def make(in_channels: int, out_channels: int) -> nn.Module:
        return GlowNet(in_channels, out_channels, width, out_bias, spectral_norm)

    return make
