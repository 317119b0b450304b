"""Declared fault injection: the one place production code takes deliberate faults from, so the
failure paths (a diverging step, a crash) can be tested with the real trainer. Two hooks, each
called from one place, each a no-op unless its environment variable is set:

    FLOWSCALE_FAULT=nan_loss@N[:RANK][,lr_spike@B[xFACTOR]...]  loss_at(step, rank, loss_fn, batch), in the loop
    FLOWSCALE_KILL_AT=<point>@<step>[:<rank>][,...]             point(name, step, rank), in checkpoint.save

``nan_loss@N``: the loss of optimizer step N (1-based: the step after which ``step == N``) is NaN
on rank RANK (every rank when omitted), as a diverging step would be; the engine's veto then
skips it on every rank. ``lr_spike@B`` (``lr_spike@BxFACTOR``, default factor 1000): a poisoned
batch. The step that trains on the B-th batch the loader delivers (1-based; the same as step B
until a rollback skips data) runs with its LR multiplied by FACTOR on every rank, so the update
really throws the weights off and the run diverges in the steps after. It is tied to the data,
as a bad batch is: a rollback that skips past it does not meet it again. Read once per process.

``<point>@<step>``: the process SIGKILLs itself inside :func:`flowscale.checkpoint.save` of that
step (on RANK only, when given) at ``<point>``, one of :data:`CRASH_POINTS`, to test that a crash
anywhere in a save leaves a resumable run. Unset, it costs one environment lookup per point.
"""

from __future__ import annotations

import functools
import os
import signal

import torch

ENV = "FLOWSCALE_FAULT"
KILL_ENV = "FLOWSCALE_KILL_AT"
LR_SPIKE = 1000.0
"""The LR factor of ``lr_spike@N`` without ``xFACTOR``."""

CRASH_POINTS = ("engine_state", "export", "complete", "prune")
"""Where :func:`flowscale.checkpoint.save` can be made to die: after DeepSpeed's files and the rank
file, after the safetensors export (before COMPLETE), after COMPLETE (before pruning), midway
through pruning."""


def point(name: str, step: int, rank: int) -> None:
    """A crash point of the checkpoint save: SIGKILL this process here when ``FLOWSCALE_KILL_AT``
    names ``name`` (one of :data:`CRASH_POINTS`) at ``step`` (and this ``rank``, when it gives one)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    for item in spec.split(","):
        kind, _, rest = item.strip().partition("@")
        at, _, only_rank = rest.partition(":")
        if kind == name and int(at) == step and (not only_rank or int(only_rank) == rank):
            os.kill(os.getpid(), signal.SIGKILL)


@functools.lru_cache(maxsize=None)
def _planned(spec: str) -> dict[int, dict]:
    """{("step" | "batch", n): {"nan_ranks": ranks (None = every rank), "lr": factor}} of ``spec``."""
    out: dict[int, dict] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, where = item.partition("@")
        if kind == "lr_spike":
            step, _, factor = where.partition("x")
            try:
                value = float(factor) if factor else LR_SPIKE
            except ValueError:
                value = -1.0
            if step.isdigit() and value > 0:
                out.setdefault(("batch", int(step)), {})["lr"] = value
                continue
        elif kind == "nan_loss":
            step, _, rank = where.partition(":")
            if step.isdigit() and (not rank or rank.isdigit()):
                plan = out.setdefault(("step", int(step)), {})
                ranks = plan.get("nan_ranks", set())
                plan["nan_ranks"] = None if (not rank or ranks is None) else ranks | {int(rank)}
                continue
        raise ValueError(f"{ENV}={spec!r}: cannot read {item!r}; write nan_loss@STEP, nan_loss@STEP:RANK, "
                         f"lr_spike@BATCH or lr_spike@BATCHxFACTOR")
    return out


def loss_at(step: int, rank: int, loss_fn, batch: int = 0):
    """``loss_fn`` for optimizer step ``step`` (1-based) on ``rank``, training on the loader's
    ``batch``-th batch: unchanged, unless a fault is declared there: nan_loss = the same loss times
    NaN; lr_spike = the step's LR times the factor (set on the engine's optimizer at the first
    micro-batch; the LR schedule sets the next step's)."""
    planned = _planned(os.environ.get(ENV, ""))
    if not planned:
        return loss_fn
    plan = {**planned.get(("step", step), {}), **planned.get(("batch", batch), {})}
    if not plan:
        return loss_fn
    nan = "nan_ranks" in plan and (plan["nan_ranks"] is None or rank in plan["nan_ranks"])
    spike = [plan.get("lr")]

    def faulty_loss(engine, *args, **kwargs):
        if spike[0] is not None:
            from .engine import scale_lr

            scale_lr(engine, spike[0])
            spike[0] = None
        loss, extra = loss_fn(engine, *args, **kwargs)
        if nan:
            loss = loss * torch.tensor(float("nan"), dtype=loss.dtype, device=loss.device)
        return loss, extra

    return faulty_loss if nan or plan.get("lr") else loss_fn
