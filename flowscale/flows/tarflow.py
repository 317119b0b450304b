"""TarFlow blocks (Zhai et al. 2024, apple/ml-tarflow): affine autoregressive flows over patch
tokens whose conditioner is a causal transformer.

The input [B, D, h, w] is read as N = h w tokens x_1..x_N of D features (row-major; a block
with ``reverse=True`` reads them in the opposite order, so that successive blocks alternate).
With (mu_i, raw_i) the transformer's output at token i - 1 (zero for i = 1):

    forward:  z_i = (x_i - mu_i(x_<i)) * exp(-a_i(x_<i)),   a = clamp * (2/pi) * atan(raw / clamp)
    logdet  = -sum_i sum_d a_i,d

The Jacobian dz/dx is block lower-triangular in the token order (causal attention, outputs
shifted by one token), so its log-determinant is the sum of the diagonal log-scales; the soft
clip bounds |a| < clamp. The forward is one parallel causal pass. The inverse is sequential:

    x_1 = z_1;   x_i = z_i * exp(a_i) + mu_i   with (mu_i, a_i) from x_<i already decoded

and with a key/value cache each step feeds one token through the transformer (O(N) token
passes instead of O(N^2)); ``kv_cache = False`` reruns the whole prefix instead (a reference).
The transformer's output layer is zero-initialised: every block starts as the identity.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Flow, sum_except_batch
from .vit import Block, KVCache


class TarFlowBlock(Flow):
    """One TarFlow block on [B, channels, h, w] with ``tokens`` = h w (see the module docstring).

    Args:
        channels: D, features per token (C p^2 after patchifying by p).
        tokens: N, the sequence length (fixes the learned position embedding).
        width, depth, heads: the causal transformer.
        reverse: read the tokens last-to-first.
        clamp: bound of the soft-clipped log-scale.
    """

    kv_cache: bool = True
    """Decode with a key/value cache (set False on an instance for the uncached reference inverse)."""

    def __init__(self, channels: int, tokens: int, width: int = 128, depth: int = 2, heads: int = 4,
                 reverse: bool = False, clamp: float = 2.0):
        super().__init__()
        self.channels, self.tokens, self.reverse, self.clamp = channels, tokens, reverse, clamp
        self.embed = nn.Linear(channels, width)
        self.pos = nn.Parameter(torch.zeros(1, tokens, width))
        if self.pos.device.type != "meta":
            nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(width, heads, i) for i in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 2 * channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    # -- token layout --------------------------------------------------------------------
    def _to_tokens(self, x):
        b, d, h, w = x.shape
        if h * w != self.tokens or d != self.channels:
            raise ValueError(f"TarFlow block built for {self.tokens} tokens of {self.channels} features, "
                             f"got a [{d}, {h}, {w}] input")
        t = x.reshape(b, d, h * w).transpose(1, 2)
        return t.flip(1) if self.reverse else t

    def _from_tokens(self, t, like):
        t = t.flip(1) if self.reverse else t
        return t.transpose(1, 2).reshape(like.shape)

    def _head(self, h):
        """Transformer output [B, n, width] -> (mu, a) [B, n, D], a soft-clipped."""
        mu, raw = self.out(self.norm(h)).to(h.dtype).chunk(2, dim=-1)
        return mu, self.clamp * (2 / math.pi) * torch.atan(raw / self.clamp)

    def _params(self, t):
        """(mu, a) [B, N, D] for every token from the tokens before it (one causal pass)."""
        h = self.embed(t) + self.pos.to(t.dtype)
        for block in self.blocks:
            h = block(h, causal=True)
        mu, a = self._head(h)
        # Token i's parameters come from the output at i - 1; token 1 gets (0, 0).
        pad = torch.zeros_like(mu[:, :1])
        return torch.cat([pad, mu[:, :-1]], dim=1), torch.cat([pad, a[:, :-1]], dim=1)

    # -- the bijection -------------------------------------------------------------------
    def _forward(self, x, cond):
        t = self._to_tokens(x)
        mu, a = self._params(t)
        z = (t - mu) * torch.exp(-a)
        return self._from_tokens(z, x), -sum_except_batch(a)

    def _inverse(self, z, cond):
        if z.device.type == "meta":  # shapes only (flowscale plan): N sequential steps would compute nothing
            return torch.empty_like(z), sum_except_batch(torch.zeros_like(z))
        zt = self._to_tokens(z)
        decode = self._decode_cached if self.kv_cache else self._decode_uncached
        xt, a = decode(zt)
        return self._from_tokens(xt, z), sum_except_batch(a)

    def _decode_cached(self, zt):
        """Sequential inverse with a key/value cache: step i feeds token i - 1 only."""
        n = zt.shape[1]
        xs, scales = [zt[:, :1]], [torch.zeros_like(zt[:, :1])]
        cache = KVCache()
        for i in range(1, n):
            h = self.embed(xs[-1]) + self.pos[:, i - 1:i].to(zt.dtype)
            for block in self.blocks:
                h = block(h, causal=True, cache=cache)
            mu, a = self._head(h)
            xs.append(zt[:, i:i + 1] * torch.exp(a) + mu)
            scales.append(a)
        return torch.cat(xs, dim=1), torch.cat(scales, dim=1)

    def _decode_uncached(self, zt):
        """Sequential inverse rerunning the full causal pass for every token (O(N^2) tokens)."""
        xt = zt.clone()
        a = torch.zeros_like(zt)
        for i in range(1, zt.shape[1]):
            mu_all, a_all = self._params(xt)
            x_i = zt[:, i] * torch.exp(a_all[:, i]) + mu_all[:, i]
            xt = torch.cat([xt[:, :i], x_i[:, None], zt[:, i + 1:]], dim=1)
            a = torch.cat([a[:, :i], a_all[:, i:i + 1], a[:, i + 1:]], dim=1)
        return xt, a
