"""Gaussian priors, written as the last invertible layer on each latent ("Gaussianize").

A learned Gaussian p(z) = N(z; mu, diag(sigma^2)) equals a standard normal on
eps = (z - mu) / sigma together with the log-det -sum(log sigma). Writing priors this way
keeps the whole model a single flow ``x -> (eps_1..eps_L, logdet)`` under one contract:

    log p(x) = sum_l log N(eps_l; 0, I) + logdet

Sampling at temperature T draws eps ~ N(0, T^2 I) and runs the inverse, so every prior
becomes N(mu, (T sigma)^2) (openai/glow's definition); T = 0 gives each prior's mean.

* :class:`SplitPrior`: p(z_2 | z_1) for the half factored out at a split, mu and log sigma
  from a zero-initialised conv of the kept half z_1 (Glow's split2d), passed as ``cond``.
* :class:`TopPrior`: p(z_L) with learned per-channel mu, log sigma (Glow's ``learntop``),
  plus a class-conditional shift from a zero-initialised embedding of y (Glow's ``ycond``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Flow, sum_except_batch
from .nets import ZeroConv2d

LOG_2PI = math.log(2 * math.pi)


def standard_normal_logprob(eps: torch.Tensor) -> torch.Tensor:
    """sum log N(eps; 0, I) over all dims but the batch: [B, ...] -> [B] (float32 or wider)."""
    eps = eps.to(torch.promote_types(eps.dtype, torch.float32))
    return sum_except_batch(-0.5 * (eps ** 2 + LOG_2PI))


def _gaussianize(z, mean, logs):
    return (z - mean) * torch.exp(-logs), -sum_except_batch(logs)


def _degaussianize(eps, mean, logs):
    return eps * torch.exp(logs) + mean, sum_except_batch(logs)


class SplitPrior(Flow):
    """eps = (z_2 - mu(z_1)) / sigma(z_1), with z_1 given as ``cond``."""

    def __init__(self, cond_channels: int, channels: int):
        super().__init__()
        self.net = ZeroConv2d(cond_channels, 2 * channels)

    def _params(self, z1):
        h = self.net(z1).to(z1.dtype)  # apply mean/scale in the latent's dtype (the conv may run in bf16)
        return h[:, 0::2], h[:, 1::2]

    def _forward(self, z2, cond):
        return _gaussianize(z2, *self._params(cond))

    def _inverse(self, eps, cond):
        return _degaussianize(eps, *self._params(cond))


class TopPrior(Flow):
    """eps = (z - mu_c - mu_y) / exp(logs_c + logs_y); learned per channel, class-conditional
    when ``num_classes > 0`` (labels given as ``cond``, shape [B] int64)."""

    def __init__(self, channels: int, learn: bool = True, num_classes: int = 0):
        super().__init__()
        self.learn = learn
        self.num_classes = num_classes
        self.mean = nn.Parameter(torch.zeros(1, channels, 1, 1), requires_grad=learn)
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1), requires_grad=learn)
        if num_classes > 0:
            self.embed = nn.Embedding(num_classes, 2 * channels)
            nn.init.zeros_(self.embed.weight)

    def _params(self, z, y):
        mean, logs = self.mean.expand_as(z), self.logs.expand_as(z)
        if self.num_classes > 0:
            if y is None:
                raise ValueError("this model is class-conditional (model.num_classes > 0): pass labels y")
            h = self.embed(y)[:, :, None, None]
            mean, logs = mean + h[:, 0::2], logs + h[:, 1::2]
        return mean.to(z.dtype), logs.to(z.dtype)

    def _forward(self, z, cond):
        return _gaussianize(z, *self._params(z, cond))

    def _inverse(self, eps, cond):
        return _degaussianize(eps, *self._params(eps, cond))
