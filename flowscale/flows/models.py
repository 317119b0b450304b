"""``build_flow(model_cfg, channels, image_size)``: the presets "nice", "realnvp", "glow", "dlf",
"jet", "tarflow".

Each level is [squeeze -> K steps -> split]. A step is, in order, the optional parts of
``ActNorm -> permutation -> coupling``; the preset fills every choice the config leaves null.
DLF's step is ``1x1 conv -> dynamic linear transform`` (coupling="dynamic_linear").

The transformer flows are one level whose squeeze cuts the image into patch tokens
(space-to-depth by ``patch_size``) and which has no split: Jet's K steps are
``permutation -> coupling`` with a ViT network, every ``jet_spatial_every``-th one a spatial
coupling instead (:mod:`flowscale.flows.jet`); TarFlow's are causal-transformer autoregressive
blocks alternating the token order (:mod:`flowscale.flows.tarflow`).
"""

from __future__ import annotations

from dataclasses import replace

from .. import seeds
from ..config import ModelConfig
from .priors import SplitPrior, TopPrior
from .actnorm import ActNorm
from .base import FlowSequence
from .couplings import Coupling
from .dynamic_linear import DynamicLinearTransform
from .jet import SPATIAL_PATTERNS, SpatialCoupling
from .multiscale import Level, MultiScaleFlow
from .nets import glow_net
from .permutations import build_permutation
from .tarflow import TarFlowBlock
from .vit import vit_net

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
    # Jet (Kolesnikov et al. 2024), big_vision models/proj/jet: patch tokens, one level, affine
    # couplings with s = 2 sigmoid(raw) and ViT networks; channel couplings after a fixed random
    # channel permutation, some spatial ones (model.jet_spatial_every); N(0, I) prior.
    "jet": dict(coupling="affine", mask="channel", permutation="shuffle", scale_fn="sigmoid2",
                actnorm=False, split_prior="fixed", learn_top=False, net="vit"),
    # TarFlow (Zhai et al. 2024), apple/ml-tarflow: the coupling fields are unused (its blocks
    # are autoregressive); N(0, I) prior.
    "tarflow": dict(coupling="affine", mask="channel", permutation="none", scale_fn="exp_clamp",
                    actnorm=False, split_prior="fixed", learn_top=False, net="vit"),
}


def resolve_preset(cfg: ModelConfig) -> ModelConfig:
    """A copy of ``cfg`` with every null layer choice filled from its preset."""
    defaults = PRESETS[cfg.preset]
    return replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


def coupling_net(cfg: ModelConfig, width: int, out_bias: float = 0.0):
    """The coupling-network constructor ``(in_channels, out_channels) -> module`` that cfg.net names."""
    if cfg.net == "vit":
        return vit_net(width, cfg.vit_depth, cfg.vit_heads, cfg.vit_patch, out_bias)
    return glow_net(width, out_bias=out_bias, spectral_norm=cfg.spectral_norm)


def _step(cfg: ModelConfig, channels: int, index: int, seed: int, width: int) -> FlowSequence:
    parts = []
    if cfg.actnorm:
        parts.append(ActNorm(channels))
    perm = build_permutation(cfg.permutation, channels, seed, cfg.lu_max_log_s, cfg.invconv_bias)
    if perm is not None:
        parts.append(perm)
    if cfg.coupling == "dynamic_linear":
        net = coupling_net(cfg, width, out_bias=cfg.dlt_out_bias)
        parts.append(DynamicLinearTransform(channels, net, cfg.dlt_partitions, cfg.dlt_split, cfg.dlt_decomposition,
                                            cfg.dlt_first, cfg.num_classes, cfg.dlt_beta_init, cfg.dlt_out_bias))
        return FlowSequence(parts)
    mask = cfg.mask
    if mask == "alternate":
        mask = "checkerboard" if index < max(cfg.steps // 2, 1) else "channel"
    parity = index % 2 if cfg.permutation == "none" else 0
    parts.append(Coupling(channels, coupling_net(cfg, width), kind=cfg.coupling, mask=mask, parity=parity,
                          scale_fn=cfg.scale_fn, clamp=cfg.clamp))
    return FlowSequence(parts)


def _jet_step(cfg: ModelConfig, channels: int, index: int, seed: int) -> FlowSequence:
    """Coupling ``index`` of a Jet model: spatial at every jet_spatial_every-th, else the usual step."""
    n = cfg.jet_spatial_every
    if n and (index + 1) % n == 0:
        pattern, parity = SPATIAL_PATTERNS[((index + 1) // n - 1) % len(SPATIAL_PATTERNS)]
        parts = [ActNorm(channels)] if cfg.actnorm else []
        parts.append(SpatialCoupling(channels, coupling_net(cfg, cfg.width), pattern, parity, cfg.scale_fn, cfg.clamp))
        return FlowSequence(parts)
    return _step(cfg, channels, index, seed, cfg.width)


def _build_patch_flow(cfg: ModelConfig, channels: int, image_size: int) -> MultiScaleFlow:
    """jet / tarflow: one level [patchify -> K steps], no split (see the module docstring)."""
    p = cfg.patch_size
    if image_size % p:
        raise ValueError(f"image_size={image_size} is not divisible by patch_size={p}")
    d, n = channels * p * p, (image_size // p) ** 2
    if cfg.preset == "jet":
        steps = FlowSequence(_jet_step(cfg, d, k, seeds.derive(cfg.seed, "permutation", 0, k)) for k in range(cfg.steps))
    else:
        steps = FlowSequence(TarFlowBlock(d, n, cfg.width, cfg.vit_depth, cfg.vit_heads, reverse=k % 2 == 1,
                                          clamp=cfg.clamp) for k in range(cfg.steps))
    learn_top = cfg.learn_top or cfg.num_classes > 0
    top = TopPrior(d, learn=bool(cfg.learn_top), num_classes=cfg.num_classes) if learn_top else None
    return MultiScaleFlow([Level(steps, None, split=False, factor=p)], top)


def build_flow(cfg: ModelConfig, channels: int, image_size: int) -> MultiScaleFlow:
    """The multi-scale flow for ``channels`` x ``image_size`` x ``image_size`` inputs."""
    cfg = resolve_preset(cfg)
    if cfg.is_patch_flow:
        return _build_patch_flow(cfg, channels, image_size)
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
        levels.append(Level(steps, prior, split, channels_last=cfg.net != "vit"))
    learn_top = cfg.learn_top or cfg.num_classes > 0
    top = TopPrior(c, learn=bool(cfg.learn_top), num_classes=cfg.num_classes) if learn_top else None
    return MultiScaleFlow(levels, top)
