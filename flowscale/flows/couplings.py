"""Coupling layers (NICE additive, RealNVP/Glow affine) with channel or checkerboard masks.

Split x into a conditioning part x_a (kept) and a transformed part x_b; h = net(x_a):

    additive:  z_b = x_b + h                                 logdet = 0
    affine:    z_b = (x_b + t) * exp(log_s),  (t, raw) = h    logdet = sum log_s

``t`` takes the even output channels and ``raw`` the odd ones (Glow's layout). log_s is a
bounded function of ``raw`` chosen by name (``scale_fn``):

    "sigmoid":    log_s = log sigmoid(raw + 2)                    Glow; s in (0, 1)
    "tanh":       log_s = alpha_c * tanh(raw) + beta_c            learned per-channel alpha (init 1), beta (init 0)
    "exp_clamp":  log_s = clamp * (2/pi) * atan(raw / clamp)      soft clamp, |log_s| < clamp
    "sigmoid2":   log_s = log(2 sigmoid(raw))                     Jet; s in (0, 2), s = 1 at raw = 0

Bounded scales keep the inverse well conditioned, which the inverse-recompute backprop needs.
Masks: "channel" splits channels in halves; "checkerboard" splits pixels by (h + w) parity.
``parity`` swaps which half is kept, so alternating layers transform both halves.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import Flow, sum_except_batch, zeros_logdet

NetFactory = Callable[[int, int], nn.Module]
ScaleFn = Literal["sigmoid", "tanh", "exp_clamp", "sigmoid2"]


class Coupling(Flow):
    """Additive or affine coupling on [B, C, H, W].

    Args:
        channels: C.
        net: constructor ``(in_channels, out_channels) -> module``; its output layer should be
            zero-initialised so the layer starts as the identity.
        kind: "additive" (NICE) or "affine" (RealNVP/Glow).
        mask: "channel" or "checkerboard".
        parity: 0 or 1, which half conditions the other.
        scale_fn: see module docstring (affine only).
        clamp: bound for "exp_clamp".
    """

    fused_backprop = True  # one network evaluation serves the inverse and the local graph

    def __init__(self, channels: int, net: NetFactory, kind: Literal["additive", "affine"] = "affine",
                 mask: Literal["channel", "checkerboard"] = "channel", parity: int = 0,
                 scale_fn: ScaleFn = "sigmoid", clamp: float = 2.0):
        super().__init__()
        if mask == "channel" and channels < 2:
            raise ValueError("a channel-mask coupling needs at least 2 channels")
        self.kind, self.mask, self.parity, self.scale_fn, self.clamp = kind, mask, parity, scale_fn, clamp
        if mask == "channel":
            c_a = channels // 2 if parity == 0 else channels - channels // 2
            c_b = channels - c_a
            n_in, n_b = c_a, c_b
        else:
            n_in, n_b = channels, channels
        self.n_b = n_b
        self.net = net(n_in, n_b if kind == "additive" else 2 * n_b)
        # The learned scale parameters live in a submodule so that every parameter is used
        # through a module call (DeepSpeed ZeRO-3 gathers parameters in module hooks).
        self.scale = TanhScale(n_b) if kind == "affine" and scale_fn == "tanh" else None

    # -- masks -------------------------------------------------------------------------
    def _split(self, x):
        """(x_a, x_b, b_mask): the conditioning input, the transformed input, and a mask of
        the transformed positions (None for channel masks)."""
        if self.mask == "channel":
            c = x.shape[1]
            c_a = c // 2 if self.parity == 0 else c - c // 2
            return x[:, :c_a], x[:, c_a:], None
        h, w = x.shape[2], x.shape[3]
        grid = (torch.arange(h, device=x.device)[:, None] + torch.arange(w, device=x.device)[None, :] + self.parity) % 2
        keep = (grid == 0).to(x.dtype)[None, None]
        return x * keep, x, 1 - keep

    def _grad_of_input(self, g_a, g_b, b_mask):
        """dL/dx from the gradients of the two views returned by ``_split``."""
        if b_mask is None:
            return torch.cat([g_a, g_b], dim=1)
        return g_a * (1 - b_mask) + g_b  # x_a = x * keep, x_b = x

    def _merge(self, x_a, z_b, b_mask):
        if b_mask is None:
            return torch.cat([x_a, z_b], dim=1)
        return x_a + z_b * b_mask  # x_a is already zero at the transformed positions

    def _log_scale(self, raw):
        if self.scale_fn == "sigmoid":
            return F.logsigmoid(raw + 2.0)
        if self.scale_fn == "tanh":
            return self.scale(raw)
        if self.scale_fn == "exp_clamp":
            return self.clamp * (2 / math.pi) * torch.atan(raw / self.clamp)
        if self.scale_fn == "sigmoid2":
            # In float32 or wider: log 2 + logsigmoid(raw) cancels near raw = 0 (s = 1, at init), and
            # in bf16 that would round every small log-scale to 0 (steps of ~0.003).
            wide = raw.to(torch.promote_types(raw.dtype, torch.float32))
            return (F.logsigmoid(wide) + math.log(2.0)).to(raw.dtype)
        raise ValueError(f"unknown scale_fn {self.scale_fn!r}")

    def _params(self, x_a):
        # The network may run in bf16 under autocast; the scale and shift are applied in the
        # activations' dtype so that exp(-log_s) inverts exp(log_s) to that dtype's precision.
        h = self.net(x_a).to(x_a.dtype)
        if self.kind == "additive":
            return h, None
        return h[:, 0::2], self._log_scale(h[:, 1::2])

    # -- the bijection -----------------------------------------------------------------
    def _forward(self, x, cond):
        x_a, x_b, b_mask = self._split(x)
        t, log_s = self._params(x_a)
        if log_s is None:
            return self._merge(x_a, x_b + t, b_mask), zeros_logdet(x)
        z_b = (x_b + t) * torch.exp(log_s)
        if b_mask is not None:
            log_s = log_s * b_mask
        return self._merge(x_a, z_b, b_mask), sum_except_batch(log_s)

    def _inverse(self, z, cond):
        z_a, z_b, b_mask = self._split(z)
        t, log_s = self._params(z_a)
        if log_s is None:
            return self._merge(z_a, z_b - t, b_mask), zeros_logdet(z)
        x_b = z_b * torch.exp(-log_s) - t
        if b_mask is not None:
            log_s = log_s * b_mask
        return self._merge(z_a, x_b, b_mask), -sum_except_batch(log_s)

    # -- memory-saving backprop (used by flowscale.inverse_checkpoint) ------------------
    def reconstruct_and_backprop(self, z, grad_z, grad_logdet, cond):
        """Rebuild the input from the output and backpropagate through this layer.

        Given z = f(x), dL/dz and dL/dlogdet: returns (x, dL/dx) and accumulates parameter
        gradients. The coupling network is evaluated once, on z_a = x_a, and serves both the
        inverse (x_b from z_b) and the local graph, so this costs one network forward and
        one backward instead of the two forwards of a generic inverse-then-recompute.

        The elementwise part is differentiated by hand, from the output z_b = (x_b + t) s
        that is already known (s = exp(log_s), g_b = dL/dz_b, g_ld = dL/dlogdet per sample)::

            dL/dx_b = dL/dt = g_b s          dL/dlog_s = g_b z_b + g_ld

        so autograd only runs the network (and the scale function); nothing is merged or
        multiplied again just to be differentiated.
        """
        z, grad_z = z.detach(), grad_z.detach()
        z_a, z_b, b_mask = self._split(z)
        x_a = z_a.detach().requires_grad_(True)
        with torch.enable_grad():
            h = self.net(x_a).to(x_a.dtype)
            t = h if self.kind == "additive" else h[:, 0::2]
            log_s = None if self.kind == "additive" else self._log_scale(h[:, 1::2])
        g_a, g_b, _ = self._split(grad_z)  # the split's views of dL/dz
        if b_mask is not None:  # checkerboard: z = x_a + z_b * b_mask, x_a already zero at the transformed positions
            g_b = g_b * b_mask
        with torch.no_grad():
            if log_s is None:
                x_b = z_b - t
                g_t = g_xb = g_b
                outputs, grads = [t], [g_t]
            else:
                s = torch.exp(log_s)
                x_b = z_b * torch.exp(-log_s) - t  # exactly as _inverse
                g_t = g_xb = g_b * s
                ld_grad = grad_logdet.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))
                g_log_s = torch.addcmul(ld_grad, g_b, z_b)
                if b_mask is not None:
                    g_log_s = g_log_s * b_mask
                outputs, grads = [t, log_s], [g_t, g_log_s]
        torch.autograd.backward(outputs, grads)
        with torch.no_grad():
            g_a = g_a + x_a.grad
            x = self._merge(z_a, x_b, b_mask)
        return x, self._grad_of_input(g_a, g_xb, b_mask)


class TanhScale(nn.Module):
    """log_s = alpha_c * tanh(raw) + beta_c with learned per-channel alpha (init 1), beta (init 0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, raw):
        return self.alpha.to(raw.dtype) * torch.tanh(raw) + self.beta.to(raw.dtype)
