"""Shared test helpers: small models pushed away from their identity initialisation."""

from __future__ import annotations

import torch

from flowscale.config import ModelConfig
from flowscale.flows.actnorm import initialize_actnorm
from flowscale.flows.models import build_flow
from flowscale.loss import flow_bpd_dequantized


@torch.no_grad()
def perturb_(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so no layer is the identity: zero-initialised tensors get
    N(0, scale^2), others noise relative to their own spread."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        spread = p.detach().double().std().item() if p.numel() > 1 else 0.0
        if spread <= 1e-8:  # zero-initialised: unit-variance output per unit-variance input
            spread = 1.0 / (p[0].numel() ** 0.5) if p.dim() >= 2 else 1.0
        p.add_(noise * scale * spread)
    return module


def small_flow(preset: str = "glow", levels: int = 2, steps: int = 2, width: int = 8, channels: int = 3,
               size: int = 8, dtype=torch.float64, seed: int = 0, scale: float = 0.1, **overrides):
    """A tiny multi-scale flow, ActNorm-initialised on random data and perturbed."""
    torch.manual_seed(seed)
    flow = build_flow(ModelConfig(preset=preset, levels=levels, steps=steps, width=width, **overrides),
                      channels, size).to(dtype)
    x = torch.rand(16, channels, size, size, dtype=dtype) - 0.5
    n_classes = overrides.get("num_classes", 0)
    y = torch.arange(16) % n_classes if n_classes else None
    initialize_actnorm(flow, x, cond=y)
    return perturb_(flow, scale, seed)


def loss_and_grads(flow, x, micro_batches=1):
    flow.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    total = 0.0
    for chunk in xr.chunk(micro_batches):
        loss = flow_bpd_dequantized(flow, chunk, 8)[0].sum()
        loss.backward()
        total += loss.item()
    return total, xr.grad, {n: p.grad.clone() for n, p in flow.named_parameters() if p.grad is not None}


def worst_relative_difference(ga, gb):
    assert ga.keys() == gb.keys()
    return max(((ga[k] - gb[k]).norm() / ga[k].norm().clamp_min(1e-30)).item() for k in ga)


def assert_same_loss_and_gradients(plain, wrapped, x, tol: float) -> None:
    """``wrapped`` (e.g. under inverse recompute) gives ``plain``'s bits/dim, input gradient and
    every parameter's gradient, each within ``tol`` relative (the loss within 1e-6)."""
    la, gxa, ga = loss_and_grads(plain, x)
    lb, gxb, gb = loss_and_grads(wrapped, x)
    assert abs(la - lb) <= 1e-6 * abs(la)
    assert ((gxa - gxb).norm() / gxa.norm()).item() < tol
    assert len(ga) == len(list(plain.parameters())), "every parameter must get a gradient"
    assert worst_relative_difference(ga, gb) < tol
