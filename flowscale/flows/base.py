"""The invertible contract, written once.

Every layer is a bijection ``f`` from data side to latent side::

    forward(x)  -> (z, logdet)     z = f(x),       logdet[b] = log|det df/dx| at x[b]
    inverse(z)  -> (x, -logdet)    x = f^{-1}(z),  -logdet[b] = log|det df^{-1}/dz| at z[b]

Both directions always return the pair (never a type that depends on a flag) and both go
through ``module(...)`` -- ``layer(z, reverse=True)`` is the inverse -- so framework hooks
(DeepSpeed ZeRO-3 parameter gathering, forward hooks) fire whichever way the flow runs.
Subclasses implement ``_forward`` and ``_inverse``; callers use ``layer(x)`` /
``layer(z, reverse=True)`` or the ``inverse`` shorthand.

``cond`` is an optional conditioning tensor (for example class labels) that layers may use;
it is passed unchanged through sequences.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class Flow(nn.Module):
    """An invertible layer with a tractable log-determinant (see the module docstring)."""

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, reverse: bool = False):
        if reverse:
            return self._inverse(x, cond)
        return self._forward(x, cond)

    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None = None):
        """``f^{-1}(z)`` and ``log|det df^{-1}/dz|`` (= minus the forward log-det)."""
        return self(z, cond=cond, reverse=True)

    def _forward(self, x: torch.Tensor, cond: torch.Tensor | None):  # pragma: no cover - abstract
        raise NotImplementedError

    def _inverse(self, z: torch.Tensor, cond: torch.Tensor | None):  # pragma: no cover - abstract
        raise NotImplementedError


def zeros_logdet(x: torch.Tensor) -> torch.Tensor:
    """A [B] log-det of zeros, always float32 or wider (log-dets never live in bf16)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.zeros(x.shape[0], dtype=dtype, device=x.device)


def sum_except_batch(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the first, accumulated in float32 or wider: [B, ...] -> [B]."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    return t.reshape(t.shape[0], -1).sum(dim=1, dtype=dtype)


def run_chain(steps: Iterable[Flow], x: torch.Tensor, cond: torch.Tensor | None = None):
    """Apply ``steps`` in order data -> latent; returns (z, summed logdet)."""
    logdet = zeros_logdet(x)
    for step in steps:
        x, ld = step(x, cond=cond)
        logdet = logdet + ld
    return x, logdet


class FlowSequence(Flow):
    """Composition ``f_n o ... o f_1``: log-dets add; the inverse runs the steps backwards."""

    def __init__(self, steps: Iterable[Flow]):
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        return iter(self.steps)

    def __getitem__(self, i):
        return self.steps[i]

    def _forward(self, x, cond):
        return run_chain(self.steps, x, cond)

    def _inverse(self, z, cond):
        logdet = zeros_logdet(z)
        for step in reversed(self.steps):
            z, ld = step(z, cond=cond, reverse=True)
            logdet = logdet + ld
        return z, logdet
