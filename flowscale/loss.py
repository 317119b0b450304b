"""The objective, in one place: bits per dimension of the discrete image (openai/glow's definition).

For a D-dimensional image reduced to n_bins = 2^n_bits levels and dequantised to
x in [-0.5, 0.5)^D (see :mod:`flowscale.data.quantize`), per image:

    bpd = -(log p_Z(z) + logdet - D * log(n_bins)) / (D * log 2)

log p_Z is summed over every latent, logdet = log|det dz/dx| over the whole flow; sums are
taken first, the division comes last. This is an upper bound on the discrete negative
log-likelihood in bits per sub-pixel, the number flow papers report.
"""

from __future__ import annotations

import math

import torch

from .data.quantize import preprocess
from .priors import standard_normal_logprob


def bits_per_dim(log_pz: torch.Tensor, logdet: torch.Tensor, n_dims: int, n_bits: int) -> torch.Tensor:
    """[B] bits/dim from [B] log p_Z(z) and [B] log-det (nats)."""
    n_bins = 2 ** n_bits
    return -(log_pz + logdet - n_dims * math.log(n_bins)) / (n_dims * math.log(2.0))


def flow_bpd_dequantized(flow, x: torch.Tensor, n_bits: int, y: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Run the flow data -> latent on already dequantised x in [-0.5, 0.5); return ([B] bpd, parts).

    ``parts`` holds the [B] ``log_pz`` and ``logdet`` (nats) for logging.
    """
    eps, logdet = flow(x, cond=y)
    log_pz = sum(standard_normal_logprob(e) for e in eps)
    return bits_per_dim(log_pz, logdet, x[0].numel(), n_bits), {"log_pz": log_pz, "logdet": logdet}


def flow_bpd(flow, x_uint8: torch.Tensor, n_bits: int, y: torch.Tensor | None = None,
             noise: bool = True, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Reduce to n_bits, dequantise and score a uint8 batch: ([B] bpd, parts)."""
    return flow_bpd_dequantized(flow, preprocess(x_uint8, n_bits, noise, generator), n_bits, y)
