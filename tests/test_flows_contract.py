"""The invertible contract, checked for every layer and for whole models of each preset:
round trip, logdet(forward) == -logdet(inverse), and the log-det equal to log|det J| of the
float64 brute-force Jacobian. Weights are perturbed away from their identity initialisation
so that every check can fail."""

import pytest
import torch

from flowscale.flows.actnorm import ActNorm, initialize_actnorm
from flowscale.flows.base import FlowSequence
from flowscale.flows.couplings import Coupling
from flowscale.flows.multiscale import Squeeze
from flowscale.flows.nets import glow_net
from flowscale.flows.permutations import InvConv1x1, InvConv1x1LU, ReversePermutation, ShufflePermutation
from flowscale.flows.priors import SplitPrior, TopPrior, standard_normal_logprob

from helpers import assert_jacobian, brute_force_logdet, flat_model, perturb_, randn, round_trip, small_flow

pytestmark = pytest.mark.usefixtures("float64_default")  # layers built here are float64 (brute-force Jacobians)

B, C, H, W = 3, 4, 4, 4


def data(shape=(B, C, H, W), seed=0):
    return randn(shape, seed)


LAYERS = {
    "actnorm": lambda: ActNorm(C),
    "reverse": lambda: ReversePermutation(C),
    "shuffle": lambda: ShufflePermutation(C, seed=3),
    "invconv": lambda: InvConv1x1(C, seed=1),
    "invconv_lu": lambda: InvConv1x1LU(C, seed=2),
    "invconv_lu_bounded": lambda: InvConv1x1LU(C, seed=2, max_log_s=1.0),
    "squeeze": lambda: Squeeze(),
}
for kind in ("additive", "affine"):
    for mask in ("channel", "checkerboard"):
        for parity in (0, 1):
            for scale_fn in (("sigmoid", "tanh", "exp_clamp") if kind == "affine" else ("sigmoid",)):
                name = f"coupling_{kind}_{mask}_p{parity}" + (f"_{scale_fn}" if kind == "affine" else "")
                LAYERS[name] = (lambda kind=kind, mask=mask, parity=parity, scale_fn=scale_fn:
                                Coupling(C, glow_net(6), kind=kind, mask=mask, parity=parity, scale_fn=scale_fn))
LAYERS["sequence"] = lambda: FlowSequence([ActNorm(C), InvConv1x1(C), Coupling(C, glow_net(6))])


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_contract(name):
    layer = LAYERS[name]().double()
    x = data()
    initialize_actnorm(layer, x)
    perturb_(layer, 0.3, seed=1)
    round_trip(layer, x)
    ld = assert_jacobian(layer, x)
    if name not in ("reverse", "shuffle", "squeeze") and not name.startswith("coupling_additive"):
        assert ld.abs().max() > 1e-3, "perturbed layer should change volume; the test would not detect a wrong log-det"


def test_coupling_log_det_is_not_constant_across_samples():
    # An affine coupling's log-det depends on x; a layer that returned a per-batch constant would fail here.
    layer = perturb_(Coupling(C, glow_net(6), kind="affine").double(), 0.5, seed=4)
    _, ld = layer(data())
    # A per-batch constant in float64 varies by ~1e-15 at most; a data-dependent log-det by far more.
    assert ld.std() > 1e-6


@pytest.mark.parametrize("learned", [True, False])
def test_split_prior_contract(learned):
    if learned:  # Glow's split2d: eps = (z2 - mu(z1)) / sigma(z1), a flow of its own
        prior = SplitPrior(cond_channels=C, channels=C).double()
        perturb_(prior, 0.5, seed=2)
        z2, z1 = data(seed=1), data(seed=2)
        round_trip(prior, z2, cond=z1)
        ld = assert_jacobian(prior, z2, cond=z1)
        assert ld.abs().max() > 1e-2
        return
    # RealNVP's fixed N(0, I) on the factored-out half: no prior layer, eps is z2 itself, and the
    # whole model's log-det is still exact.
    flow = small_flow("glow", levels=2, steps=1, width=6, size=4, scale=0.2, seed=8, split_prior="fixed")
    assert flow.levels[0].prior is None
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(9)) - 0.5
    eps, ld = flow(x)
    x_back, ld_inv = flow(eps, reverse=True)
    assert (x - x_back).abs().max() < 1e-9 and (ld + ld_inv).abs().max() < 1e-9
    for i in range(2):
        assert abs(brute_force_logdet(lambda v: flat_model(flow, v), x[i:i + 1]).item() - ld[i].item()) < 1e-8
    learned = small_flow("glow", levels=2, steps=1, width=6, size=4, scale=0.2, seed=8, split_prior="learned")
    assert not torch.allclose(learned(x)[1], ld), "the learned prior's log-det must differ from the fixed one"


@pytest.mark.parametrize("num_classes", [0, 5])
def test_top_prior_contract(num_classes):
    prior = perturb_(TopPrior(C, learn=True, num_classes=num_classes).double(), 0.5, seed=3)
    y = torch.tensor([0, 3, 4]) if num_classes else None
    round_trip(prior, data(), cond=y)
    assert_jacobian(prior, data(), cond=y)


def test_class_conditional_prior_needs_labels():
    prior = TopPrior(C, num_classes=3).double()
    with pytest.raises(ValueError, match="num_classes"):
        prior(data())


def test_class_conditioning_changes_density():
    prior = perturb_(TopPrior(C, num_classes=3).double(), 0.5, seed=3)
    x = data()
    ld0 = prior(x, cond=torch.zeros(B, dtype=torch.long))[1]
    ld1 = prior(x, cond=torch.ones(B, dtype=torch.long))[1]
    assert (ld0 - ld1).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["nice", "realnvp", "glow"])
def test_whole_model_contract(preset):
    flow = small_flow(preset, levels=2, steps=2, width=6, channels=3, size=4, scale=0.2, seed=5)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(6)) - 0.5
    eps, ld = flow(x)
    assert sum(e[0].numel() for e in eps) == x[0].numel()
    x_back, ld_inv = flow(eps, reverse=True)
    assert (x - x_back).abs().max() < 1e-9
    assert (ld + ld_inv).abs().max() < 1e-9
    for i in range(2):
        bf = brute_force_logdet(lambda v: flat_model(flow, v), x[i:i + 1])
        assert abs(bf.item() - ld[i].item()) < 1e-8
    assert ld.abs().max() > 1e-2


@pytest.mark.parametrize("preset", ["nice", "realnvp", "glow"])
@pytest.mark.parametrize("permutation", [None, "invconv_lu", "shuffle"])
def test_presets_round_trip_deeper(preset, permutation):
    flow = small_flow(preset, levels=3, steps=3, width=8, size=16, scale=0.15, seed=7, permutation=permutation)
    x = torch.rand(2, 3, 16, 16) - 0.5
    eps, ld = flow(x)
    x_back, ld_inv = flow(eps, reverse=True)
    assert (x - x_back).abs().max() < 1e-9 and (ld + ld_inv).abs().max() < 1e-8
    assert [tuple(e.shape[1:]) for e in eps] == flow.latent_shapes(3, 16)
    assert torch.isfinite(standard_normal_logprob(eps[-1])).all()


def test_class_conditional_model():
    flow = small_flow("glow", levels=2, steps=1, width=6, size=4, scale=0.2, num_classes=4)
    x = torch.rand(2, 3, 4, 4) - 0.5
    y = torch.tensor([1, 3])
    eps, ld = flow(x, cond=y)
    x_back, ld_inv = flow(eps, cond=y, reverse=True)
    assert (x - x_back).abs().max() < 1e-9 and (ld + ld_inv).abs().max() < 1e-9


def test_float32_and_bf16_logdets_stay_wide():
    layer = InvConv1x1LU(C).float()
    _, ld = layer(data().float())
    assert ld.dtype == torch.float32
    layer_bf = InvConv1x1(C)
    z, ld = layer_bf(data().to(torch.bfloat16).float().to(torch.bfloat16))
    assert z.dtype == torch.bfloat16 and ld.dtype == torch.float32
    x_back, _ = layer_bf(z, reverse=True)
    assert x_back.dtype == torch.bfloat16


def test_parameters_are_contiguous():
    flow = small_flow("glow", permutation="invconv", scale=0.0)
    assert all(p.is_contiguous() for p in flow.parameters())
    flow = small_flow("glow", permutation="invconv_lu", scale=0.0)
    assert all(p.is_contiguous() for p in flow.parameters())


def test_squeeze_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        Squeeze()(torch.zeros(1, 3, 5, 4))


def test_channels_last_levels_compute_the_same_and_save_the_same():
    """On the CPU, convolutional levels on 16x16 grids and more run channels-last (Level.layout):
    a memory layout only, so bits/dim, gradients and the bytes saved for backward are those of
    the NCHW run."""
    import copy

    from flowscale.inverse_checkpoint import saved_activation_bytes
    from flowscale.loss import flow_bpd_dequantized

    flow = small_flow("glow", levels=3, steps=2, width=8, size=32, dtype=torch.float32)
    nchw = copy.deepcopy(flow)
    for level in nchw.levels:
        level.channels_last = False
    x = torch.rand(2, 3, 32, 32, dtype=torch.float32) - 0.5
    h = flow.levels[0].layout(flow.levels[0].squeeze(x)[0])  # 12 x 16 x 16
    assert h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    small = flow.levels[1].layout(torch.rand(2, 6, 16, 16).contiguous(memory_format=torch.channels_last)[:, :, ::2, ::2])
    assert small.is_contiguous()  # 8 x 8: NCHW again
    results = []
    for model in (flow, nchw):
        model.zero_grad(set_to_none=True)
        nbytes, loss = saved_activation_bytes(lambda: flow_bpd_dequantized(model, x, 8)[0].sum(),
                                              exclude=list(model.parameters()))
        loss.backward()
        results.append((nbytes, loss.item(), [p.grad.clone() for p in model.parameters()]))
    (b1, l1, g1), (b2, l2, g2) = results
    assert b1 == b2 and abs(l1 - l2) <= 1e-6 * abs(l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- grayscale: every preset on 1-channel images ---------------------------------------------------

ONE_CHANNEL = {  # tiny models of each preset for a 1 x 8 x 8 image (D = 64)
    "nice": dict(levels=2, steps=2),
    "realnvp": dict(levels=2, steps=4),  # checkerboard then channel masks
    "glow": dict(levels=2, steps=2),
    "dlf": dict(levels=2, steps=2, dlt_beta_init=-0.5, invconv_bias=True),
    "jet": dict(levels=1, steps=4, vit_depth=1, vit_heads=2, patch_size=2, jet_spatial_every=2),
    "tarflow": dict(levels=1, steps=2, vit_depth=1, vit_heads=2, patch_size=2),
}


@pytest.mark.parametrize("preset", sorted(ONE_CHANNEL))
def test_one_channel_presets_contract(preset):
    """C = 1 (MNIST-like): the first squeeze makes 4 channels, splits halve them; round trip,
    logdet(forward) == -logdet(inverse), log-det == slogdet of the float64 brute-force Jacobian,
    and bits/dim divide by D = 1 * 8 * 8, the real dimensions."""
    from flowscale.loss import bits_per_dim, flow_bpd_dequantized

    flow = small_flow(preset, width=8, channels=1, size=8, scale=0.2, seed=5, **ONE_CHANNEL[preset])
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(6)) - 0.5
    eps, ld = flow(x)
    assert [tuple(e.shape[1:]) for e in eps] == flow.latent_shapes(1, 8)
    assert sum(e[0].numel() for e in eps) == 64
    x_back, ld_inv = flow(eps, reverse=True)
    assert (x - x_back).abs().max() < 1e-9 and (ld + ld_inv).abs().max() < 1e-9
    for i in range(2):
        bf = brute_force_logdet(lambda v: flat_model(flow, v), x[i:i + 1])
        assert abs(bf.item() - ld[i].item()) < 1e-8, f"sample {i}: brute force {bf.item()} vs {ld[i].item()}"
    assert ld.abs().min() > 1e-2, "the check must be able to fail"
    bpd, parts = flow_bpd_dequantized(flow, x, 8)
    assert torch.allclose(bpd, bits_per_dim(parts["log_pz"], parts["logdet"], 64, 8))
    assert not torch.allclose(bpd, bits_per_dim(parts["log_pz"], parts["logdet"], 3 * 64, 8))
