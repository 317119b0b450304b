"""Dynamic Linear Flow: the DLT layer under the invertible contract (round trip, log-det
antisymmetry, float64 brute-force Jacobian) for both decompositions and every split, the
K=2 / identity-first reduction to an affine coupling, the dlf preset and its configs."""

from pathlib import Path

import pytest
import torch

from flowscale.config import ModelConfig, load_config
from flowscale.flows.actnorm import initialize_actnorm
from flowscale.flows.base import FlowSequence
from flowscale.flows.couplings import Coupling
from flowscale.flows.dynamic_linear import DynamicLinearTransform, partition_sizes
from flowscale.flows.models import build_flow, resolve_preset
from flowscale.flows.nets import glow_net
from flowscale.flows.permutations import InvConv1x1, InvConv1x1LU

from helpers import assert_jacobian, brute_force_logdet, flat_model, perturb_, randn, round_trip, small_flow

ROOT = Path(__file__).resolve().parents[1]
B, C, H, W = 3, 8, 2, 2

pytestmark = pytest.mark.usefixtures("float64_default", "one_thread")


def data(shape=(B, C, H, W), seed=0):
    return randn(shape, seed)


def check_contract(layer, x, cond=None):
    """Round trip, logdet(forward) == -logdet(inverse), log-det == slogdet of the brute-force Jacobian."""
    z, _ = round_trip(layer, x, cond, tol=1e-10)
    ld = assert_jacobian(layer, x, cond)
    # The check can fail: the log-det is far from 0 and differs between samples.
    assert ld.abs().min() > 1e-2 and ld.std() > 1e-4
    return z, ld


def make_dlt(decomposition, split="equal", partitions=2, first="affine", num_classes=0, spectral_norm=False,
             channels=C, seed=1):
    torch.manual_seed(seed)
    layer = DynamicLinearTransform(channels, glow_net(6, out_bias=1.0, spectral_norm=spectral_norm), partitions,
                                   split, decomposition, first, num_classes, beta=-3.0, first_init=1.0).double()
    y = torch.arange(B) % num_classes if num_classes else None
    initialize_actnorm(layer, data(seed=seed + 10, shape=(B, channels, H, W)), cond=y)
    # beta = -3 contracts every partition by ~e^-2.2 at init; lift it so the perturbed layer
    # neither expands nor contracts much, and the brute-force Jacobian is well conditioned.
    with torch.no_grad():
        for m in layer.modules():
            if type(m).__name__ == "TanhScalar":
                m.beta.fill_(-0.5)
    return perturb_(layer, 0.3, seed=seed)


SPLITS = [("equal", 2), ("equal", 4), ("increasing", 4), ("decreasing", 4)]


@pytest.mark.parametrize("decomposition", ["parallel_train", "parallel_sample"])
@pytest.mark.parametrize("split,partitions", SPLITS, ids=[f"{s}{p}" for s, p in SPLITS])
@pytest.mark.parametrize("first", ["affine", "identity"])
def test_dlt_contract(decomposition, split, partitions, first):
    layer = make_dlt(decomposition, split, partitions, first)
    check_contract(layer, data())


@pytest.mark.parametrize("decomposition", ["parallel_train", "parallel_sample"])
def test_dlt_class_conditional_contract(decomposition):
    layer = make_dlt(decomposition, "increasing", 4, num_classes=3)
    y = torch.tensor([0, 2, 1])
    check_contract(layer, data(), cond=y)
    # The label changes the map (partition 1's projection and every g_k's).
    z0, ld0 = layer(data(), cond=torch.zeros(B, dtype=torch.long))
    z1, ld1 = layer(data(), cond=torch.ones(B, dtype=torch.long))
    assert (z0 - z1).abs().max() > 1e-3 and (ld0 - ld1).abs().max() > 1e-3
    with pytest.raises(ValueError, match="num_classes"):
        layer(data())


@pytest.mark.parametrize("decomposition", ["parallel_train", "parallel_sample"])
def test_dlt_spectral_norm_contract(decomposition):
    # The spectral-norm parametrization changes nothing between calls: forward and inverse
    # see the same network even in training mode.
    layer = make_dlt(decomposition, spectral_norm=True)
    layer.train()
    check_contract(layer, data())


def test_decompositions_differ_and_parallel_direction_is_one_pass():
    """parallel_train's forward reads only inputs; parallel_sample's inverse reads only its input."""
    a = make_dlt("parallel_train", "equal", 4)
    b = make_dlt("parallel_sample", "equal", 4)
    b.load_state_dict(a.state_dict())
    x = data()
    za, _ = a(x)
    zb, _ = b(x)
    assert (za - zb).abs().max() > 1e-3  # different maps with the same weights
    # parallel_train forward: y_k depends on x_{k-1} only through g_k, never on y_{k-1}:
    # changing x_1 leaves y_3 (which reads x_2) unchanged.
    x2 = x.clone()
    x2[:, :2] += 1.0
    assert torch.equal(a(x2)[0][:, 4:6], za[:, 4:6])
    # parallel_sample inverse: x_k reads y_{k-1}; changing y_1 leaves x_3 unchanged.
    y2 = zb.clone()
    y2[:, :2] += 1.0
    assert torch.equal(b(y2, reverse=True)[0][:, 4:6], b(zb, reverse=True)[0][:, 4:6])


@pytest.mark.parametrize("decomposition", ["parallel_train", "parallel_sample"])
def test_two_partitions_with_identity_first_is_an_affine_coupling(decomposition):
    torch.manual_seed(0)
    dlt = DynamicLinearTransform(C, glow_net(6), 2, "equal", decomposition, first="identity").double()
    initialize_actnorm(dlt, data(seed=3))
    perturb_(dlt, 0.3, seed=2)
    coupling = Coupling(C, glow_net(6), kind="affine", mask="channel", parity=0, scale_fn="tanh").double()
    g = dlt.g[0]
    with torch.no_grad():
        coupling.net.load_state_dict(g.net.state_dict())
        coupling.scale.alpha.fill_(g.scale.alpha.item())
        coupling.scale.beta.fill_(g.scale.beta.item())
    x = data(seed=4)
    z_dlt, ld_dlt = dlt(x)
    z_cpl, ld_cpl = coupling(x)
    assert torch.equal(z_dlt, z_cpl) and torch.equal(ld_dlt, ld_cpl)
    x_dlt, ldi_dlt = dlt(z_dlt, reverse=True)
    x_cpl, ldi_cpl = coupling(z_cpl, reverse=True)
    assert torch.equal(x_dlt, x_cpl) and torch.equal(ldi_dlt, ldi_cpl)
    assert ld_dlt.abs().max() > 1e-2  # not trivially the identity


def test_partition_sizes():
    assert partition_sizes(12, 2) == [6, 6]
    assert partition_sizes(48, 4, "increasing") == [6, 6, 12, 24]
    assert partition_sizes(48, 4, "decreasing") == [24, 12, 6, 6]
    assert partition_sizes(12, 4, "increasing") == [1, 2, 3, 6]  # floor/ceil of C/8, as the reference
    for args, msg in [((12, 5), "equal"), ((12, 2, "increasing"), "4 partitions"), ((4, 4, "increasing"), "too few"),
                      ((12, 1), "at least 2")]:
        with pytest.raises(ValueError, match=msg):
            partition_sizes(*args)


def test_initial_scale_matches_the_reference():
    """Reference init: g_k's last bias 1 -> shift 1, s = 1 * tanh(1) - 3 everywhere."""
    layer = DynamicLinearTransform(C, glow_net(6, out_bias=1.0), 2, beta=-3.0, first_init=1.0).double()
    initialize_actnorm(layer, data())
    x = data(seed=1)
    z, ld = layer(x)
    s = torch.tanh(torch.tensor(1.0)) - 3
    assert torch.allclose(z, (x + 1) * torch.exp(s), atol=1e-12)
    assert torch.allclose(ld, torch.full((B,), float(s) * C * H * W), atol=1e-9)


@pytest.mark.parametrize("cls", [InvConv1x1, InvConv1x1LU])
def test_invconv_bias_contract(cls):
    layer = perturb_(cls(C, seed=3, bias=True).double(), 0.3, seed=5)
    assert layer.bias.abs().max() > 0
    x = data()
    z, ld = layer(x)
    x_back, ld_inv = layer(z, reverse=True)
    assert (x - x_back).abs().max() < 1e-12 and (ld + ld_inv).abs().max() < 1e-12
    for i in range(B):
        bf = brute_force_logdet(lambda v: layer(v)[0], x[i:i + 1])
        assert abs(bf.item() - ld[i].item()) < 1e-9


@pytest.mark.parametrize("decomposition", ["parallel_train", "parallel_sample"])
def test_dlf_whole_model_contract(decomposition):
    flow = small_flow("dlf", levels=2, steps=2, width=6, channels=3, size=4, scale=0.2, seed=5,
                      dlt_decomposition=decomposition, invconv_bias=True, dlt_beta_init=-0.5)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(6)) - 0.5
    eps, ld = flow(x)
    x_back, ld_inv = flow(eps, reverse=True)
    assert (x - x_back).abs().max() < 1e-9 and (ld + ld_inv).abs().max() < 1e-9
    for i in range(2):
        bf = brute_force_logdet(lambda v: flat_model(flow, v), x[i:i + 1])
        assert abs(bf.item() - ld[i].item()) < 1e-8
    # A DLF step is exactly [1x1 conv, DLT]: no ActNorm.
    step = flow.levels[0].steps[0]
    assert isinstance(step, FlowSequence) and [type(s) for s in step] == [InvConv1x1, DynamicLinearTransform]


def test_dlf_class_conditional_model():
    flow = small_flow("dlf", levels=2, steps=1, width=6, size=4, scale=0.2, num_classes=4, dlt_partitions=4,
                      dlt_split="decreasing", dlt_beta_init=-0.5)
    x = torch.rand(2, 3, 4, 4) - 0.5
    y = torch.tensor([1, 3])
    eps, ld = flow(x, cond=y)
    x_back, ld_inv = flow(eps, cond=y, reverse=True)
    assert (x - x_back).abs().max() < 1e-9 and (ld + ld_inv).abs().max() < 1e-9


def test_dlf_preset_fills_choices():
    cfg = resolve_preset(ModelConfig(preset="dlf"))
    assert (cfg.coupling, cfg.permutation, cfg.actnorm, cfg.split_prior) == ("dynamic_linear", "invconv", False, "learned")
    flow = build_flow(ModelConfig(preset="dlf", levels=2, steps=2, width=4, permutation="invconv_lu",
                                  invconv_bias=True, dlt_partitions=4, dlt_split="increasing"), 3, 8)
    step = flow.levels[1].steps[1]
    assert isinstance(step[0], InvConv1x1LU) and step[0].bias is not None
    assert step[1].sizes == [3, 3, 6, 12]
    with pytest.raises(ValueError, match="1x1-conv bias"):
        build_flow(ModelConfig(preset="dlf", permutation="reverse", invconv_bias=True, levels=1, steps=1), 3, 8)


PAPER = {  # config file: (levels, steps, width, invconv bias, image size, dataset)
    "dlf_cifar10.yaml": (3, 32, 512, False, 32),
    "dlf_imagenet32.yaml": (3, 32, 512, False, 32),
    "dlf_imagenet64.yaml": (4, 32, 384, True, 64),
    "dlf_celebahq256.yaml": (6, 32, 128, False, 256),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs(name):
    cfg = load_config(ROOT / "configs" / name)
    levels, steps, width, bias, size = PAPER[name]
    m = cfg.model
    assert (m.preset, m.levels, m.steps, m.width, m.invconv_bias, cfg.data.image_size) == \
        ("dlf", levels, steps, width, bias, size)
    assert cfg.optim.name == "adamax" and cfg.optim.ema_decay > 0
    # The architecture builds (at a tiny width and depth, to stay fast).
    small = load_config(ROOT / "configs" / name, ["model.width=2", "model.steps=1"]).model
    flow = build_flow(small, cfg.data.channels, size)
    assert len(flow.levels) == levels


@pytest.mark.usefixtures("single_process_env")
def test_dlf_trains_through_the_trainer_and_logs_the_bound(tmp_path):
    from flowscale.logging import read_metrics
    from flowscale.train import main as train_main

    torch.set_default_dtype(torch.float32)
    cfg = load_config(None, ["model.preset=dlf", "model.levels=2", "model.steps=2", "model.width=16",
                             "model.dlt_partitions=4", "model.dlt_split=increasing", "model.invconv_bias=true",
                             "data.image_size=8", "data.train_size=512", "data.test_size=64", "data.batch_size=16",
                             f"data.cache_dir={tmp_path / 'cache'}", "train.init_batch_size=64", "train.steps=40",
                             "train.log_every=10", "train.eval_every=0", "train.sample_every=0",
                             "train.checkpoint_every=40", "train.bound_images=512", "train.progress=false",
                             "optim.name=adamax", "optim.lr=2e-3", "optim.warmup_steps=5", "optim.ema_decay=0.99",
                             "wandb.mode=disabled", f"train.run_dir={tmp_path / 'run'}"])
    result = train_main(cfg)
    records = read_metrics(cfg.train.run_dir)
    bound = [r for r in records if "train/linear_bound_bpd" in r]
    assert len(bound) == 1 and bound[0]["step"] == 0 and 0 < bound[0]["train/linear_bound_bpd"] < 8
    bpd = [r["train/bpd"] for r in records if "train/bpd" in r]
    assert len(bpd) == 4 and bpd[-1] < bpd[0] and torch.isfinite(torch.tensor(result["test_bpd"]))


@pytest.mark.parametrize("decomposition", ["parallel_train", "parallel_sample"])
def test_dlf_inverse_recompute_gradients_match_autograd(decomposition):
    from flowscale.inverse_checkpoint import inverse_checkpoint
    from flowscale.loss import flow_bpd_dequantized

    kw = dict(levels=2, steps=3, width=6, size=8, scale=0.2, seed=3, dlt_decomposition=decomposition,
              dlt_partitions=4, dlt_beta_init=-0.5)
    plain, recompute = small_flow("dlf", **kw), inverse_checkpoint(small_flow("dlf", **kw), enabled=True)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.5
    grads = []
    for flow in (plain, recompute):
        xi = x.clone().requires_grad_(True)
        flow_bpd_dequantized(flow, xi, 8)[0].mean().backward()
        grads.append([xi.grad] + [p.grad for p in flow.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
