"""DeepSpeed: the engine config generated from the config tree, initialisation, train_step, EMA.

Batch sizes come from one place: ``data.batch_size`` is the global batch;
per-rank micro-batch = batch_size / (world_size * engine.grad_accum), checked to divide
exactly and printed once. The DeepSpeed JSON is generated here, never written by hand, so
the numbers cannot drift. The optimizer is a torch optimizer handed to DeepSpeed (no
JIT-compiled fused ops), the LR schedule is a LambdaLR stepped by DeepSpeed.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.distributed as dist

from .config import Config, ConfigError
from .lipschitz import flow_regularizer
from .loss import flow_bpd_dequantized
from .data.quantize import preprocess


def batch_layout(cfg: Config, world_size: int) -> dict:
    """{"global": B, "micro": per-rank micro-batch, "accum": steps}; raises if B does not split."""
    b, accum = cfg.data.batch_size, cfg.engine.grad_accum
    if b % (world_size * accum):
        raise ConfigError(f"config field 'data.batch_size': {b} must be divisible by world size ({world_size}) x "
                          f"engine.grad_accum ({accum}); e.g. use data.batch_size={world_size * accum * max(1, b // (world_size * accum))}")
    return {"global": b, "micro": b // (world_size * accum), "accum": accum}


# DeepSpeed's own defaults (runtime/zero/config.py), written out so the JSON states them and the
# memory planner reads them from here: ZeRO-1/2/3 reduce gradients through one bucket of
# reduce_bucket_size elements; ZeRO-3 prefetches up to prefetch_bucket_size gathered elements
# and keeps parameters of at most param_persistence_threshold elements whole on every rank.
ZERO_BUCKETS = {"reduce_bucket_size": int(5e8), "stage3_prefetch_bucket_size": int(5e7),
                "stage3_param_persistence_threshold": int(1e5)}


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON for ``cfg`` on ``world_size`` ranks (generated, never hand-written)."""
    layout = batch_layout(cfg, world_size)
    e = cfg.engine
    return {
        "train_batch_size": layout["global"],
        "train_micro_batch_size_per_gpu": layout["micro"],
        "gradient_accumulation_steps": layout["accum"],
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": {"stage": e.zero_stage, **ZERO_BUCKETS},
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": e.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }


def model_dtype(cfg: Config) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.engine.precision]


def guard_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Give the client optimizer a veto: while ``optimizer.flowscale_skip`` is True its ``step``
    does nothing. Whatever DeepSpeed wraps around it (ZeRO partitions, bf16 master weights)
    ends in this step, so the weights stay as they were; ``train_step`` sets the flag on every
    rank alike."""
    inner = optimizer.step

    def step(self, *args, **kwargs):
        if self.flowscale_skip:
            return None
        return inner(*args, **kwargs)

    optimizer.flowscale_skip = False
    optimizer.step = types.MethodType(step, optimizer)  # a bound method, as LR schedulers expect
    return optimizer


def initialize(cfg: Config, flow, optimizer, schedule, world_size: int):
    """deepspeed.initialize with the generated config; returns the engine."""
    import deepspeed

    if cfg.engine.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("config field 'engine.precision': fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or fp32")
    guard_optimizer(optimizer)
    engine, _, _, _ = deepspeed.initialize(model=flow, optimizer=optimizer, config=deepspeed_config(cfg, world_size),
                                           lr_scheduler=schedule)
    engine.flowscale_client_optimizer = optimizer
    return engine


class EMA:
    """Polyak averaging of the (replicated) parameters: shadow <- d * shadow + (1 - d) * param."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module):
        """Temporarily load the averaged weights into ``module`` (for eval and sampling)."""
        backup = {n: p.detach().clone() for n, p in module.named_parameters()}
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    p.copy_(backup[n])

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {n: t.float().clone() for n, t in state.items()}


def _any_rank(flag: bool, device) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return t.item() > 0


def _grads_finite(module: torch.nn.Module) -> bool:
    for p in module.parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return False
    return True


def train_step(engine, batch: torch.Tensor, y: torch.Tensor | None, cfg: Config, step: int, ema: EMA | None = None) -> dict:
    """One optimisation step on this rank's uint8 batch (split into grad_accum micro-batches).

    Returns scalar metrics; ``skipped`` is 1 when the step was skipped because some rank's loss
    (in any micro-batch) or the accumulated gradient was non-finite: all ranks skip together,
    no weight, optimizer moment or EMA changes, and the LR schedule advances with the step count.
    """
    engine.train()
    accum = cfg.engine.grad_accum
    device = engine.device
    dtype = model_dtype(cfg)
    micro_x = batch.chunk(accum)
    micro_y = y.chunk(accum) if y is not None else [None] * accum
    losses, logdets = [], []
    bad_loss = False
    guard = getattr(engine, "flowscale_client_optimizer", None)
    for i, (xb, yb) in enumerate(zip(micro_x, micro_y)):
        x = preprocess(xb.to(device), cfg.data.n_bits).to(dtype)
        bpd, parts = flow_bpd_dequantized(engine, x, cfg.data.n_bits, None if yb is None else yb.to(device))
        loss = bpd.float().mean()
        bad_loss = _any_rank(bad_loss or not bool(torch.isfinite(loss)), device)
        if bad_loss and i == 0:  # nothing accumulated yet: DeepSpeed never sees this step
            if engine.lr_scheduler is not None:
                engine.lr_scheduler.step()  # the LR is a function of the step count, skipped steps included
            return {"bpd": float("nan"), "skipped": 1}
        # Past the first micro-batch DeepSpeed's accumulation must run to its boundary; a bad
        # micro-batch still goes through backward, and the optimizer step is vetoed below.
        # Optional L2 penalty on 1x1-conv weights (DLF's guard against singular W); 0 when off.
        engine.backward(loss + flow_regularizer(engine.module, cfg))
        if i == accum - 1:
            bad_grad = False
            if engine.zero_optimization_stage() == 0:
                # ZeRO-0 keeps full (already averaged) gradients on the parameters; DeepSpeed neither
                # reports their norm nor, in fp32, checks them.
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                grad_norm0 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
                bad_grad = _any_rank(not bool(torch.isfinite(grad_norm0)), device)
            if guard is not None:
                guard.flowscale_skip = bad_loss or bad_grad
        engine.step()
        losses.append(loss.detach())
        logdets.append(parts["logdet"].detach().float().mean() / batch[0].numel())
    if guard is not None:
        guard.flowscale_skip = False
    # ZeRO-1/2/3 and bf16 check the gradient norm themselves and skip (without stepping the LR schedule).
    ds_skipped = not engine.was_step_applied()
    if ds_skipped and engine.lr_scheduler is not None:
        engine.lr_scheduler.step()  # keep the LR a function of the step count, skipped steps included
    if bad_loss or bad_grad or ds_skipped:
        return {"bpd": float("nan") if bad_loss else _mean_over_ranks(losses), "skipped": 1}
    if ema is not None:
        ema.update(engine.module)
    grad_norm = grad_norm0.item() if engine.zero_optimization_stage() == 0 else engine.get_global_grad_norm()
    return {"bpd": _mean_over_ranks(losses), "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": engine.get_lr()[0], "logdet_per_dim": torch.stack(logdets).mean().item(), "skipped": 0}


def _mean_over_ranks(losses: list[torch.Tensor]) -> float:
    loss = torch.stack(losses).mean()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    return loss.item()
