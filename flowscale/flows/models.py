"""``build_flow(model_cfg, channels, image_size)``: the presets "nice", "realnvp", "glow", "dlf".

Each level is [squeeze -> K steps -> split]. A step is, in order, the optional parts of
``ActNorm -> permutation -> coupling``; the preset fills every choice the config leaves null.
DLF's step is ``1x1 conv -> dynamic linear transform`` (coupling="dynamic_linear").
"""

from __future__ import annotations

from dataclasses import replace

from .. import seeds
from ..config import ModelConfig
from ..priors import SplitPrior, TopPrior
from .actnorm import ActNorm
from .base import FlowSequence
from .couplings import Coupling
from .dynamic_linear import DynamicLinearTransform
from .multiscale import Level, MultiScaleFlow
from .nets import glow_net
from .permutations import build_permutation

PRESETS: dict[str, dict] = {
    # NICE (Dinh et al. 2014): additive couplings, volume preserving apart from a final
    # diagonal scaling, which here is the learned top prior.
    "nice": dict(coupling="additive", mask="channel", permutation="reverse", scale_fn="sigmoid",
                 actnorm=False, split_prior="fixed", learn_top=True),
    # RealNVP (Dinh et al. 2016): affine couplings with tanh-bounded log-scales, checkerboard
    # then channel masks with alternating parity; ActNorm stands in for batch norm.
    "realnvp": dict(coupling="affine", mask="alternate", permutation="none", scale_fn="tanh",
                    actnorm=True, split_prior="fixed", learn_top=False),
    # Glow (Kingma & Dhariwal 2018), openai/glow defaults.
    "glow": dict(coupling="affine", mask="channel", permutation="invconv", scale_fn="sigmoid",
                 actnorm=True, split_prior="learned", learn_top=True),
    # Dynamic Linear Flow (Liao, He & Shu 2019), naturomics/DLF: invertible 1x1 conv then a
    # dynamic linear transform, no ActNorm. mask/scale_fn are unused by the DLT.
    "dlf": dict(coupling="dynamic_linear", mask="channel", permutation="invconv", scale_fn="tanh",
                actnorm=False, split_prior="learned", learn_top=True),
}


def resolve_preset(cfg: ModelConfig) -> ModelConfig:
    """A copy of ``cfg`` with every null layer choice filled from its preset."""
    defaults = PRESETS[cfg.preset]
    return replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


def _step(cfg: ModelConfig, channels: int, index: int, seed: int, width: int) -> FlowSequence:
    parts = []
    if cfg.actnorm:
        parts.append(ActNorm(channels))
    perm = build_permutation(cfg.permutation, channels, seed, cfg.lu_max_log_s, cfg.invconv_bias)
    if perm is not None:
        parts.append(perm)
    if cfg.coupling == "dynamic_linear":
        net = glow_net(width, out_bias=cfg.dlt_out_bias, spectral_norm=cfg.spectral_norm)
        parts.append(DynamicLinearTransform(channels, net, cfg.dlt_partitions, cfg.dlt_split, cfg.dlt_decomposition,
                                            cfg.dlt_first, cfg.num_classes, cfg.dlt_beta_init, cfg.dlt_out_bias))
        return FlowSequence(parts)
    mask = cfg.mask
    if mask == "alternate":
        mask = "checkerboard" if index < max(cfg.steps // 2, 1) else "channel"
    parity = index % 2 if cfg.permutation == "none" else 0
    parts.append(Coupling(channels, glow_net(width, spectral_norm=cfg.spectral_norm), kind=cfg.coupling, mask=mask, parity=parity,
                          scale_fn=cfg.scale_fn, clamp=cfg.clamp))
    return FlowSequence(parts)


def build_flow(cfg: ModelConfig, channels: int, image_size: int) -> MultiScaleFlow:
    """The multi-scale flow for ``channels`` x ``image_size`` x ``image_size`` inputs."""
    cfg = resolve_preset(cfg)
    if image_size % (2 ** cfg.levels):
        raise ValueError(f"image_size={image_size} is not divisible by 2^levels={2 ** cfg.levels}")
    levels = []
    c = channels
    for lvl in range(cfg.levels):
        c *= 4
        steps = FlowSequence(_step(cfg, c, k, seed=seeds.derive(cfg.seed, "permutation", lvl, k), width=cfg.level_width(lvl))
                             for k in range(cfg.steps))
        split = lvl < cfg.levels - 1
        prior = None
        if split:
            if cfg.split_prior == "learned":
                prior = SplitPrior(c - c // 2, c // 2)
            c = c - c // 2
        levels.append(Level(steps, prior, split))
    learn_top = cfg.learn_top or cfg.num_classes > 0
    top = TopPrior(c, learn=bool(cfg.learn_top), num_classes=cfg.num_classes) if learn_top else None
    return MultiScaleFlow(levels, top)
