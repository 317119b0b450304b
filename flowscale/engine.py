"""DeepSpeed mechanics: the engine config generated from the config tree, initialisation,
``train_step`` (micro-batches, the non-finite veto, grad norm).

Batch sizes come from one place: ``data.batch_size`` is the global batch;
per-rank micro-batch = batch_size / (world_size * engine.grad_accum), checked to divide
exactly and printed once. The DeepSpeed JSON is generated here, never written by hand, so
the numbers cannot drift. The optimizer is a torch optimizer handed to DeepSpeed (no
JIT-compiled fused ops), the LR schedule is a LambdaLR stepped by DeepSpeed.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import Config, ConfigError
from .distributed import any_rank, mean_over_ranks


def batch_layout(cfg: Config, world_size: int) -> dict:
    """{"global": B, "micro": per-rank micro-batch, "accum": steps}; raises if B does not split."""
    b, accum = cfg.data.batch_size, cfg.engine.grad_accum
    if b % (world_size * accum):
        raise ConfigError(f"config field 'data.batch_size': {b} must be divisible by world size ({world_size}) x "
                          f"engine.grad_accum ({accum}); e.g. use data.batch_size={world_size * accum * max(1, b // (world_size * accum))}")
    return {"global": b, "micro": b // (world_size * accum), "accum": accum}


ZERO_DEFAULTS = {"reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8),
                 "stage3_prefetch_bucket_size": int(5e7), "stage3_param_persistence_threshold": int(1e5),
                 "stage3_max_live_parameters": int(1e9)}
"""DeepSpeed's own defaults (runtime/zero/config.py) for the sizes left null in ``engine.*``,
written out so the generated JSON states them and the memory planner reads them."""


def zero_optimization(e) -> dict:
    """The ``zero_optimization`` section for ``cfg.engine`` (an EngineConfig): the stage and the
    communication settings, each field's null resolved to DeepSpeed's recommendation for that
    stage (see the field docstrings). The one place these are decided: the engine config and
    ``flowscale plan`` both read it."""
    stage = e.zero_stage
    pick = lambda value, default: default if value is None else value  # noqa: E731
    section = {
        "stage": stage,
        "overlap_comm": bool(pick(e.overlap_comm, stage >= 2)),
        "contiguous_gradients": bool(pick(e.contiguous_gradients, True)),
        "reduce_bucket_size": int(pick(e.reduce_bucket_size, ZERO_DEFAULTS["reduce_bucket_size"])),
        "allgather_bucket_size": int(pick(e.allgather_bucket_size, ZERO_DEFAULTS["allgather_bucket_size"])),
        "stage3_prefetch_bucket_size": int(pick(e.prefetch_bucket_size, ZERO_DEFAULTS["stage3_prefetch_bucket_size"])),
        "stage3_param_persistence_threshold": int(pick(e.param_persistence_threshold,
                                                       ZERO_DEFAULTS["stage3_param_persistence_threshold"])),
        "stage3_max_live_parameters": int(pick(e.max_live_parameters, ZERO_DEFAULTS["stage3_max_live_parameters"])),
    }
    if stage == 0:  # plain data parallel: DeepSpeed reads none of the rest
        section["overlap_comm"] = False
    return section


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for ``cfg`` on ``world_size`` ranks (generated, never hand-written).
    ``load_universal``: the engine will load a universal checkpoint (another ZeRO layout)."""
    layout = batch_layout(cfg, world_size)
    e = cfg.engine
    return {
        "train_batch_size": layout["global"],
        "train_micro_batch_size_per_gpu": layout["micro"],
        "gradient_accumulation_steps": layout["accum"],
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero_optimization(e),
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": e.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
    }


def model_dtype(cfg: Config) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.engine.precision]


class VetoableOptimizer(torch.optim.Optimizer):
    """The client torch optimizer with a veto: while :attr:`skip` is True, :meth:`step` does
    nothing. Whatever DeepSpeed wraps around the client optimizer (ZeRO partitions, bf16 master
    weights) ends in this step, so the weights and moments stay as they were; ``train_step``
    sets :attr:`skip` on every rank alike.

    Everything else is :attr:`inner`'s: ``param_groups``, ``state`` and ``defaults`` are its very
    objects (DeepSpeed re-points the groups' params at its flat partitions, LR schedules write
    the groups' ``lr``), and ``state_dict`` / ``load_state_dict`` are its own, so checkpoints hold
    the keys of the torch optimizer (Adam, Adamax, ...) whichever way they were written.
    """

    def __init__(self, inner: torch.optim.Optimizer):
        # torch.optim.Optimizer.__init__ is not called: it would build a second set of groups
        # and state; this object has none of its own.
        self.inner = inner
        """The torch optimizer that does the update."""
        self.skip = False
        """The veto: True makes the next :meth:`step` a no-op (set and cleared by ``train_step``)."""

    param_groups = property(lambda self: self.inner.param_groups,
                            lambda self, groups: setattr(self.inner, "param_groups", groups))
    state = property(lambda self: self.inner.state, lambda self, state: setattr(self.inner, "state", state))
    defaults = property(lambda self: self.inner.defaults,
                        lambda self, defaults: setattr(self.inner, "defaults", defaults))

    def __getattr__(self, name: str):
        # Only reached for names this class does not define: torch.optim.Optimizer's own
        # bookkeeping (step hooks, the LR scheduler's marks) lives on the inner optimizer.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def step(self, closure=None):  # a bound method, as LR schedulers expect
        if self.skip:
            return None
        return self.inner.step(closure) if closure is not None else self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.inner.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"VetoableOptimizer({self.inner!r})"


def vetoable_optimizer(engine) -> VetoableOptimizer | None:
    """The :class:`VetoableOptimizer` that ``engine`` (from :func:`initialize`) was given as its
    client optimizer (DeepSpeed's ``engine.client_optimizer``), or None for an engine built
    without one."""
    client = getattr(engine, "client_optimizer", None)
    return client if isinstance(client, VetoableOptimizer) else None


def client_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer of an engine from :func:`initialize` (the one under the veto)."""
    veto = vetoable_optimizer(engine)
    return veto.inner if veto is not None else engine.client_optimizer


def scale_lr(engine, factor: float) -> None:
    """Multiply the LR of the next optimizer step by ``factor``. The LR schedule (a LambdaLR,
    not chained) sets every step's LR afresh from the step count, so the change lasts one step."""
    if factor == 1.0:
        return
    for group in client_optimizer(engine).param_groups:
        group["lr"] *= factor


def initialize(cfg: Config, flow, optimizer, schedule, world_size: int, load_universal: bool = False):
    """deepspeed.initialize with the generated config and ``optimizer`` (a torch optimizer)
    under a :class:`VetoableOptimizer`; returns the engine."""
    import deepspeed

    if cfg.engine.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("config field 'engine.precision': fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or fp32")
    engine, _, _, _ = deepspeed.initialize(model=flow, optimizer=VetoableOptimizer(optimizer),
                                           config=deepspeed_config(cfg, world_size, load_universal), lr_scheduler=schedule)
    return engine


def _grad_norm_zero0(module: torch.nn.Module) -> torch.Tensor:
    """ZeRO-0 keeps full (already averaged) gradients on the parameters; DeepSpeed neither
    reports their norm nor, in fp32, checks them."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


LossFn = Callable[..., tuple[torch.Tensor, dict]]  # (module, x, y, *more parts of the batch) -> (loss, extra)


def train_step(engine, batch: tuple[torch.Tensor | None, ...], loss_fn: LossFn) -> dict:
    """One optimiser step of DeepSpeed on this rank's batch ``(x, y, ...)``: every part (a
    tensor with the batch first, or None) split into engine.grad_accum micro-batches,
    ``loss, extra = loss_fn(engine, *parts_micro)``, backward, step. Only the mechanics live
    here; what is optimised is ``loss_fn``'s business.

    Returns the loss and every ``extra`` scalar averaged over micro-batches and ranks, the grad
    norm and the LR. ``skipped`` is 1 when some rank's loss (in any micro-batch) or the
    accumulated gradient was non-finite: all ranks skip together, no weight or optimizer moment
    changes, and the LR schedule advances with the step count.
    """
    engine.train()
    accum = engine.gradient_accumulation_steps()
    device = engine.device
    micro = zip(*[part.chunk(accum) if part is not None else [None] * accum for part in batch])
    losses, extras = [], []
    bad_loss = bad_grad = False
    veto = vetoable_optimizer(engine)
    for i, parts in enumerate(micro):
        loss, extra = loss_fn(engine, *parts)
        bad_loss = any_rank(bad_loss or not bool(torch.isfinite(loss)), device)
        if bad_loss and i == 0:  # nothing accumulated yet: DeepSpeed never sees this step
            if engine.lr_scheduler is not None:
                engine.lr_scheduler.step()  # the LR is a function of the step count, skipped steps included
            return {"loss": float("nan"), "skipped": 1}
        # Past the first micro-batch DeepSpeed's accumulation must run to its boundary; a bad
        # micro-batch still goes through backward, and the optimizer step is vetoed below.
        engine.backward(loss)
        if i == accum - 1:
            if engine.zero_optimization_stage() == 0:
                grad_norm0 = _grad_norm_zero0(engine.module)
                bad_grad = any_rank(not bool(torch.isfinite(grad_norm0)), device)
            if veto is not None:
                veto.skip = bad_loss or bad_grad
        engine.step()
        losses.append(loss.detach())
        extras.append(extra)
    if veto is not None:
        veto.skip = False
    # ZeRO-1/2/3 and bf16 check the gradient norm themselves and skip (without stepping the LR schedule).
    ds_skipped = not engine.was_step_applied()
    if ds_skipped and engine.lr_scheduler is not None:
        engine.lr_scheduler.step()  # keep the LR a function of the step count, skipped steps included
    if bad_loss or bad_grad or ds_skipped:
        return {"loss": float("nan") if bad_loss else mean_over_ranks(torch.stack(losses).mean().reshape(1))[0],
                "skipped": 1}
    grad_norm = grad_norm0.item() if engine.zero_optimization_stage() == 0 else engine.get_global_grad_norm()
    # The loss and every extra scalar, averaged over micro-batches, then over ranks in one all-reduce.
    names = ["loss", *extras[0]]
    local = torch.stack([torch.stack(losses).float().mean()] +
                        [torch.stack([torch.as_tensor(e[k]).float() for e in extras]).mean() for k in extras[0]])
    means = mean_over_ranks(local)
    return {**dict(zip(names, means)), "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": engine.get_lr()[0], "skipped": 0}
