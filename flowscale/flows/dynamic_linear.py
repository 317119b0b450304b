"""The dynamic linear transform (DLT) of Dynamic Linear Flow (Liao, He & Shu 2019; reference
code naturomics/DLF). A generalised affine coupling: the channels are split into P partitions
x_1..x_P (P is the paper's K; ``model.steps`` is the number of flow steps), and every
partition is scaled and shifted by parameters that depend on the partition before it:

    y_1 = (x_1 + mu_1) * exp(s_1)                mu_1, s_1 learned per channel (+ W_y onehot(y))
    y_k = (x_k + mu_k) * exp(s_k),  k >= 2       (mu_k, raw_k) = g_k(c_{k-1})  (+ W_y onehot(y))
    s   = alpha * tanh(raw) + beta               alpha, beta learned scalars per partition
    logdet = sum over all partitions and pixels of s

mu takes the even output channels of g_k and raw the odd ones (Glow's layout). Two
decompositions fix what c_{k-1} is, and so which direction is parallel:

    "parallel_train"   c_{k-1} = x_{k-1}: forward computes every (mu_k, s_k) from the input at
                       once (one pass, fast training); the inverse is sequential over k
                       (x_{k-1} must be recovered before g_k can run).
    "parallel_sample"  c_{k-1} = y_{k-1}: the forward is sequential; the inverse computes all
                       parameters from its input y at once (fast sampling).

Both are triangular maps with Jacobian diagonal exp(s), hence the log-det. With P = 2 and the
first partition fixed to the identity (``first="identity"``, the reference's
--affine_coupling) both decompositions are exactly Glow's affine coupling with an
alpha*tanh+beta scale.

Partition sizes (``split``): "equal" (C/P each), "increasing" ([C/8, C/8, C/4, C/2], the
reference's --splitting 1) and "decreasing" ([C/2, C/4, C/8, C/8], --splitting 2); the
last two need P = 4.

What the reference does and what is chosen here (every choice is a constructor argument):

* s = tanh(raw) * rescale + scale_shift with *scalar* ``rescale`` (init 1) and
  ``scale_shift`` (init -3), one pair per g_k and one for partition 1: alpha and beta here.
* g_k's last layer is a zero-initialised 3x3 conv whose bias the reference initialises to
  ones (``conv2d_zeros``), so at init mu = 1 and s = tanh(1) - 3 ~ -2.24 everywhere: every
  step contracts its input and pulls it towards the fixed point e^s / (1 - e^s) ~ 0.12.
  ``out_bias`` (config ``model.dlt_out_bias``) sets that bias; 1.0 is the reference's.
* Partition 1's learned (mu_1, raw_1) start at ``out_bias`` too (the reference draws them
  Glorot-uniform at random), so partition 1 starts like the others.
* The reference's ActNorm inside g_k is a plain affine map initialised to b random,
  log-scale -3; here it is flowscale's ActNorm with data-dependent init (as in Glow).
* The class projection (a bias-free dense layer of the one-hot label, added to the
  outputs of partition 1 and of every g_k) is zero-initialised here (random in the
  reference), so a class-conditional model starts as the unconditional one.
* The reference sizes partition 1's parameters from partition 2 (a bug for unequal splits);
  here they have partition 1's size.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import nn

from .base import Flow, sum_except_batch

NetFactory = Callable[[int, int], nn.Module]
Split = Literal["equal", "increasing", "decreasing"]
Decomposition = Literal["parallel_train", "parallel_sample"]


def partition_sizes(channels: int, partitions: int, split: Split = "equal") -> list[int]:
    """Channel counts of the P partitions; raises ValueError when they do not fit."""
    if partitions < 2:
        raise ValueError(f"a dynamic linear transform needs at least 2 partitions, got {partitions}")
    if split == "equal":
        if channels % partitions:
            raise ValueError(f"{channels} channels do not split into {partitions} equal partitions")
        sizes = [channels // partitions] * partitions
    elif split in ("increasing", "decreasing"):
        if partitions != 4:
            raise ValueError(f"split={split!r} is defined for 4 partitions, got {partitions}")
        if channels % 4:
            raise ValueError(f"split={split!r} needs channels divisible by 4, got {channels}")
        sizes = [math.floor(channels / 8), math.ceil(channels / 8), channels // 4, channels // 2]
        if split == "decreasing":
            sizes = sizes[::-1]
    else:
        raise ValueError(f"unknown split {split!r}; choose equal, increasing or decreasing")
    if min(sizes) < 1:
        raise ValueError(f"{channels} channels are too few for split={split!r} (partitions {sizes})")
    return sizes


class TanhScalar(nn.Module):
    """s = alpha * tanh(raw) + beta with learned scalars alpha (init 1) and beta (init ``beta``)."""

    def __init__(self, beta: float = -3.0):
        super().__init__()
        # Shape [1], not a 0-dim scalar: DeepSpeed broadcasts parameters through a uint8 view,
        # which 0-dim tensors do not allow.
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.full((1,), float(beta)))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.alpha.to(raw.dtype) * torch.tanh(raw) + self.beta.to(raw.dtype)


class ClassProjection(nn.Module):
    """W onehot(y) for labels y [B] (a bias-free dense layer as an embedding), zero-initialised;
    returns [B, out, 1, 1]."""

    def __init__(self, num_classes: int, out_channels: int):
        super().__init__()
        self.embed = nn.Embedding(num_classes, out_channels)
        nn.init.zeros_(self.embed.weight)

    def forward(self, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            raise ValueError("this model is class-conditional (model.num_classes > 0): pass labels y")
        return self.embed(y)[:, :, None, None]


class FirstPartition(nn.Module):
    """(mu_1, s_1) for partition 1: learned per channel, plus a projection of the label."""

    def __init__(self, channels: int, num_classes: int = 0, beta: float = -3.0, init: float = 1.0):
        super().__init__()
        self.h = nn.Parameter(torch.full((1, 2 * channels, 1, 1), float(init)))
        self.cond = ClassProjection(num_classes, 2 * channels) if num_classes > 0 else None
        self.scale = TanhScalar(beta)

    def forward(self, like: torch.Tensor, cond: torch.Tensor | None):
        h = self.h.to(like.dtype)
        if self.cond is not None:
            h = h + self.cond(cond).to(like.dtype)
        h = h.expand(like.shape[0], -1, like.shape[2], like.shape[3])
        return h[:, 0::2], self.scale(h[:, 1::2])


class PartitionNet(nn.Module):
    """(mu_k, s_k) = g_k(c_{k-1}): the injected network, plus a projection of the label."""

    def __init__(self, in_channels: int, channels: int, net: NetFactory, num_classes: int = 0, beta: float = -3.0):
        super().__init__()
        self.net = net(in_channels, 2 * channels)
        self.cond = ClassProjection(num_classes, 2 * channels) if num_classes > 0 else None
        self.scale = TanhScalar(beta)

    def forward(self, source: torch.Tensor, cond: torch.Tensor | None):
        # The network may run in bf16 under autocast; shift and scale are applied in the
        # activations' dtype so exp(-s) inverts exp(s) to that dtype's precision.
        h = self.net(source).to(source.dtype)
        if self.cond is not None:
            h = h + self.cond(cond).to(source.dtype)
        return h[:, 0::2], self.scale(h[:, 1::2])


class DynamicLinearTransform(Flow):
    """The DLT on [B, C, H, W] (see the module docstring).

    Args:
        channels: C.
        net: constructor ``(in_channels, out_channels) -> module`` for g_k; its output layer
            should be zero-initialised (its bias sets the initial mu and raw scale).
        partitions: P >= 2.
        split: "equal", "increasing" or "decreasing" partition sizes.
        decomposition: "parallel_train" or "parallel_sample".
        first: "affine" (learned per-channel map on partition 1) or "identity".
        num_classes: > 0 adds a projection of the one-hot label (``cond``, int64 [B]).
        beta: initial beta of every s = alpha * tanh(raw) + beta (reference: -3).
        first_init: initial value of partition 1's learned (mu, raw) (set it to the g_k
            output bias so partition 1 starts like the others).
    """

    def __init__(self, channels: int, net: NetFactory, partitions: int = 2, split: Split = "equal",
                 decomposition: Decomposition = "parallel_train", first: Literal["affine", "identity"] = "affine",
                 num_classes: int = 0, beta: float = -3.0, first_init: float = 1.0):
        super().__init__()
        if decomposition not in ("parallel_train", "parallel_sample"):
            raise ValueError(f"unknown decomposition {decomposition!r}; choose parallel_train or parallel_sample")
        if first not in ("affine", "identity"):
            raise ValueError(f"unknown first-partition map {first!r}; choose affine or identity")
        self.sizes = partition_sizes(channels, partitions, split)
        self.decomposition = decomposition
        self.first = FirstPartition(self.sizes[0], num_classes, beta, first_init) if first == "affine" else None
        self.g = nn.ModuleList(PartitionNet(self.sizes[k - 1], self.sizes[k], net, num_classes, beta)
                               for k in range(1, len(self.sizes)))

    def _params(self, k: int, source: torch.Tensor, like: torch.Tensor, cond):
        """(mu_k, s_k) for partition k (0-based) from c_{k-1} = ``source``; None for an identity."""
        if k == 0:
            return None if self.first is None else self.first(like, cond)
        return self.g[k - 1](source, cond)

    @staticmethod
    def _map(v, params, inverse: bool):
        if params is None:
            return v
        shift, log_s = params
        return v * torch.exp(-log_s) - shift if inverse else (v + shift) * torch.exp(log_s)

    def _transform(self, v, cond, inverse: bool, sequential: bool):
        """Map every partition of ``v`` (x forward, y inverse). g_k reads partition k-1 of the
        input ``v`` itself (``sequential=False``: no dependence between partitions, one pass) or
        of the output built so far (``sequential=True``: partition by partition)."""
        parts = v.split(self.sizes, dim=1)
        outs, logdet = [], None
        for k, part in enumerate(parts):
            source = None if k == 0 else (outs[k - 1] if sequential else parts[k - 1])
            params = self._params(k, source, part, cond)
            outs.append(self._map(part, params, inverse))
            if params is not None:
                ld = sum_except_batch(params[1])
                logdet = ld if logdet is None else logdet + ld
        return torch.cat(outs, dim=1), logdet

    def _forward(self, x, cond):
        # parallel_train: c_{k-1} = x_{k-1}, read from the input; parallel_sample: y_{k-1}, the output.
        return self._transform(x, cond, inverse=False, sequential=self.decomposition == "parallel_sample")

    def _inverse(self, z, cond):
        # parallel_train: c_{k-1} = x_{k-1}, the output here; parallel_sample: y_{k-1}, the input.
        x, logdet = self._transform(z, cond, inverse=True, sequential=self.decomposition == "parallel_train")
        return x, -logdet
