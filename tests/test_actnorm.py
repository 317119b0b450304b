"""ActNorm: explicit data-dependent init, never lazily in forward, and it survives a reload."""

import torch

from flowscale.config import ModelConfig
from flowscale.flows.actnorm import ActNorm, initialize_actnorm
from flowscale.flows.models import build_flow


def test_data_init_gives_zero_mean_unit_std():
    x = torch.randn(64, 5, 6, 6) * torch.tensor([0.1, 1, 3, 10, 0.5]).view(1, 5, 1, 1) + 7.0
    layer = ActNorm(5)
    assert initialize_actnorm(layer, x) == 1
    z, _ = layer(x)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(5), atol=1e-4)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(5), atol=1e-4)


def test_forward_never_initialises():
    layer = ActNorm(3)
    layer(torch.randn(8, 3, 4, 4) * 5)
    assert not bool(layer.initialized)
    assert torch.equal(layer.logs, torch.zeros_like(layer.logs))


def test_init_covers_every_actnorm_in_network_order():
    flow = build_flow(ModelConfig(preset="glow", levels=2, steps=2, width=8), 3, 8)
    n_actnorm = sum(isinstance(m, ActNorm) for m in flow.modules())
    assert initialize_actnorm(flow, torch.rand(16, 3, 8, 8) - 0.5) == n_actnorm
    # Second call: nothing left to initialise, parameters unchanged.
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    assert initialize_actnorm(flow, torch.rand(16, 3, 8, 8)) == 0
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())


def test_init_survives_save_and_load(tmp_path):
    cfg = ModelConfig(preset="glow", levels=2, steps=2, width=8)
    flow = build_flow(cfg, 3, 8)
    initialize_actnorm(flow, torch.rand(16, 3, 8, 8) - 0.5)
    torch.save(flow.state_dict(), tmp_path / "m.pt")
    fresh = build_flow(cfg, 3, 8)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    # A reloaded model is initialised: a new init pass must not touch it.
    assert initialize_actnorm(fresh, torch.rand(16, 3, 8, 8) * 9) == 0
    x = torch.rand(4, 3, 8, 8) - 0.5
    assert all(torch.equal(a, b) for a, b in zip(flow(x)[0], fresh(x)[0]))
