"""Bits/dim against closed forms, and the n-bit quantisation round trip."""

import math

import numpy as np
import pytest
import torch

from flowscale.data.quantize import dequantize, postprocess, preprocess, reduce_bits
from flowscale.flows.base import Flow, zeros_logdet
from flowscale.loss import bits_per_dim, flow_bpd_dequantized, objective


class IdentityFlow(Flow):
    """x -> [x] with log-det 0: the model is a standard normal on the dequantised pixels."""

    def _forward(self, x, cond):
        return [x], zeros_logdet(x)

    def _inverse(self, z, cond):
        return z[0], zeros_logdet(z[0])


class ScaleFlow(Flow):
    """z = a * x: density N(x; 0, 1/a^2), log-det D*log a."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def _forward(self, x, cond):
        return [self.a * x], torch.full((x.shape[0],), x[0].numel() * math.log(self.a), dtype=torch.float64)


def closed_form_bpd(x: np.ndarray, n_bits: int, sigma: float = 1.0) -> float:
    """-log2 of the density of N(0, sigma^2 I) at x times the bin volume, per dimension."""
    d = x.size
    log_density = sum(-0.5 * (v / sigma) ** 2 - 0.5 * math.log(2 * math.pi) - math.log(sigma) for v in x.ravel())
    return -(log_density - d * math.log(2 ** n_bits)) / (d * math.log(2))


@pytest.mark.parametrize("n_bits", [8, 5, 1])
def test_identity_flow_matches_closed_form(n_bits):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) - 0.5
    bpd, parts = flow_bpd_dequantized(IdentityFlow(), x, n_bits)
    for i in range(4):
        assert bpd[i].item() == pytest.approx(closed_form_bpd(x[i].numpy(), n_bits), rel=1e-12)


def test_scaled_gaussian_matches_closed_form():
    x = torch.rand(2, 3, 2, 2, dtype=torch.float64) - 0.5
    bpd, _ = flow_bpd_dequantized(ScaleFlow(4.0), x, 8)
    for i in range(2):
        assert bpd[i].item() == pytest.approx(closed_form_bpd(x[i].numpy(), 8, sigma=0.25), rel=1e-12)


def test_bits_per_dim_formula_pieces():
    # 100 dims, log p(z) + logdet = -100 nats, 8 bits: (100 + 100 log 256) / (100 log 2) = 1/log 2 + 8
    bpd = bits_per_dim(torch.tensor([-60.0]), torch.tensor([-40.0]), 100, 8)
    assert bpd.item() == pytest.approx(1 / math.log(2) + 8, rel=1e-6)


def test_uniform_model_is_n_bits():
    # A flow whose density on [-0.5, 0.5)^D is exactly 1 (log p = 0) costs exactly n_bits per dim.
    assert bits_per_dim(torch.zeros(1), torch.zeros(1), 10, 5).item() == pytest.approx(5.0)


def test_reduce_bits_and_dequantize_ranges():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    for n_bits in (1, 5, 8):
        xi = reduce_bits(x, n_bits)
        assert xi.min() == 0 and xi.max() == 2 ** n_bits - 1
        xd = dequantize(xi, n_bits, generator=torch.Generator().manual_seed(0))
        assert xd.min() >= -0.5 and xd.max() < 0.5
        # Each value stays in its own bin: the round trip to pixels recovers the reduced image.
        back = postprocess(xd, n_bits)
        assert torch.equal(reduce_bits(back, n_bits), xi)
    assert torch.equal(reduce_bits(torch.tensor([0, 7, 8, 255], dtype=torch.uint8), 5), torch.tensor([0.0, 0.0, 1.0, 31.0]))


def test_preprocess_rejects_float_pixels():
    with pytest.raises(TypeError, match="uint8"):
        preprocess(torch.zeros(1, 3, 2, 2), 8)


def test_objective_from_pixels_uses_the_same_definition():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    out = objective(IdentityFlow(), x, 5, noise=g1)
    b, parts = flow_bpd_dequantized(IdentityFlow(), preprocess(x, 5, generator=g2), 5)
    assert torch.equal(out.bpd, b) and torch.equal(out.logdet, parts["logdet"])
    assert out.loss.item() == pytest.approx(b.mean().item(), rel=1e-7)
    # Without a stream the noise comes from torch's global RNG, as in training.
    torch.manual_seed(3)
    c = objective(IdentityFlow(), x, 5).bpd
    torch.manual_seed(3)
    assert torch.equal(c, flow_bpd_dequantized(IdentityFlow(), preprocess(x, 5), 5)[0])


def test_objective_adds_the_invconv_penalty():
    from flowscale.config import ModelConfig
    from flowscale.flows.models import build_flow
    from flowscale.loss import flow_regularizer

    flow = build_flow(ModelConfig(preset="glow", levels=1, steps=1, width=4), 3, 4)
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    plain = objective(flow, x, 8, noise=torch.Generator().manual_seed(0))
    pen = objective(flow, x, 8, noise=torch.Generator().manual_seed(0), invconv_l2=0.5)
    assert torch.equal(plain.bpd, pen.bpd)
    expected = flow_regularizer(flow, 0.5).item()
    # float32 loss near 8 bits/dim: the difference is exact to its ulp (~1e-6), not relative to the penalty
    assert expected > 0.01 and pen.loss.item() - plain.loss.item() == pytest.approx(expected, abs=2e-6)
