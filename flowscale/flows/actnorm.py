"""ActNorm (Glow, Kingma & Dhariwal 2018): per-channel affine map with data-dependent init.

    z = (x + bias) * exp(logs)          logdet = H * W * sum_c logs_c

The data-dependent initialisation (zero mean, unit variance per channel on a first batch) is
an explicit step, :func:`initialize_actnorm`, run once before training and before any
distributed wrapper is applied. It is never done lazily inside ``forward``: under DeepSpeed a
lazy init diverges across ranks, is overwritten by fp32 master weights, or is never applied
under ZeRO-3. The caller passes the all-reduce (``flowscale.distributed.all_reduce_sum_``)
that sums the statistics over ranks, so every rank gets the same parameters; model code calls
no collective itself. Whether a layer was initialised is a buffer, saved in the
state dict, so reloading a checkpoint never re-initialises.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .base import Flow, accumulate_grads, watch, watched


class ActNorm(Flow):
    """Per-channel scale and bias on [B, C, H, W] (or [B, C]) inputs.

    Args:
        channels: C.
        scale: target standard deviation after data-dependent init (Glow uses 1).
    """

    fused_backprop = True  # differentiated by hand, no forward rerun

    def __init__(self, channels: int, scale: float = 1.0):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = scale
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p.view(1, -1) if x.dim() == 2 else p

    def _spatial(self, x: torch.Tensor) -> int:
        return 1 if x.dim() == 2 else x.shape[2] * x.shape[3]

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(torch.promote_types(self.logs.dtype, x.dtype), torch.float32)
        ld = self.logs.to(wide).sum() * self._spatial(x)
        return ld.expand(x.shape[0])

    def _forward(self, x, cond):
        b, s = self._view(self.bias, x), self._view(self.logs, x)
        z = (x + b.to(x.dtype)) * torch.exp(s).to(x.dtype)
        return z, self._logdet(x)

    def _inverse(self, z, cond):
        b, s = self._view(self.bias, z), self._view(self.logs, z)
        x = z * torch.exp(-s).to(z.dtype) - b.to(z.dtype)
        return x, -self._logdet(z)

    def reconstruct_and_backprop(self, z, grad_z, grad_logdet, cond):
        """Inverse recompute's step through this layer, differentiated by hand (g = dL/dz,
        s = exp(logs), sums over every dim but the channel's)::

            x = z exp(-logs) - bias        dL/dx = g s
            dL/dlogs_c = sum g z + H W sum_b dL/dlogdet_b        dL/dbias_c = s_c sum g

        no forward is rerun to be differentiated (the generic path reruns it with a graph)."""
        if watched(self):
            return super().reconstruct_and_backprop(z, grad_z, grad_logdet, cond)
        dims, wide = ([0] if z.dim() == 2 else [0, 2, 3]), torch.promote_types(z.dtype, torch.float32)
        with torch.no_grad():
            logs = self._view(self.logs, z)
            x = z * torch.exp(-logs).to(z.dtype) - self._view(self.bias, z).to(z.dtype)  # as _inverse
            s = torch.exp(logs).to(z.dtype)
            grad_x = grad_z * s
            g_logs = (grad_z * z).sum(dims, dtype=wide) + self._spatial(z) * grad_logdet.sum()
            g_bias = grad_z.sum(dims, dtype=wide) * s.reshape(-1)
        accumulate_grads([self.logs, self.bias], [g_logs.view_as(self.logs), g_bias.view_as(self.bias)])
        return x, grad_x

    @torch.no_grad()
    def data_init(self, x: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Set bias/logs so the output of ``x`` has zero mean and std ``scale`` per channel.
        ``all_reduce`` sums a tensor over ranks in place (None: this process's ``x`` only)."""
        dims = [0] if x.dim() == 2 else [0, 2, 3]
        xf = x.double()
        stats = torch.stack([
            torch.full_like(xf.sum(dim=dims), float(xf.numel() // x.shape[1])),
            xf.sum(dim=dims),
            (xf * xf).sum(dim=dims),
        ])
        if all_reduce is not None:
            all_reduce(stats)  # exact global mean/var, identical on every rank
        n, s1, s2 = stats
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        self.bias.copy_((-mean).view_as(self.bias).to(self.bias.dtype))
        self.logs.copy_(torch.log(self.scale / (var.sqrt() + 1e-6)).view_as(self.logs).to(self.logs.dtype))
        self.initialized.fill_(True)


@torch.no_grad()
def initialize_actnorm(model: nn.Module, *inputs, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       **kwargs) -> int:
    """Run ``model(*inputs, **kwargs)`` once, initialising every not-yet-initialised ActNorm
    from the activations that reach it (in network order). Returns how many were initialised.

    Call on the raw single-device module, on every rank, before wrapping it for training, with
    ``all_reduce`` summing the statistics over ranks.
    """
    pending = [m for m in model.modules() if isinstance(m, ActNorm) and not bool(m.initialized)]

    def hook(module, args, kwargs_):
        x = args[0]
        # An ActNorm run in reverse sees latent-side inputs; data init is defined on the data side.
        if not kwargs_.get("reverse", False) and not bool(module.initialized):
            module.data_init(x, all_reduce)

    handles = [watch(m, hook, with_kwargs=True) for m in pending]
    try:
        model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return sum(bool(m.initialized) for m in pending)
