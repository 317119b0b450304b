"""Declared fault injection: the one place production code takes deliberate faults from, so the
failure paths (a diverging step, a crash) can be tested with the real trainer. Two hooks, each
called from one place, each a no-op unless its environment variable is set:

    FLOWSCALE_FAULT=nan_loss@N[:RANK][,nan_loss@M...]          loss_at(step, rank, loss_fn), in the loop
    FLOWSCALE_KILL_AT=<point>@<step>[:<rank>][,...]             point(name, step, rank), in checkpoint.save

``nan_loss@N``: the loss of optimizer step N (1-based: the step after which ``step == N``) is NaN
on rank RANK (every rank when omitted), as a diverging step would be; the engine's veto then
skips it on every rank. Read once per process.

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
def _planned(spec: str) -> dict[int, set[int] | None]:
    """{step: ranks (None = every rank)} of the nan_loss faults in ``spec``."""
    out: dict[int, set[int] | None] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        if kind != "nan_loss" or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(f"{ENV}={spec!r}: cannot read {item!r}; write nan_loss@STEP or nan_loss@STEP:RANK")
        ranks = out.get(int(step), set())
        out[int(step)] = None if (not rank or ranks is None) else ranks | {int(rank)}
    return out


def loss_at(step: int, rank: int, loss_fn):
    """``loss_fn`` for optimizer step ``step`` (1-based) on ``rank``: unchanged, unless a fault is
    declared there, then the same loss times NaN."""
    planned = _planned(os.environ.get(ENV, ""))
    if step not in planned or (planned[step] is not None and rank not in planned[step]):
        return loss_fn

    def nan_loss(*args, **kwargs):
        loss, extra = loss_fn(*args, **kwargs)
        return loss * torch.tensor(float("nan"), dtype=loss.dtype, device=loss.device), extra

    return nan_loss
