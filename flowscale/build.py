"""Setting up a run, once, for ``flowscale train`` and every benchmark:

    seed model_init -> build_flow -> inverse_checkpoint -> ActNorm init (all-reduced) -> dtype
                    -> torch.compile of the coupling networks (engine.compile)
                    -> torch optimizer + LR schedule -> deepspeed.initialize -> EMA

:func:`build_training` returns the pieces as a :class:`Training`. The order matters and is the
reason this is one function: ActNorm's data-dependent init must run on the raw module on every
rank before DeepSpeed wraps it (a lazy init inside ``forward`` diverges across ranks or never
reaches ZeRO-3's partitions), and the cast to bf16 must come after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import seeds
from .config import Config, ConfigError
from .data.quantize import preprocess
from .distributed import DistInfo, all_reduce_sum_
from .ema import EMA
from .engine import batch_layout, initialize, model_dtype
from .flows.actnorm import initialize_actnorm
from .flows.models import build_flow
from .flows.nets import compile_networks
from .inverse_checkpoint import checkpoint_steps, inverse_checkpoint
from .seeds import seed_everything, seed_rank_streams


def pick_device(name: str, local_rank: int = 0, field: str = "config field 'train.device'") -> torch.device:
    """``train.device``: ``auto`` = this rank's GPU when one is visible, else cpu; ``cuda``
    without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{field}: cuda, but no CUDA device is visible; use cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def build_model(cfg: Config, device: torch.device | str = "cpu"):
    """The flow for ``cfg`` on ``device`` with the memory wrapper applied from outside."""
    flow = build_flow(cfg.model, cfg.data.channels, cfg.data.image_size).to(device)
    if cfg.memory.checkpoint_steps:
        return checkpoint_steps(flow)
    return inverse_checkpoint(flow, enabled=cfg.memory.inverse_recompute, levels=cfg.memory.recompute_levels)


def build_optimizer(cfg: Config, params) -> tuple[torch.optim.Optimizer, callable]:
    """A torch optimizer and the LR multiplier schedule(step): linear warmup, then optional
    cosine / linear / exponential decay to optim.min_lr_ratio at train.steps."""
    o = cfg.optim
    params = [p for p in params if p.requires_grad]
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adamax": torch.optim.Adamax}
    # fused: one kernel over every parameter instead of a Python loop per tensor (Glow K=8 on CPU:
    # Adam 15.6 -> 5.5 ms of a ~200 ms step); torch has no fused Adamax
    opt = kinds[o.name](params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                        **({"fused": True} if o.name in ("adam", "adamw") else {}))
    total, warm = cfg.train.steps, o.warmup_steps

    def schedule(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        floor = o.min_lr_ratio
        if o.decay == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if o.decay == "linear":
            return floor + (1 - floor) * (1 - progress)
        if o.decay == "exponential":
            return floor ** progress
        return 1.0

    return opt, schedule


def build_initialized_flow(cfg: Config, init_images: torch.Tensor, device: torch.device | str = "cpu",
                           rank: int = 0):
    """The model of ``cfg``, weights from the ``model_init`` stream, ActNorm initialised from
    this rank's ``init_images`` (uint8; statistics all-reduced over ranks), cast to the training
    dtype. Returns (flow, number of ActNorm layers initialised). Afterwards the global RNGs are
    this rank's training stream."""
    seed_everything(cfg.train.seed)
    flow = build_model(cfg, device)
    # With data.streams every rank passes the whole init batch and draws the same noise: the
    # init is then the same for any number of ranks (the all-reduced statistics of W copies).
    noise_rank = 0 if cfg.data.streams else rank
    x = preprocess(init_images, cfg.data.n_bits, generator=seeds.generator(cfg.train.seed, "actnorm_init", noise_rank))
    # Class embeddings start at zero, so any labels give the same init: zeros.
    cond = torch.zeros(len(init_images), dtype=torch.int64, device=device) if cfg.model.num_classes > 0 else None
    n_init = initialize_actnorm(flow, x.to(device), cond=cond, all_reduce=all_reduce_sum_)
    if cfg.engine.precision != "fp32":
        flow = flow.to(model_dtype(cfg))
    if cfg.engine.compile:  # after the ActNorm init, whose hooks would only cost recompiles
        compile_networks(flow)
    seed_rank_streams(cfg.train.seed, rank)
    return flow, n_init


@dataclass
class Training:
    """Everything a training loop steps: the DeepSpeed ``engine`` and its unwrapped ``module``."""
    engine: object
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    device: torch.device
    dtype: torch.dtype
    layout: dict
    """{"global", "micro", "accum"}: the batch sizes of :func:`flowscale.engine.batch_layout`."""
    n_params: int
    """Parameters of the whole model (counted before ZeRO-3 partitions them)."""
    n_actnorm: int
    """ActNorm layers initialised from data."""


def build_training(cfg: Config, info: DistInfo, init_images: torch.Tensor, device: torch.device,
                   load_universal: bool = False) -> Training:
    """Model, ActNorm init, dtype, optimizer, LR schedule, DeepSpeed engine and EMA for this rank
    (collective: every rank calls it). ``init_images``: this rank's share of the uint8 images
    for the data-dependent init. ``load_universal``: the engine is to load a universal checkpoint."""
    layout = batch_layout(cfg, info.world_size)
    flow, n_init = build_initialized_flow(cfg, init_images, device, info.rank)
    n_params = sum(p.numel() for p in flow.parameters())
    optimizer, schedule = build_optimizer(cfg, flow.parameters())
    engine = initialize(cfg, flow, optimizer, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                        info.world_size, load_universal)
    module = engine.module
    ema = EMA(module, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    return Training(engine, module, optimizer, ema, device, model_dtype(cfg), layout, n_params, n_init)
