"""Lipschitz balance: keeping a flow and its inverse well conditioned while it trains.

"Jacobian Determinant of Normalizing Flows" (Liao & He 2021): the likelihood objective
pushes log|det J| up wherever it can, and training is stable only while both the map and its
inverse stay Lipschitz-bounded. flowscale's controls, each switchable:

* bounded coupling scales (``model.scale_fn``; the DLT's alpha*tanh+beta), already in the layers;
* spectral normalisation of coupling / g_k networks (``model.spectral_norm``,
  :mod:`flowscale.flows.spectral`);
* a soft bound on the log-diagonal of LU 1x1 convs (``model.lu_max_log_s``);
* an L2 penalty on 1x1-conv weights (``optim.invconv_l2``, DLF's remedy for "input is not
  invertible" NaNs): :func:`flow_regularizer`, which the trainer adds to the bits/dim loss;
* health metrics: :func:`logdet_stats`, how much each flow step expands (log-det > 0) or
  contracts volume, per dimension, to be logged beside bits/dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .flows.permutations import InvConv1x1, InvConv1x1LU


def invconv_weights(flow: nn.Module) -> list[torch.Tensor]:
    """The W of every invertible 1x1 conv in ``flow`` (LU convs: the composed P L U)."""
    out = []
    for m in flow.modules():
        if isinstance(m, InvConv1x1):
            out.append(m.weight)
        elif isinstance(m, InvConv1x1LU):
            out.append(m.weight_and_logdet(m.lower.dtype)[0])
    return out


def flow_regularizer(flow: nn.Module, cfg) -> torch.Tensor:
    """The penalty to add to the mean bits/dim loss (a scalar tensor, 0 when switched off):

        optim.invconv_l2 * sum_W sum(W^2) / (2 n),   n = the number of 1x1-conv weight entries

    ``cfg`` is the factor itself, the Config or its OptimConfig. Mirrors naturomics/DLF
    (l2_factor / n times tf.nn.l2_loss of every invconv W)."""
    factor = float(cfg) if isinstance(cfg, (int, float)) else getattr(getattr(cfg, "optim", cfg), "invconv_l2", 0.0)
    param = next(flow.parameters())
    if not factor:
        return torch.zeros((), device=param.device)
    ws = invconv_weights(flow)
    if not ws:
        return torch.zeros((), device=param.device)
    n = sum(w.numel() for w in ws)
    if n == 0:  # ZeRO-3 keeps only a partition of each parameter outside its module's call
        raise RuntimeError("flow_regularizer needs the full 1x1-conv weights; use engine.zero_stage 0-2 with optim.invconv_l2")
    return factor * sum(w.float().pow(2).sum() for w in ws) / (2 * n)


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
