"""The multi-scale architecture (RealNVP/Glow): L levels of [squeeze -> K steps -> split].

    x [B,C,H,W] -> squeeze -> K steps -> split: keep z_1, factor out z_2 -> eps_1 = prior(z_2 | z_1)
                -> squeeze -> K steps -> split ...
                -> squeeze -> K steps -> eps_L = top_prior(z | y)

``MultiScaleFlow`` is itself a flow under the one contract: ``forward(x, cond=y)`` returns
(list of eps, logdet) and ``log p(x) = sum_l log N(eps_l; 0, I) + logdet``; the inverse takes
the list back to x. Each level's chain of steps is a :class:`FlowSequence` in
``level.steps`` so memory tricks (inverse recompute) wrap it from outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ChainPass, Flow, FlowSequence, run_chain_default, zeros_logdet


class Squeeze(Flow):
    """Space-to-depth by ``factor`` f: [B, C, H, W] -> [B, f^2 C, H/f, W/f]; a permutation (logdet 0).
    f = 2 between the levels of a multi-scale flow; f = p cuts an image into p x p patch tokens
    (Jet, TarFlow)."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor

    def _forward(self, x, cond):
        f = self.factor
        if x.shape[2] % f or x.shape[3] % f:
            need = "even" if f == 2 else f"divisible by {f}"
            raise ValueError(f"cannot squeeze spatial size {tuple(x.shape[2:])} by {f}: height and width must be {need}")
        return F.pixel_unshuffle(x, f), zeros_logdet(x)

    def _inverse(self, z, cond):
        return F.pixel_shuffle(z, self.factor), zeros_logdet(z)


CPU_CHANNELS_LAST_MIN_PIXELS = 256
"""Grids of at least this many pixels (16x16) run their convolutional steps channels-last on the
CPU: oneDNN's convolutions and their backward are ~10% faster there on NHWC activations, while
on 8x8 and 4x4 grids NCHW is as fast or faster (measured for Glow's coupling networks at width
512 on an x86 CPU, docs/bench/reference_cpu)."""


class Level(nn.Module):
    """One scale: squeeze, then ``steps``, then (except at the top) a split with ``prior``.

    ``prior`` is None for a fixed N(0, I) prior on the factored-out half (RealNVP).
    ``factor``: the squeeze's space-to-depth factor (2; the patch size of a one-level patch flow).
    ``channels_last``: the steps are convolutional and may run on channels-last activations
    (see :meth:`layout`); a memory layout only, the values and the saved bytes are the same.
    """

    def __init__(self, steps: FlowSequence, prior: Flow | None, split: bool, factor: int = 2,
                 channels_last: bool = False):
        super().__init__()
        self.squeeze = Squeeze(factor)
        self.steps = steps
        self.prior = prior
        self.split = split
        self.channels_last = channels_last

    def layout(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` (the squeezed input of the steps) channels-last where that is faster: on the
        CPU, for convolutional steps on grids of CPU_CHANNELS_LAST_MIN_PIXELS or more; NCHW on
        smaller ones (the squeeze of a channels-last level's output would stay channels-last)."""
        if not (self.channels_last and h.device.type == "cpu"):
            return h
        if h.shape[2] * h.shape[3] >= CPU_CHANNELS_LAST_MIN_PIXELS:
            return h.contiguous(memory_format=torch.channels_last)
        return h.contiguous()


class MultiScaleFlow(Flow):
    """x -> ([eps_1, ..., eps_L], logdet); see the module docstring."""

    def __init__(self, levels: list[Level], top_prior: Flow | None):
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.top_prior = top_prior

    def step_chains(self) -> list[Level]:
        return list(self.levels)

    def walk(self, x, cond=None, run=None):
        """The multi-scale path, written once: per level, squeeze -> memory layout -> chain ->
        split (see :meth:`Flow.walk`). Priors are not part of the walk."""
        run = run or run_chain_default
        h = x
        for i, level in enumerate(self.levels):
            h_in = level.layout(level.squeeze(h)[0])
            h_out, ld, extra = run(i, level.steps, h_in, cond)
            h, z2 = h_out.chunk(2, dim=1) if level.split else (h_out, None)
            yield ChainPass(i, level, h_in, h_out, ld, h, z2, extra)

    def _forward(self, x, cond):
        logdet = zeros_logdet(x)
        eps = []
        h = x
        for p in self.walk(x, cond):
            logdet = logdet + p.logdet
            h, z2 = p.h, p.z2
            if z2 is not None:
                if p.holder.prior is not None:
                    z2, ld = p.holder.prior(z2, cond=h)
                    logdet = logdet + ld
                eps.append(z2)
        if self.top_prior is not None:
            h, ld = self.top_prior(h, cond=cond)
            logdet = logdet + ld
        eps.append(h)
        return eps, logdet

    def _inverse(self, eps, cond):
        eps = list(eps)
        h = eps.pop()
        logdet = zeros_logdet(h)
        if self.top_prior is not None:
            h, ld = self.top_prior(h, cond=cond, reverse=True)
            logdet = logdet + ld
        for level in reversed(self.levels):
            if level.split:
                z2 = eps.pop()
                if level.prior is not None:
                    z2, ld = level.prior(z2, cond=h, reverse=True)
                    logdet = logdet + ld
                h = torch.cat([h, z2], dim=1)
            h, ld = level.steps(h, cond=cond, reverse=True)
            logdet = logdet + ld
            h, _ = level.squeeze(h, reverse=True)
        return h, logdet

    def level_shapes(self, channels: int, size: int) -> list[tuple[int, int, int]]:
        """Shapes (C, H, W) each level's steps run on (after its squeeze), for an input of
        ``channels`` x ``size`` x ``size``."""
        shapes = []
        c, s = channels, size
        for level in self.levels:
            f = level.squeeze.factor
            c, s = c * f * f, s // f
            shapes.append((c, s, s))
            if level.split:
                c = c - c // 2  # the half kept by h.chunk(2)
        return shapes

    def latent_shapes(self, channels: int, size: int) -> list[tuple[int, int, int]]:
        """Shapes (C, H, W) of each eps for an input of ``channels`` x ``size`` x ``size``."""
        shapes = [(c // 2, h, w) for (c, h, w), level in zip(self.level_shapes(channels, size), self.levels)
                  if level.split]
        return shapes + [self.level_shapes(channels, size)[-1]]
