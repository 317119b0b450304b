"""Pixels <-> flow inputs. n-bit reduction and uniform dequantisation as in openai/glow:

    x_int = floor(x_uint8 / 2^(8 - n_bits))                in {0, ..., n_bins - 1}, n_bins = 2^n_bits
    x     = (x_int + u) / n_bins - 0.5,  u ~ U[0, 1)^D     in [-0.5, 0.5)

The density of x on [-0.5, 0.5)^D relates to the probability of the discrete image by the
bin volume n_bins^-D, which is the -D*log(n_bins) term of :func:`flowscale.loss.bits_per_dim`.
"""

from __future__ import annotations

import torch


def reduce_bits(x_uint8: torch.Tensor, n_bits: int) -> torch.Tensor:
    """uint8 pixels -> integer bins in [0, 2^n_bits), as float32."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {x_uint8.dtype}")
    return torch.div(x_uint8.float(), 2 ** (8 - n_bits), rounding_mode="floor")


def dequantize(x_int: torch.Tensor, n_bits: int, noise: bool | torch.Tensor = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer bins -> continuous x in [-0.5, 0.5). ``noise=False`` uses bin centres (u = 0.5); a
    tensor is u itself (drawn by the caller, e.g. per sample)."""
    n_bins = 2 ** n_bits
    if isinstance(noise, torch.Tensor):
        u = noise.to(x_int.device, x_int.dtype)
    elif noise:
        u = torch.rand(x_int.shape, generator=generator, device=x_int.device, dtype=x_int.dtype)
    else:
        u = torch.full_like(x_int, 0.5)
    return (x_int + u) / n_bins - 0.5


def preprocess(x_uint8: torch.Tensor, n_bits: int, noise: bool | torch.Tensor = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [B, C, H, W] -> dequantised float x in [-0.5, 0.5)."""
    return dequantize(reduce_bits(x_uint8, n_bits), n_bits, noise, generator)


def postprocess(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Flow output x -> uint8 pixels (the bin's lowest 8-bit value), clamped to the valid range."""
    n_bins = 2 ** n_bits
    x_int = torch.floor((x.float() + 0.5) * n_bins).clamp(0, n_bins - 1)
    return (x_int * (256 // n_bins)).to(torch.uint8)
