"""The flow's health during training (``memory.check_every``): per-level inverse reconstruction
error |x - f^-1(f(x))| / |x| and per-level statistics of each step's log-det per dimension.

The reconstruction check also decides which flow steps store their activations instead of being
recomputed through their inverses (the same on every rank; see
:class:`flowscale.reconstruction.UnstableSteps`).
"""

from __future__ import annotations

import torch

from . import seeds
from .analysis.lipschitz import logdet_stats
from .config import Config
from .data.quantize import preprocess
from .distributed import max_over_ranks
from .reconstruction import UnstableSteps, reconstruction_tolerance


def health_metrics(flow, batch: torch.Tensor, cfg: Config, dtype: torch.dtype, unstable: UnstableSteps,
                   step: int) -> tuple[dict, str | None]:
    """Per-level inverse reconstruction error (flags the unstable steps, the same on every rank),
    and per-level statistics of each step's log-det per dimension (``logdet_step/level_i/{mean,min,max}``)
    on uint8 ``batch`` [B, C, H, W]. Collective. Returns (metrics, a line to log or None)."""
    # Its own stream: the check must not consume the training RNG (exact resume).
    x = preprocess(batch.cpu(), cfg.data.n_bits, generator=seeds.generator(cfg.train.seed, "health"))
    param = next(flow.parameters())
    x = x.to(param.device, dtype)
    out, line = unstable.check(flow, x, step, reduce=max_over_ranks)
    out.update(logdet_stats(flow, x))  # per-level volume change per step
    return out, line


class HealthCheck:
    """Runs :func:`health_metrics` every ``memory.check_every`` steps and at the first step of
    every (re)start (the unstable-step flags are runtime state), and logs it."""

    def __init__(self, cfg: Config, dtype: torch.dtype, micro_batch: int, log):
        self.cfg, self.dtype, self.log = cfg, dtype, log
        tolerance = reconstruction_tolerance(cfg.memory.max_reconstruction_error, dtype)
        why = f" ({cfg.engine.precision}: max(1e-3, 4 eps))" if cfg.memory.max_reconstruction_error is None else ""
        self.unstable = UnstableSteps(tolerance, cfg.memory.on_unstable, micro_batch, cfg.memory.inverse_recompute, why)
        self.checked = False
        self.last: dict | None = None

    def take(self) -> dict | None:
        """The numbers of the check that ran before the step just taken (None if none ran); cleared."""
        last, self.last = self.last, None
        return last

    def __call__(self, flow, x: torch.Tensor, step: int) -> None:
        """Check ``flow`` on the batch ``x`` about to train step ``step + 1``, when due (collective: every rank)."""
        every = self.cfg.memory.check_every
        if not every or (step % every and self.checked):
            return
        self.checked = True
        health, line = health_metrics(flow, x[:self.cfg.memory.check_batch_size], self.cfg, self.dtype,
                                      self.unstable, step)
        self.log.log(step, health, echo=False)
        self.last = health
        if line:
            self.log.info(f"step {step}: {line}")
