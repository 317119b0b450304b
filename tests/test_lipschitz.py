"""Lipschitz-balance options: bounded spectral norms that keep the flow exactly invertible,
the bound on the LU log-diagonal, the 1x1-conv L2 penalty, and per-step log-det statistics."""

import pytest
import torch

from flowscale.config import ConfigError, ModelConfig, load_config
from flowscale.flows.actnorm import initialize_actnorm
from flowscale.flows.couplings import Coupling
from flowscale.flows.models import build_flow
from flowscale.flows.nets import glow_net
from flowscale.flows.permutations import InvConv1x1LU
from flowscale.flows.spectral import BoundedSpectralNorm, spectral_norm_
from flowscale.analysis.lipschitz import logdet_stats, step_logdets
from flowscale.loss import flow_regularizer, invconv_weights
from flowscale.loss import flow_bpd_dequantized

from helpers import brute_force_logdet, perturb_, small_flow


pytestmark = pytest.mark.usefixtures("one_thread")


def true_norm(w):
    return torch.linalg.matrix_norm(w.reshape(w.shape[0], -1).double(), ord=2).item()


def test_spectral_norm_bounds_large_weights_and_keeps_small_ones():
    conv = torch.nn.Conv2d(6, 16, 3).double()
    with torch.no_grad():
        conv.weight.mul_(40 / true_norm(conv.weight))
    small = torch.nn.Conv2d(6, 16, 3).double()
    with torch.no_grad():
        small.weight.mul_(0.5 / true_norm(small.weight))
    raw_small = small.weight.detach().clone()
    spectral_norm_(conv)
    spectral_norm_(small)
    assert 0.9 < true_norm(conv.weight) < 1.05  # power iteration from a fixed start: close to 1
    assert torch.equal(small.weight, raw_small)  # below the bound: untouched
    # Deterministic: no state changes between calls, in training mode too.
    conv.train()
    w1 = conv.weight.clone()
    conv(torch.randn(1, 6, 5, 5, dtype=torch.float64)).sum().backward()
    assert torch.equal(conv.weight, w1) and conv.parametrizations.weight.original.grad is not None


def test_spectral_norm_coupling_contract_in_training_mode():
    torch.manual_seed(0)
    layer = Coupling(4, glow_net(6, spectral_norm=True), kind="affine", scale_fn="tanh").double()
    perturb_(layer, 0.5, seed=1)
    layer.train()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    z, ld = layer(x)
    x_back, ld_inv = layer(z, reverse=True)
    assert (x - x_back).abs().max() < 1e-12 and (ld + ld_inv).abs().max() < 1e-12
    for i in range(2):
        bf = brute_force_logdet(lambda v: layer(v)[0], x[i:i + 1])
        assert abs(bf.item() - ld[i].item()) < 1e-9
    assert ld.abs().max() > 1e-2
    bsn = [m for m in layer.modules() if isinstance(m, BoundedSpectralNorm)]
    assert len(bsn) == 2 and not any(isinstance(m, torch.nn.Module) and type(m).__name__ == "ActNorm"
                                     for m in layer.net.modules())


@pytest.mark.parametrize("preset", ["glow", "dlf", "realnvp"])
def test_spectral_norm_switch_in_models(preset):
    cfg = ModelConfig(preset=preset, levels=2, steps=2, width=8, spectral_norm=True)
    flow = build_flow(cfg, 3, 8)
    n_sn = sum(isinstance(m, BoundedSpectralNorm) for m in flow.modules())
    assert n_sn == 2 * 2 * 2  # two hidden convs per network, two steps, two levels
    x = torch.rand(4, 3, 8, 8) - 0.5
    initialize_actnorm(flow, x)
    bpd, _ = flow_bpd_dequantized(flow, x, 8)
    bpd.mean().backward()
    assert all(p.grad is not None for p in flow.parameters() if p.requires_grad)
    # Switched off (the default), no layer is bounded, and the networks keep their ActNorms.
    off = build_flow(ModelConfig(preset=preset, levels=2, steps=2, width=8), 3, 8)
    assert not any(isinstance(m, BoundedSpectralNorm) for m in off.modules())
    assert sum(p.numel() for p in off.parameters()) != sum(p.numel() for p in flow.parameters())


def test_lu_log_diagonal_bound():
    layer = InvConv1x1LU(4, max_log_s=1.0).double()
    with torch.no_grad():
        layer.log_s.copy_(torch.tensor([10.0, -10.0, 0.5, 0.0]))
    _, ld = layer(torch.randn(1, 4, 2, 2, dtype=torch.float64))
    bounded = layer._bounded_log_s()
    assert bounded.abs().max() < 1.0 and ld.item() == pytest.approx(bounded.sum().item() * 4)
    with pytest.raises(ConfigError, match="lu_max_log_s"):
        load_config(None, ["model.lu_max_log_s=-1"])


@pytest.mark.parametrize("permutation", ["invconv", "invconv_lu"])
def test_invconv_l2_penalty(permutation):
    flow = small_flow("dlf", levels=2, steps=2, width=4, size=8, permutation=permutation, dtype=torch.float32)
    off = load_config(None, [])
    assert flow_regularizer(flow, off).item() == 0.0
    cfg = load_config(None, ["optim.invconv_l2=0.1"])
    ws = invconv_weights(flow)
    assert len(ws) == 4
    n = sum(w.numel() for w in ws)
    expected = 0.1 * sum((w.double() ** 2).sum() for w in ws) / (2 * n)
    reg = flow_regularizer(flow, cfg)
    assert reg.item() == pytest.approx(expected.item(), rel=1e-5)
    assert flow_regularizer(flow, cfg.optim).item() == reg.item()  # the OptimConfig works too
    reg.backward()
    grads = [p.grad for n_, p in flow.named_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    from flowscale.flows.permutations import InvConv1x1
    conv_params = {id(p) for m in flow.modules() if isinstance(m, (InvConv1x1, InvConv1x1LU)) for p in m.parameters()}
    assert {id(p) for p in flow.parameters() if p.grad is not None} <= conv_params  # only the 1x1 convs are penalised
    with pytest.raises(ConfigError, match="invconv_l2"):
        load_config(None, ["optim.invconv_l2=-1"])


def test_step_logdets_add_up_to_the_flow_logdet():
    # realnvp: fixed N(0, I) priors, so the flow's log-det is the steps' alone.
    flow = small_flow("realnvp", levels=2, steps=3, width=6, size=8, scale=0.3)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64) - 0.5
    _, logdet = flow(x)
    table = step_logdets(flow, x)
    dims = [3 * 4 * 4 * 4, (6 * 4) * 2 * 2]
    total = sum(v * d for per_step, d in zip(table, dims) for v in per_step)
    assert [len(t) for t in table] == [3, 3]
    assert total == pytest.approx(logdet.item(), abs=1e-9)
    stats = logdet_stats(flow, x)
    assert set(stats) == {f"logdet_step/level_{i}/{s}" for i in range(2) for s in ("mean", "min", "max")} | \
        {"logdet_step/max_abs"}
    assert stats["logdet_step/max_abs"] == pytest.approx(max(abs(v) for t in table for v in t))
    assert stats["logdet_step/level_0/min"] <= stats["logdet_step/level_0/mean"] <= stats["logdet_step/level_0/max"]


def test_invconv_l2_refused_under_zero3():
    with pytest.raises(ConfigError, match="invconv_l2"):
        load_config(None, ["optim.invconv_l2=0.1", "engine.zero_stage=3"])
