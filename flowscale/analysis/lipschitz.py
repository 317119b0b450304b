"""Lipschitz balance (analysis): measuring how well conditioned a flow and its inverse stay while it trains.

"Jacobian Determinant of Normalizing Flows" (Liao & He 2021): the likelihood objective
pushes log|det J| up wherever it can, and training is stable only while both the map and its
inverse stay Lipschitz-bounded. flowscale's controls, each switchable:

* bounded coupling scales (``model.scale_fn``; the DLT's alpha*tanh+beta), already in the layers;
* spectral normalisation of coupling / g_k networks (``model.spectral_norm``,
  :mod:`flowscale.flows.spectral`);
* a soft bound on the log-diagonal of LU 1x1 convs (``model.lu_max_log_s``);
* an L2 penalty on 1x1-conv weights (``optim.invconv_l2``, DLF's remedy for "input is not
  invertible" NaNs): :func:`flowscale.loss.flow_regularizer`, a term of the training loss;
* health metrics: :func:`logdet_stats`, how much each flow step expands (log-det > 0) or
  contracts volume, per dimension, to be logged beside bits/dim.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def step_logdets(flow: nn.Module, x: torch.Tensor, cond: torch.Tensor | None = None) -> list[list[float]]:
    """Per chain (level), per flow step: the batch-mean log-det of the step divided by the
    number of dimensions it acts on (its mean log expansion factor per dimension), along
    :meth:`Flow.walk`."""

    def per_step(i, chain, h, cond):
        out = []
        for step in chain:
            h, ld = step(h, cond=cond)
            out.append((ld.double().mean() / h[0].numel()).item())
        return h, None, out

    return [p.extra for p in flow.walk(x, cond, run=per_step)]


def logdet_stats(flow: nn.Module, x: torch.Tensor, cond: torch.Tensor | None = None) -> dict[str, float]:
    """Health metrics from :func:`step_logdets`: for each level i, ``logdet_step/level_i/{mean,min,max}``
    over its steps, and ``logdet_step/max_abs`` over all steps. A step whose |log-det| per
    dimension grows large expands or contracts volume strongly: its inverse (or forward) is then
    badly conditioned."""
    table = step_logdets(flow, x, cond)
    stats = {}
    for i, per_step in enumerate(table):
        t = torch.tensor(per_step, dtype=torch.float64)
        stats[f"logdet_step/level_{i}/mean"] = t.mean().item()
        stats[f"logdet_step/level_{i}/min"] = t.min().item()
        stats[f"logdet_step/level_{i}/max"] = t.max().item()
    stats["logdet_step/max_abs"] = max(abs(v) for per_step in table for v in per_step)
    return stats
