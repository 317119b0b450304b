"""Transformer pieces for flows: pre-norm blocks on ``torch.nn.functional.scaled_dot_product_attention``,
and :class:`ViTNet`, a coupling network that can be injected wherever a coupling takes one.

A block on tokens h [B, N, width] (pre-norm, as ViT / GPT-2)::

    h = h + Attention(LayerNorm(h))          softmax(q k^T / sqrt(d)) v per head, causal or not
    h = h + MLP(LayerNorm(h))                Linear(width, 4 width) -> GELU -> Linear(4 width, width)

Causal attention can run incrementally with a key/value cache (:class:`KVCache`): feeding the
tokens one at a time with a cache gives the same outputs as one causal pass over all of them,
which the TarFlow inverse (:mod:`flowscale.flows.tarflow`) relies on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair [B, heads, n, d] per attention layer."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's keys/values for ``layer``; return all of them so far."""
        if layer in self.layers:
            k0, v0 = self.layers[layer]
            k, v = torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class Attention(nn.Module):
    """Multi-head self-attention [B, N, width] -> [B, N, width]."""

    def __init__(self, width: int, heads: int, index: int = 0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.index = heads, index
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        b, n, width = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            # Incremental decoding: the new queries see every cached token and each other
            # causally. With one new token (how it is used) no mask is needed.
            k, v = cache.extend(self.index, k, v)
            if causal and n > 1:
                offset = k.shape[2] - n
                mask = torch.ones(n, k.shape[2], dtype=torch.bool, device=h.device).tril(offset)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, width))


class Block(nn.Module):
    """Pre-norm transformer block (see the module docstring)."""

    def __init__(self, width: int, heads: int, index: int = 0, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, index)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, h: torch.Tensor, causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), causal=causal, cache=cache)
        return h + self.mlp(self.norm2(h))


def sincos_2d(h: int, w: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [h*w, width] (MAE's), row-major token order:
    a quarter of the features each for sin/cos of the row and of the column index."""
    if width % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs width divisible by 4, got {width}")
    f = width // 4
    omega = 1.0 / 10000 ** (torch.arange(f, device=device, dtype=torch.float64) / f)
    ii, jj = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float64),
                            torch.arange(w, device=device, dtype=torch.float64), indexing="ij")
    a, b = ii.reshape(-1, 1) * omega, jj.reshape(-1, 1) * omega
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1).to(dtype)


class ViTNet(nn.Module):
    """Coupling network [B, C_in, H, W] -> [B, C_out, H, W] as a ViT:

        patch embedding (patch x patch squares -> width)  +  fixed 2-D sin-cos positions
        -> depth pre-norm blocks (full attention) -> LayerNorm -> Linear(width, C_out patch^2)
        -> back to the pixel grid

    The output Linear is zero-initialised (its bias set to ``out_bias``), so a coupling built on
    it starts as the identity. Position embeddings are computed from the input's grid, so one
    network works on whatever H x W its coupling hands it (H and W divisible by ``patch``).
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 128, depth: int = 2, heads: int = 4,
                 patch: int = 1, out_bias: float = 0.0):
        super().__init__()
        self.patch, self.out_channels = patch, out_channels
        self.embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.blocks = nn.ModuleList(Block(width, heads, i) for i in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_channels * patch * patch)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = x.shape
        p = self.patch
        if hh % p or ww % p:
            raise ValueError(f"ViT coupling network: input {hh}x{ww} is not divisible by its patch size {p}")
        h = self.embed(x)  # [B, width, H/p, W/p]
        gh, gw = h.shape[2], h.shape[3]
        h = h.flatten(2).transpose(1, 2)
        h = h + sincos_2d(gh, gw, h.shape[2], device=h.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h)
        out = self.out(self.norm(h))  # [B, N, C_out p^2]
        out = out.transpose(1, 2).reshape(b, self.out_channels * p * p, gh, gw)
        return F.pixel_shuffle(out, p) if p > 1 else out


def vit_net(width: int, depth: int, heads: int, patch: int = 1, out_bias: float = 0.0):
    """A constructor ``(in_channels, out_channels) -> ViTNet`` (the coupling-network interface)."""

    def make(in_channels: int, out_channels: int) -> nn.Module:
        return ViTNet(in_channels, out_channels, width, depth, heads, patch, out_bias)

    return make

