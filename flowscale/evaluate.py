"""Test bits/dim: nats and dimensions are summed over the whole split, divided once at the end."""

from __future__ import annotations

import math

import torch

from .data.quantize import preprocess
from .loss import flow_bpd_dequantized


@torch.no_grad()
def evaluate_bpd(flow, images: torch.Tensor, n_bits: int, batch_size: int, device="cpu", seed: int = 0,
                 labels: torch.Tensor | None = None) -> float:
    """Mean bits/dim of uint8 ``images`` [N, C, H, W] (dequantisation noise drawn from ``seed``)."""
    was_training = flow.training
    flow.eval()
    g = torch.Generator().manual_seed(seed)
    total_bits, total_dims = 0.0, 0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        y = None if labels is None else labels[i:i + batch_size].to(device)
        # Noise comes from a CPU generator so the number does not depend on the device.
        bpd, _ = flow_bpd_dequantized(flow, preprocess(x, n_bits, generator=g).to(device), n_bits, y)
        total_bits += bpd.double().sum().item() * x[0].numel()
        total_dims += x.shape[0] * x[0].numel()
    flow.train(was_training)
    result = total_bits / total_dims
    if not math.isfinite(result):
        raise FloatingPointError("non-finite test bits/dim: the model produced inf/NaN on the test split")
    return result
