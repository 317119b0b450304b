"""Test bits/dim: nats and dimensions are summed over the whole split, divided once at the end."""

from __future__ import annotations

import math

import torch

from .data.quantize import preprocess
from .loss import flow_bpd_dequantized


@torch.no_grad()
def evaluate_bpd(flow, images: torch.Tensor, n_bits: int, batch_size: int, device="cpu", seed: int = 0,
                 labels: torch.Tensor | None = None, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32) -> float:
    """Mean bits/dim of uint8 ``images`` [N, C, H, W] (dequantisation noise drawn from ``seed``).

    With several ranks each scores every world_size-th batch; bits and dimensions are summed
    over ranks, then divided once. Every rank runs the same number of forward passes (a rank
    without a batch left runs a dummy one) so ZeRO-3's collective parameter gathers line up.
    """
    was_training = flow.training
    flow.eval()
    total = torch.zeros(2, dtype=torch.float64)
    starts = list(range(0, len(images), batch_size))
    rounds = math.ceil(len(starts) / world_size)
    for r in range(rounds):
        i = r * world_size + rank
        mine = i < len(starts)
        s = starts[i] if mine else 0
        x = images[s:s + batch_size]
        y = None if labels is None else labels[s:s + batch_size].to(device)
        # Noise from a CPU generator seeded per batch: the number depends on neither device nor rank count.
        g = torch.Generator().manual_seed(seed * 1_000_003 + s)
        bpd, _ = flow_bpd_dequantized(flow, preprocess(x, n_bits, generator=g).to(device, dtype), n_bits, y)
        if mine:
            total += torch.tensor([bpd.double().sum().item() * x[0].numel(), x.shape[0] * x[0].numel()],
                                  dtype=torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    flow.train(was_training)
    result = (total[0] / total[1]).item()
    if not math.isfinite(result):
        raise FloatingPointError("non-finite test bits/dim: the model produced inf/NaN on the test split")
    return result
