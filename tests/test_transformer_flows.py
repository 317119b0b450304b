"""Transformer flows (issue 17): the ViT coupling network, Jet's spatial couplings, TarFlow blocks
and the jet / tarflow presets on the one invertible contract -- round trip, log-det equal to
the float64 brute-force Jacobian's, weights perturbed off the identity -- plus TarFlow's
causal structure and KV-cached inverse, inverse-recompute gradients for jet, the config
rules, and short demo trainings (one under DeepSpeed ZeRO-2) that lower bits/dim."""

import copy
import math

import pytest
import torch

from flowscale.config import ConfigError, ModelConfig, load_config
from flowscale.flows.couplings import Coupling
from flowscale.flows.jet import SpatialCoupling
from flowscale.flows.models import build_flow
from flowscale.flows.tarflow import TarFlowBlock
from flowscale.flows.vit import ViTNet, vit_net
from flowscale.inverse_checkpoint import InvertibleSequence, inverse_checkpoint
from flowscale.loss import objective
from flowscale.sample import denoise

from helpers import (assert_jacobian, assert_same_loss_and_gradients, brute_force_logdet, flat_model, jacobian,
                     loss_and_grads, perturb_, randn, round_trip, worst_relative_difference)

B, C, H, W = 1, 2, 4, 4  # 32 dimensions: brute-force Jacobians stay cheap on a loaded CPU

# float64 layers (brute-force Jacobians), and one intra-op thread: these models are tiny, and on
# a loaded 2-core machine two OpenMP threads make each small op ~100x slower.
pytestmark = pytest.mark.usefixtures("float64_default", "one_thread")


def tiny_vit(patch=1):
    return vit_net(width=8, depth=1, heads=2, patch=patch)


LAYERS = {
    "vit_coupling_channel": lambda: Coupling(C, tiny_vit(), mask="channel", scale_fn="sigmoid2"),
    "vit_coupling_checkerboard": lambda: Coupling(C, tiny_vit(), mask="checkerboard", parity=1, scale_fn="exp_clamp"),
    "vit_coupling_patch2": lambda: Coupling(C, tiny_vit(patch=2), mask="channel", scale_fn="sigmoid2"),
    "tarflow_block": lambda: TarFlowBlock(C, H * W, width=8, depth=2, heads=2),
    "tarflow_block_reversed": lambda: TarFlowBlock(C, H * W, width=8, depth=1, heads=2, reverse=True),
}
for pattern, parity in (("checkerboard", 0), ("checkerboard", 1), ("vstripes", 1), ("hstripes", 0)):
    LAYERS[f"jet_spatial_{pattern}_p{parity}"] = (lambda pattern=pattern, parity=parity:
                                                 SpatialCoupling(C, tiny_vit(), pattern, parity))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_contract(name):
    layer = perturb_(LAYERS[name]().double(), 0.5, seed=1)
    x = randn((B, C, H, W))
    round_trip(layer, x)
    ld = assert_jacobian(layer, x)
    assert ld.abs().min() > 1e-2, "perturbed layer should change volume; the test would not detect a wrong log-det"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_starts_as_identity(name):
    layer = LAYERS[name]().double()  # zero-initialised output layers: the identity
    x = randn((2, C, H, W))
    z, ld = layer(x)
    assert torch.equal(z, x) and torch.equal(ld, torch.zeros(2))


def test_jet_scale_keeps_small_log_scales_in_bf16():
    # s = 2 sigmoid(raw) is 1 at raw = 0, where log 2 + logsigmoid(raw) cancels: in bf16 it would be 0.
    layer = Coupling(C, tiny_vit(), mask="channel", scale_fn="sigmoid2")
    raw = torch.full((4,), 1e-3, dtype=torch.bfloat16)
    log_s = layer._log_scale(raw)
    assert log_s.dtype == torch.bfloat16 and torch.allclose(log_s.double(), torch.full((4,), 5e-4, dtype=torch.float64),
                                                            rtol=1e-2, atol=0)


def test_vit_net_shapes_and_patch_check():
    net = ViTNet(3, 10, width=8, depth=1, heads=2, patch=2)
    assert net(torch.randn(2, 3, 6, 4)).shape == (2, 10, 6, 4)
    with pytest.raises(ValueError, match="patch size 2"):
        net(torch.randn(1, 3, 5, 4))


def test_spatial_halves_are_the_patterns():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    kept = {p: SpatialCoupling(1, tiny_vit(), p, 0)._split(x)[0].flatten().tolist()
            for p in ("checkerboard", "vstripes", "hstripes")}
    assert kept["checkerboard"] == [0, 2, 5, 7, 8, 10, 13, 15]
    assert kept["vstripes"] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert kept["hstripes"] == [0, 1, 2, 3, 8, 9, 10, 11]


# -- TarFlow: causal structure and the cached inverse -----------------------------------------

def token_jacobian(block, x):
    """The Jacobian of one sample as [N, D, N, D] in the block's token order."""
    jac = jacobian(lambda v: block._to_tokens(block(v)[0]), x)  # rows (token, d), columns (d, h, w)
    n, d = block.tokens, block.channels
    jac = jac.reshape(n, d, d, n).permute(0, 1, 3, 2)  # -> [N_out, D_out, N_in, D_in], inputs row-major
    return jac.flip(2) if block.reverse else jac  # inputs in the block's order too


@pytest.mark.parametrize("reverse", [False, True])
def test_tarflow_jacobian_is_triangular_in_token_order(reverse):
    block = perturb_(TarFlowBlock(C, H * W, width=8, depth=2, heads=2, reverse=reverse).double(), 0.5, seed=2)
    x = randn((1, C, H, W), seed=3)
    jac = token_jacobian(block, x)
    n = block.tokens
    above = torch.stack([jac[i, :, j] for i in range(n) for j in range(i + 1, n)])
    below = torch.stack([jac[i, :, j] for i in range(n) for j in range(i)])
    assert above.abs().max() == 0, "a token's output depends on a later token: the attention is not causal"
    assert below.abs().max() > 1e-2, "outputs must depend on earlier tokens (else the check is vacuous)"
    diag = torch.stack([jac[i, :, i] for i in range(n)])  # [N, D, D]: diagonal (z_i depends on x_i alone)
    assert (diag - torch.diag_embed(torch.diagonal(diag, dim1=1, dim2=2))).abs().max() == 0
    _, ld = block(x)
    assert abs(torch.diagonal(diag, dim1=1, dim2=2).abs().log().sum().item() - ld.item()) < 1e-10
    if reverse:  # the last token in row-major order comes first: it is left unchanged
        assert torch.equal(block(x)[0][..., -1, -1], x[..., -1, -1])


def test_a_one_token_tarflow_is_the_identity_and_refused():
    block = perturb_(TarFlowBlock(C, 1, width=8, depth=2, heads=2).double(), 0.5, seed=2)
    x = randn((3, C, 1, 1), seed=3)
    z, ld = block(x)
    assert torch.equal(z, x) and torch.equal(ld, torch.zeros(3, dtype=ld.dtype)), "nothing to condition on"
    two = perturb_(TarFlowBlock(C, 2, width=8, depth=2, heads=2).double(), 0.5, seed=2)
    x2 = randn((3, C, 1, 2), seed=3)
    assert not torch.equal(two(x2)[0], x2), "with two tokens the second is transformed (the check is not vacuous)"
    ok = ["model.preset=tarflow", "model.width=8", "model.vit_heads=2", "data.image_size=8"]
    assert load_config(None, [*ok, "model.patch_size=4"]).model.patch_size == 4  # 2x2 tokens
    with pytest.raises(ConfigError, match=r"'model.patch_size': tarflow needs at least 2x2 patch tokens.*"
                                          r"patch_size <= 4"):
        load_config(None, [*ok, "model.patch_size=8"])
    assert load_config(None, [*ok, "model.preset=jet", "model.patch_size=8"]).model.patch_size == 8  # jet: channels


@pytest.mark.parametrize("reverse", [False, True])
def test_tarflow_cached_inverse_equals_uncached(reverse):
    block = perturb_(TarFlowBlock(4, 16, width=8, depth=2, heads=2, reverse=reverse).double(), 0.5, seed=4)
    z = randn((3, 4, 4, 4), seed=5)
    x_cached, ld_cached = block(z, reverse=True)
    block.kv_cache = False
    x_plain, ld_plain = block(z, reverse=True)
    assert (x_cached - x_plain).abs().max() < 1e-12 and (ld_cached - ld_plain).abs().max() < 1e-12
    assert (x_cached - z).abs().max() > 1e-2, "the inverse must not be the identity here"
    z_back, ld_fwd = block(x_plain)
    assert (z_back - z).abs().max() < 1e-10 and (ld_fwd + ld_plain).abs().max() < 1e-10


# -- the presets --------------------------------------------------------------------------------

PRESETS = {  # tiny models; with patch 2 a 4x4 RGB image is a 2x2 grid of 12-feature tokens
    "jet": dict(preset="jet", steps=4, width=8, vit_depth=1, vit_heads=2, patch_size=2, jet_spatial_every=2),
    "tarflow": dict(preset="tarflow", steps=2, width=8, vit_depth=1, vit_heads=2, patch_size=2),
    "glow_vit": dict(preset="glow", levels=2, steps=1, width=8, vit_depth=1, vit_heads=2, net="vit"),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_whole_model_contract(name):
    flow = perturb_(build_flow(ModelConfig(**PRESETS[name]), 3, 4).double(), 0.5, seed=5)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(6)) - 0.5
    eps, ld = flow(x)
    assert [tuple(e.shape[1:]) for e in eps] == flow.latent_shapes(3, 4)
    x_back, ld_inv = flow(eps, reverse=True)
    assert (x - x_back).abs().max() < 1e-9 and (ld + ld_inv).abs().max() < 1e-9
    assert (brute_force_logdet(lambda v: flat_model(flow, v), x) - ld).abs().max() < 1e-8
    assert ld.abs().min() > 1e-1


def test_jet_preset_layout():
    flow = build_flow(ModelConfig(**{**PRESETS["jet"], "steps": 6}), 3, 8)
    assert len(flow.levels) == 1 and flow.levels[0].squeeze.factor == 2 and flow.top_prior is None
    kinds = [type(step[-1]).__name__ + (f"/{step[-1].mask}{step[-1].parity}" if isinstance(step[-1], SpatialCoupling)
                                        else "") for step in flow.levels[0].steps]
    assert kinds == ["Coupling", "SpatialCoupling/checkerboard0", "Coupling", "SpatialCoupling/checkerboard1",
                     "Coupling", "SpatialCoupling/vstripes0"]
    assert all(step[-1].scale_fn == "sigmoid2" for step in flow.levels[0].steps)
    assert isinstance(flow.levels[0].steps[0][-1].net, ViTNet)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_jet_inverse_recompute_gradients_equal_plain_autograd(dtype, tol):
    plain = build_flow(ModelConfig(**{**PRESETS["jet"], "steps": 6, "width": 16}), 3, 8).to(dtype)
    perturb_(plain, 0.3, seed=1)
    wrapped = inverse_checkpoint(copy.deepcopy(plain))
    assert isinstance(wrapped.levels[0].steps, InvertibleSequence)
    x = torch.rand(4, 3, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(2)) - 0.5
    with torch.no_grad():  # far from the identity: every coupling moves its input
        h, _ = plain.levels[0].squeeze(x)
        for step in plain.levels[0].steps:
            out, _ = step(h)
            assert ((out - h).norm() / h.norm()).item() > 0.01
            h = out
    assert_same_loss_and_gradients(plain, wrapped, x, tol)


# -- Gaussian noise augmentation and the denoising step ----------------------------------------------

def test_denoise_step_is_tweedie_and_leaves_parameters_alone():
    # Zero-initialised blocks: the model is N(0, I), whose score is -x, so x + s^2 * score = (1 - s^2) x.
    for preset in ("tarflow", "jet"):
        flow = inverse_checkpoint(build_flow(ModelConfig(**PRESETS[preset]), 3, 4).double())
        x = torch.randn(2, 3, 4, 4)
        assert torch.allclose(denoise(flow, x, 0.1), 0.99 * x, rtol=0, atol=1e-12)
        assert all(p.grad is None for p in flow.parameters()), "the score must not leave parameter gradients"
    flow = perturb_(build_flow(ModelConfig(**PRESETS["tarflow"]), 3, 4).double(), 0.5, seed=3)
    x = torch.randn(2, 3, 4, 4)
    assert (denoise(flow, x, 0.1) - 0.99 * x).abs().max() > 1e-3, "a trained model's score is not -x"


def test_noise_augmentation_adds_gaussian_noise_to_the_dequantised_input():
    # Identity model with an N(0, I) prior: bpd = (sum x^2 / 2 + D log sqrt(2 pi)) / (D ln 2) + n_bits, so
    # N(0, s^2) noise on top of u raises it by about s^2 / (2 ln 2).
    flow = build_flow(ModelConfig(**PRESETS["jet"]), 3, 4).float()
    images = torch.randint(0, 256, (256, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = objective(flow, images, 8, noise=torch.Generator().manual_seed(1)).bpd.mean().item()
    noisy = objective(flow, images, 8, noise=torch.Generator().manual_seed(1), noise_std=0.5).bpd.mean().item()
    expected = 0.25 / (2 * math.log(2))
    assert abs((noisy - plain) - expected) < 0.1 * expected, (noisy - plain, expected)


def test_tarflow_checkpointed_blocks_keep_gradients_and_save_memory():
    from flowscale.inverse_checkpoint import saved_activation_bytes
    from flowscale.build import build_model
    from flowscale.inverse_checkpoint import CheckpointedSequence

    cfg = load_config(None, ["model.preset=tarflow", "model.steps=3", "model.width=16", "model.vit_depth=2",
                             "model.vit_heads=2", "model.patch_size=2", "data.image_size=8",
                             "memory.checkpoint_steps=true"])
    wrapped = build_model(cfg).double()
    assert isinstance(wrapped.levels[0].steps, CheckpointedSequence)
    perturb_(wrapped, 0.3, seed=1)
    plain = build_flow(cfg.model, 3, 8).double()
    plain.load_state_dict(wrapped.state_dict())
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)) - 0.5
    la, gxa, ga = loss_and_grads(plain, x)
    lb, gxb, gb = loss_and_grads(wrapped, x)
    assert abs(la - lb) <= 1e-12 * abs(la) and worst_relative_difference(ga, gb) < 1e-12
    saved = {}
    for name, flow in (("plain", plain), ("checkpointed", wrapped)):
        n, out = saved_activation_bytes(lambda: objective(flow, (x * 255 + 128).to(torch.uint8), 8,
                                                          dtype=torch.float64).loss,
                                        exclude=list(flow.parameters()))
        out.backward()
        saved[name] = n
    assert saved["checkpointed"] * 3 < saved["plain"], saved


# -- config rules ----------------------------------------------------------------------------------

def test_config_rules():
    with pytest.raises(ConfigError, match="memory.inverse_recompute"):
        load_config(None, ["model.preset=tarflow", "memory.inverse_recompute=true"])
    with pytest.raises(ConfigError, match="model.net"):
        load_config(None, ["model.preset=tarflow", "model.net=conv"])
    with pytest.raises(ConfigError, match="model.patch_size"):
        load_config(None, ["model.preset=jet", "model.patch_size=5"])
    with pytest.raises(ConfigError, match="model.patch_size"):  # 32/16 = 2 is even, 32/32 = 1 is not
        load_config(None, ["model.preset=jet", "model.patch_size=32", "model.steps=5"])
    with pytest.raises(ConfigError, match="model.vit_heads"):
        load_config(None, ["model.preset=jet", "model.width=12", "model.vit_heads=5"])
    cfg = load_config(None, ["model.preset=jet", "memory.inverse_recompute=true"])
    assert cfg.model.levels == 1  # one level over patches, whatever the default says
    assert load_config(None, ["model.preset=tarflow"]).model.levels == 1
    with pytest.raises(ConfigError, match="memory.checkpoint_steps"):
        load_config(None, ["memory.checkpoint_steps=true", "memory.inverse_recompute=true"])
    with pytest.raises(ConfigError, match="data.noise_std"):
        load_config(None, ["data.noise_std=-0.1"])


# -- training -------------------------------------------------------------------------------------

TRAIN = ["data.train_size=1024", "data.test_size=128", "data.batch_size=16", "train.init_batch_size=16",
         "train.progress=false", "wandb.mode=disabled", "model.width=32", "model.vit_depth=1", "model.vit_heads=2",
         "model.patch_size=4", "optim.lr=2e-3", "optim.warmup_steps=5", "train.eval_every=0", "train.sample_every=0",
         "engine.threads=1"]


def train_bpd(run_dir, *overrides):
    from flowscale.logging import read_metrics
    from flowscale.train import main as train_main

    torch.set_default_dtype(torch.float32)
    cfg = load_config(None, TRAIN + [f"train.run_dir={run_dir}", *overrides])
    result = train_main(cfg)
    return [r["bpd"] for r in read_metrics(run_dir) if "bpd" in r], result


@pytest.mark.usefixtures("single_process_env")
@pytest.mark.parametrize("preset, extra", [
    ("jet", ["model.steps=4", "model.jet_spatial_every=2"]),
    ("tarflow", ["model.steps=2", "train.temperatures=[1.0]", "data.noise_std=0.025"]),  # + denoised samples
])
def test_short_demo_training_lowers_bits_per_dim(tmp_path, preset, extra):
    steps = 80
    bpd, result = train_bpd(tmp_path / "run", f"model.preset={preset}", f"train.steps={steps}", "train.log_every=10",
                            f"train.checkpoint_every={steps}", *extra)
    assert len(bpd) == steps // 10
    first, last = sum(bpd[:2]) / 2, sum(bpd[-2:]) / 2
    assert last < first - 1.0, f"bits/dim did not fall: {bpd}"
    assert result["test_bpd"] < first - 1.0
    assert (tmp_path / "run" / "samples").is_dir(), "the final sample grid decodes through the inverse"


@pytest.mark.usefixtures("single_process_env")
@pytest.mark.parametrize("preset, stage, extra", [
    ("jet", 2, ["model.jet_spatial_every=2"]),
    ("jet", 1, ["model.jet_spatial_every=2", "memory.inverse_recompute=true"]),  # (ZeRO-2/3 + recompute: see README)
    ("tarflow", 3, ["train.sample_every=3", "train.temperatures=[1.0]"]),  # + KV-cached decode, parameters sharded
])
def test_steps_under_deepspeed_zero(tmp_path, preset, stage, extra):
    bpd, result = train_bpd(tmp_path / "run", f"model.preset={preset}", "model.steps=2", f"engine.zero_stage={stage}",
                            "train.steps=3", "train.log_every=1", "train.checkpoint_every=3", *extra)
    assert len(bpd) == 3 and all(torch.isfinite(torch.tensor(bpd)))
    assert bpd[-1] < bpd[0], bpd
    assert result["test_bpd"] < 10


def test_bench_converge_matches_transformer_widths():
    from dataclasses import replace

    from flowscale.tools.bench.converge import count_params, match_width

    target = count_params(ModelConfig(preset="glow", levels=2, steps=2, width=16), 3, 8)
    for preset in ("jet", "tarflow"):
        m = ModelConfig(preset=preset, steps=2, width=16, vit_depth=1, vit_heads=2, patch_size=2)
        w = match_width(m, target, 3, 8)
        assert w % 4 == 0, w  # divisible by the heads and by 4 (sin-cos positions): a buildable width
        miss = {k: abs(count_params(replace(m, width=k), 3, 8) - target) for k in (w - 4, w, w + 4) if k >= 4}
        assert miss[w] == min(miss.values()), (preset, miss)


@pytest.mark.usefixtures("single_process_env")
def test_tarflow_with_noise_resumes_exactly(tmp_path):
    # Everything that affects the future comes back: weights, optimizer, schedule, data position,
    # and the RNG that draws the dequantisation and the Gaussian augmentation noise.
    from safetensors.torch import load_file

    from flowscale.checkpoint import list_complete

    common = ["model.preset=tarflow", "model.steps=2", "data.noise_std=0.025", "train.log_every=1",
              "train.checkpoint_every=3", "train.temperatures=[1.0]"]
    a, _ = train_bpd(tmp_path / "a", "train.steps=6", *common)
    train_bpd(tmp_path / "b", "train.steps=3", *common)
    b, _ = train_bpd(tmp_path / "b", "train.steps=6", *common)
    assert a == b and len(a) == 6
    wa, wb = (load_file(str(list_complete(tmp_path / r)[-1] / "model.safetensors")) for r in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
