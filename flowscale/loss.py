"""The objective, in one place: bits per dimension of the discrete image (openai/glow's definition).

For a D-dimensional image reduced to n_bins = 2^n_bits levels and dequantised to
x in [-0.5, 0.5)^D (see :mod:`flowscale.data.quantize`), per image:

    bpd = -(log p_Z(z) + logdet - D * log(n_bins)) / (D * log 2)

log p_Z is summed over every latent, logdet = log|det dz/dx| over the whole flow; sums are
taken first, the division comes last. This is an upper bound on the discrete negative
log-likelihood in bits per sub-pixel, the number flow papers report.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from . import seeds
from .data.quantize import preprocess
from .flows.permutations import InvConv1x1, InvConv1x1LU
from .flows.priors import standard_normal_logprob


def bits_per_dim(log_pz: torch.Tensor, logdet: torch.Tensor, n_dims: int, n_bits: int) -> torch.Tensor:
    """[B] bits/dim from [B] log p_Z(z) and [B] log-det (nats)."""
    n_bins = 2 ** n_bits
    return -(log_pz + logdet - n_dims * math.log(n_bins)) / (n_dims * math.log(2.0))


def flow_bpd_dequantized(flow, x: torch.Tensor, n_bits: int, y: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Run the flow data -> latent on already dequantised x in [-0.5, 0.5); return ([B] bpd, parts).

    ``parts`` holds the [B] ``log_pz`` and ``logdet`` (nats) for logging.
    """
    eps, logdet = flow(x, cond=y)
    log_pz = sum(standard_normal_logprob(e) for e in eps)
    return bits_per_dim(log_pz, logdet, x[0].numel(), n_bits), {"log_pz": log_pz, "logdet": logdet}


class Objective(NamedTuple):
    """What one evaluation of the objective produced (every per-image tensor is [B])."""
    loss: torch.Tensor
    """Scalar to minimise: mean bits/dim (float32) plus the Lipschitz penalty."""
    bpd: torch.Tensor
    log_pz: torch.Tensor
    logdet: torch.Tensor


def objective(flow, x_uint8: torch.Tensor, n_bits: int, y: torch.Tensor | None = None, *,
              noise: torch.Generator | tuple[torch.Tensor, torch.Tensor | None] | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
              invconv_l2: float = 0.0, noise_std: float = 0.0) -> Objective:
    """The training objective of a uint8 batch [B, C, H, W], used by training, eval and every bench:

        x    = (floor(x_uint8 / 2^(8 - n_bits)) + u) / 2^n_bits - 0.5,   u ~ U[0, 1)^D
        bpd  = bits_per_dim(sum_l log N(eps_l; 0, I), logdet)          (eps, logdet) = flow(x, y)
        loss = mean(bpd) + invconv_l2 * sum_W |W|^2 / (2 n)            (DLF's 1x1-conv penalty)

    ``noise``: where u comes from. A CPU generator from a named stream (:mod:`flowscale.seeds`)
    gives noise that depends on neither the device nor the number of ranks (eval, benches); None
    draws from the device's global RNG, seeded per rank (training). ``device``/``dtype``: where
    and in which precision the flow runs (default: the batch's device). ``noise_std``: Gaussian
    noise augmentation for training, x += noise_std * N(0, I) drawn from the same source as u
    (``data.noise_std``; evaluation leaves it at 0 so bits/dim stay comparable). A pair of
    tensors ``(u, g)`` is the noise itself, drawn per sample by :func:`sample_noise` (g: the
    N(0, I) draws of the augmentation, or None).
    """
    device = x_uint8.device if device is None else device
    if isinstance(noise, tuple):  # per-sample draws (data.streams): the same on any number of ranks
        u, g = noise
        x = preprocess(x_uint8.to(device), n_bits, noise=u.to(device))
        if noise_std:
            x = x + noise_std * g.to(device, x.dtype)
        x = x.to(dtype)
    elif noise is not None:  # a CPU stream: draw on the CPU, then move
        x = preprocess(x_uint8.cpu(), n_bits, generator=noise)
        if noise_std:
            x = x + noise_std * torch.randn(x.shape, generator=noise, dtype=x.dtype)
        x = x.to(device, dtype)
    else:
        x = preprocess(x_uint8.to(device), n_bits)
        if noise_std:
            x = x + noise_std * torch.randn_like(x)
        x = x.to(dtype)
    bpd, parts = flow_bpd_dequantized(flow, x, n_bits, None if y is None else y.to(device))
    loss = bpd.float().mean()
    if invconv_l2:
        loss = loss + flow_regularizer(flow, invconv_l2)
    return Objective(loss, bpd, parts["log_pz"], parts["logdet"])


def sample_noise(seed: int, step: int, rows: range, shape: tuple[int, ...], noise_std: float = 0.0):
    """``(u [n, *shape], g [n, *shape] | None)``: the training noise of global rows ``rows`` of
    step ``step`` (u ~ U[0, 1) for dequantisation, g ~ N(0, I) when ``noise_std`` > 0), each row
    from its own stream ``(seed, "dequant_sample", step, row)``: a function of the sample's place
    in the global batch, not of the rank that holds it (data.streams)."""
    us, gs = [], []
    for row in rows:
        gen = seeds.generator(seed, "dequant_sample", step, row)
        us.append(torch.rand(shape, generator=gen))
        if noise_std:
            gs.append(torch.randn(shape, generator=gen))
    return torch.stack(us), (torch.stack(gs) if gs else None)


def training_loss(cfg, device: torch.device | str, dtype: torch.dtype):
    """``loss_fn(model, x_uint8, y, u=None, g=None) -> (loss, extra)`` for
    :func:`flowscale.engine.train_step`: the :func:`objective` of ``cfg`` (training noise from
    each rank's global RNG, or the per-sample draws ``u``/``g`` of :func:`sample_noise` with
    data.streams; labels used only by class-conditional models), reporting bits/dim and the
    mean log-det per dimension."""

    def loss_fn(model, x, y, u=None, g=None):
        out = objective(model, x, cfg.data.n_bits, y if cfg.model.num_classes > 0 else None, device=device,
                        dtype=dtype, invconv_l2=cfg.optim.invconv_l2, noise_std=cfg.data.noise_std,
                        noise=None if u is None else (u, g))
        return out.loss, {"bpd": out.bpd.detach().float().mean(),
                          "logdet_per_dim": out.logdet.detach().float().mean() / x[0].numel()}

    return loss_fn


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
