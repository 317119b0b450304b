"""Jet's spatial couplings (Kolesnikov et al. 2024, google-research/big_vision ``models/proj/jet``).

Jet runs on patch tokens: the image is cut into p x p patches (a space-to-depth by p, so a
token is a pixel of the [B, C p^2, H/p, W/p] grid) and every coupling is affine with
s = 2 sigmoid(raw) (``scale_fn="sigmoid2"``). Channel couplings are the ordinary
:class:`~flowscale.flows.couplings.Coupling` after a fixed random channel permutation; the
spatial ones here split the *tokens* instead:

    pattern       kept tokens (condition)          the other half (transformed)
    checkerboard  (i + j) % 2 == parity             (i + j) % 2 != parity
    vstripes      j % 2 == parity (columns)         j % 2 != parity
    hstripes      i % 2 == parity (rows)            i % 2 != parity

Both halves are gathered into half-size grids ([h, w/2], or [h/2, w] for hstripes), kept in
row-major order, so position (r, c) of one half lies next to position (r, c) of the other;
the coupling network maps the kept grid to (t, raw) for the transformed grid:

    z_b = (x_b + t) * s,   (t, raw) = net(x_a),   s = 2 sigmoid(raw),   logdet = sum log s

The network therefore sees only the kept tokens (half the sequence for a ViT), as in Jet.
"""

from __future__ import annotations

from typing import Literal

import torch

from .couplings import Coupling, NetFactory, ScaleFn

SpatialPattern = Literal["checkerboard", "vstripes", "hstripes"]
SPATIAL_PATTERNS: tuple[tuple[str, int], ...] = (("checkerboard", 0), ("checkerboard", 1), ("vstripes", 0),
                                                 ("vstripes", 1), ("hstripes", 0), ("hstripes", 1))
"""The order in which successive spatial couplings of a Jet model take their (pattern, parity)."""


class SpatialCoupling(Coupling):
    """Affine coupling on [B, C, H, W] whose halves are two interleaved sets of positions
    (see the module docstring). H and W must be even."""

    def __init__(self, channels: int, net: NetFactory, pattern: SpatialPattern = "checkerboard", parity: int = 0,
                 scale_fn: ScaleFn = "sigmoid2", clamp: float = 2.0):
        # A checkerboard Coupling has the right network shape (C in, 2C out); the split differs.
        super().__init__(channels, net, kind="affine", mask="checkerboard", parity=parity, scale_fn=scale_fn,
                         clamp=clamp)
        if pattern not in ("checkerboard", "vstripes", "hstripes"):
            raise ValueError(f"unknown spatial pattern {pattern!r}")
        self.mask = pattern

    def _order(self, h: int, w: int, device):
        """(flat indices of the kept positions, of the transformed ones, inverse of their
        concatenation), built on the CPU (the meta device cannot select by mask) and kept per
        grid and device (a fixed function of them, not state)."""
        key = (h, w, str(device))
        cache = self.__dict__.setdefault("_orders", {})
        if key not in cache:
            if h % 2 or w % 2:
                raise ValueError(f"a {self.mask} coupling needs an even token grid, got {h}x{w}")
            i, j = torch.arange(h)[:, None], torch.arange(w)[None, :]
            grid = {"checkerboard": i + j, "vstripes": j + 0 * i, "hstripes": i + 0 * j}[self.mask]
            keep = ((grid + self.parity) % 2 == 0).reshape(-1)
            idx = torch.arange(h * w)
            idx_a, idx_b = idx[keep], idx[~keep]
            cache[key] = tuple(t.to(device) for t in (idx_a, idx_b, torch.argsort(torch.cat([idx_a, idx_b]))))
        return cache[key]

    def _half_shape(self, h: int, w: int) -> tuple[int, int]:
        return (h // 2, w) if self.mask == "hstripes" else (h, w // 2)

    def _split(self, x):
        b, c, h, w = x.shape
        idx_a, idx_b, _ = self._order(h, w, x.device)
        flat = x.reshape(b, c, h * w)
        half = self._half_shape(h, w)
        return flat[:, :, idx_a].reshape(b, c, *half), flat[:, :, idx_b].reshape(b, c, *half), None

    def _merge(self, x_a, z_b, b_mask):
        b, c, hh, ww = x_a.shape
        h, w = (2 * hh, ww) if self.mask == "hstripes" else (hh, 2 * ww)
        _, _, inverse = self._order(h, w, x_a.device)
        both = torch.cat([x_a.reshape(b, c, -1), z_b.reshape(b, c, -1)], dim=2)
        return both[:, :, inverse].reshape(b, c, h, w)

    def _grad_of_input(self, g_a, g_b, b_mask):
        return self._merge(g_a, g_b, b_mask)  # the split is a permutation: its transpose is the merge
