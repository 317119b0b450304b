"""The exponential moving average of the weights (``optim.ema_decay``): updated after every
applied step, swapped in for evaluation and sample grids, saved as ``ema.safetensors``."""

from __future__ import annotations

import contextlib

import torch


class EMA:
    """Polyak averaging of the (replicated) parameters: shadow <- d * shadow + (1 - d) * param."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module):
        """Temporarily load the averaged weights into ``module`` (for eval and sampling)."""
        backup = {n: p.detach().clone() for n, p in module.named_parameters()}
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    p.copy_(backup[n])

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {n: t.float().clone() for n, t in state.items()}
