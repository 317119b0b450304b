"""Shared test helpers: small models pushed away from their identity initialisation."""

from __future__ import annotations

import torch

from flowscale.config import ModelConfig
from flowscale.flows.actnorm import initialize_actnorm
from flowscale.flows.models import build_flow


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
