"""Inverse recompute: gradients equal plain autograd, memory flat in depth, numerical health."""

import copy
import json
import math

import pytest
import torch

from flowscale.inverse_checkpoint import saved_activation_bytes
from flowscale.cli import main as cli_main
from flowscale.flows.actnorm import ActNorm
from flowscale.flows.base import FlowSequence, backprop_generic, watch
from flowscale.flows.couplings import Coupling
from flowscale.flows.jet import SpatialCoupling
from flowscale.flows.nets import glow_net
from flowscale.flows.permutations import InvConv1x1, InvConv1x1LU
from flowscale.inverse_checkpoint import InvertibleSequence, checkpoint_steps, inverse_checkpoint, plain_autograd
from flowscale.reconstruction import check_and_flag
from flowscale.loss import flow_bpd_dequantized
from helpers import assert_same_loss_and_gradients, loss_and_grads, perturb_, small_flow, worst_relative_difference


CASES = [  # (preset, overrides, perturbation scale): scales chosen so bits/dim stay finite but far from init
    ("glow", {}, 0.15),
    ("glow", {"permutation": "invconv_lu", "mask": "checkerboard"}, 0.08),
    ("realnvp", {}, 0.15),
    ("nice", {}, 0.15),
]


@pytest.mark.parametrize("preset, extra, scale", CASES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_gradients_equal_plain_autograd(preset, extra, scale, dtype, tol):
    # 3 levels x 8 steps, weights perturbed far from identity (see test_far_from_identity).
    plain = small_flow(preset, levels=3, steps=8, width=16, size=16, dtype=dtype, scale=scale, seed=1, **extra)
    wrapped = inverse_checkpoint(copy.deepcopy(plain))
    assert all(isinstance(level.steps, InvertibleSequence) for level in wrapped.levels)
    x = torch.rand(4, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(2)) - 0.5
    assert_same_loss_and_gradients(plain, wrapped, x, tol)


@pytest.mark.parametrize("preset, extra, scale", CASES)
def test_far_from_identity(preset, extra, scale):
    # Guard for the test above: every coupling of the perturbed models moves its input a lot.
    flow = small_flow(preset, levels=3, steps=8, width=16, size=16, scale=scale, seed=1, **extra)
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) - 0.5
    h, moved = x, []
    for level in flow.levels:
        h, _ = level.squeeze(h)
        for step in level.steps:
            for part in step:
                out, _ = part(h)
                if part is step[-1]:  # the coupling
                    moved.append(((out - h).norm() / h.norm()).item())
                h = out
        if level.split:
            h = h.chunk(2, dim=1)[0]
    assert len(moved) == 24 and min(moved) > 0.01, moved


LAYERS = {  # layers whose step of inverse recompute is written by hand (their own reconstruct_and_backprop)
    "actnorm": lambda: ActNorm(6),
    "invconv_bias": lambda: InvConv1x1(6, seed=1, bias=True),
    "invconv_lu_bias": lambda: InvConv1x1LU(6, seed=1, max_log_s=2.0, bias=True),
    "affine_channel": lambda: Coupling(6, glow_net(8)),
    "affine_checkerboard_tanh": lambda: Coupling(6, glow_net(8), mask="checkerboard", parity=1, scale_fn="tanh"),
    "additive_checkerboard": lambda: Coupling(6, glow_net(8), kind="additive", mask="checkerboard"),
    "additive_channel": lambda: Coupling(6, glow_net(8), kind="additive", parity=1),
    "spatial_vstripes": lambda: SpatialCoupling(6, glow_net(8), "vstripes", parity=1),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_hand_written_backprop_equals_the_generic_path(name):
    """Each hand-written step (no forward rerun) against the generic one (invert, rerun forward
    with a graph, autograd): the same reconstructed input, input gradient and parameter gradients."""
    torch.manual_seed(0)
    layer = perturb_(LAYERS[name]().double(), 0.3, seed=1)
    assert type(layer).fused_backprop
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        z, _ = layer(x)
    g = torch.Generator().manual_seed(3)
    grad_z, grad_ld = torch.randn(z.shape, generator=g, dtype=z.dtype), torch.randn(3, generator=g, dtype=z.dtype)
    out = []
    for run in (layer.reconstruct_and_backprop, lambda *a: backprop_generic([layer], *a)):
        layer.zero_grad(set_to_none=True)
        x_rec, grad_x = run(z, grad_z, grad_ld, None)
        out.append((x_rec, grad_x, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (x1, gx1, g1), (x2, gx2, g2) = out
    assert g1.keys() == g2.keys() and len(g1) == len(list(layer.parameters()))  # every parameter got its gradient
    torch.testing.assert_close(x1, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x1, x2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx1, gx2, rtol=1e-10, atol=1e-12)
    assert worst_relative_difference(g2, g1) < 1e-10


def test_hand_written_backprop_makes_module_calls_when_watched():
    """A hook on the layer (DeepSpeed ZeRO-3 gathers parameters in one) sends it down the generic
    path, which inverts and reruns it through module calls."""
    layer = perturb_(ActNorm(6).double(), 0.3)
    calls = []
    handle = watch(layer, lambda m, args, kwargs: calls.append(kwargs.get("reverse", False)), with_kwargs=True)
    z = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    layer.reconstruct_and_backprop(z, torch.ones_like(z), torch.ones(2, dtype=torch.float64), None)
    handle.remove()
    assert calls == [True, False]  # the inverse, then the forward with a graph
    assert layer.logs.grad is not None and layer.bias.grad is not None


def test_gradient_accumulation_matches():
    plain = small_flow("glow", levels=3, steps=8, width=12, size=16, scale=0.15, seed=3)
    wrapped = inverse_checkpoint(copy.deepcopy(plain))
    x = torch.rand(6, 3, 16, 16, dtype=torch.float64) - 0.5
    _, gxa, ga = loss_and_grads(plain, x, micro_batches=3)
    _, gxb, gb = loss_and_grads(wrapped, x, micro_batches=3)
    _, _, g_full = loss_and_grads(plain, x, micro_batches=1)
    assert worst_relative_difference(ga, gb) < 1e-10
    assert worst_relative_difference(g_full, gb) < 1e-10


def saved_bytes(flow, x):
    n, out = saved_activation_bytes(lambda: flow_bpd_dequantized(flow, x, 8)[0].sum(), exclude=list(flow.parameters()))
    out.backward()
    return n


def test_saved_bytes_flat_in_depth_while_plain_grows():
    x = torch.rand(4, 3, 16, 16) - 0.5
    plain, inv = {}, {}
    for k in (2, 4, 8, 16):
        flow = small_flow("glow", levels=3, steps=k, width=16, size=16, dtype=torch.float32, scale=0.05)
        plain[k] = saved_bytes(flow, x)
        inv[k] = saved_bytes(inverse_checkpoint(flow), x)
    assert inv[16] <= 1.3 * inv[2], inv
    assert plain[16] >= 5 * plain[2], plain
    assert inv[16] * 10 < plain[16]


def test_checkpoint_baseline_keeps_step_inputs():
    x = torch.rand(4, 3, 16, 16) - 0.5
    flows = {k: small_flow("glow", levels=3, steps=k, width=16, size=16, dtype=torch.float32, scale=0.05)
             for k in (2, 8)}
    ck = {k: saved_bytes(checkpoint_steps(copy.deepcopy(f)), x) for k, f in flows.items()}
    inv = {k: saved_bytes(inverse_checkpoint(copy.deepcopy(f)), x) for k, f in flows.items()}
    assert ck[8] > 2 * ck[2]  # torch.utils.checkpoint still grows with K
    assert inv[8] < ck[8]
    # And it computes the same gradients.
    _, _, ga = loss_and_grads(flows[8], x.double().float())
    _, _, gb = loss_and_grads(checkpoint_steps(copy.deepcopy(flows[8])), x)
    assert worst_relative_difference(ga, gb) < 1e-4


def test_no_grad_evaluation_is_identical():
    plain = small_flow("glow", levels=2, steps=4, width=8, size=8, scale=0.1)
    wrapped = inverse_checkpoint(copy.deepcopy(plain))
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) - 0.5
    with torch.no_grad():
        a, la = plain(x)
        b, lb = wrapped(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and torch.equal(la, lb)
    assert plain.state_dict().keys() == wrapped.state_dict().keys()


def test_bf16_autocast():
    plain = small_flow("glow", levels=2, steps=4, width=16, size=16, dtype=torch.float32, scale=0.1)
    wrapped = inverse_checkpoint(copy.deepcopy(plain))
    x = torch.rand(4, 3, 16, 16) - 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la, _, ga = loss_and_grads(plain, x)
        lb, _, gb = loss_and_grads(wrapped, x)
    assert all(torch.isfinite(g).all() for g in gb.values())
    assert abs(la - lb) < 1e-3 * abs(la)
    # bf16 arithmetic differs between the stored and the recomputed graph only by rounding.
    assert worst_relative_difference(ga, gb) < 5e-2


def test_inverse_and_recompute_go_through_module_calls():
    flow = inverse_checkpoint(small_flow("glow", levels=2, steps=2, width=8, size=8, scale=0.1))
    calls = {"reverse": 0, "forward": 0}

    def hook(module, args, kwargs):
        calls["reverse" if kwargs.get("reverse") else "forward"] += 1

    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    loss = flow_bpd_dequantized(flow, x, 8)[0].sum()
    handles = [watch(m, hook, with_kwargs=True) for m in flow.modules() if isinstance(m, InvConv1x1)]
    loss.backward()  # backward alone must invert and rerun the 1x1 convs through module calls
    for h in handles:
        h.remove()
    assert calls["reverse"] == 4 and calls["forward"] == 4


def test_flagged_steps_store_activations_and_keep_gradients_exact():
    plain = small_flow("glow", levels=3, steps=6, width=12, size=16, scale=0.15, seed=4)
    wrapped = inverse_checkpoint(copy.deepcopy(plain))
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64) - 0.5
    base = saved_bytes(wrapped, x)
    wrapped.levels[0].steps.store([2])
    wrapped.levels[1].steps.store([5])
    assert saved_bytes(wrapped, x) > base
    _, _, ga = loss_and_grads(plain, x)
    _, _, gb = loss_and_grads(wrapped, x)
    assert worst_relative_difference(ga, gb) < 1e-10


def test_reconstruction_error_is_measured_and_bad_steps_are_flagged():
    flow = inverse_checkpoint(small_flow("glow", levels=2, steps=4, width=8, size=8, dtype=torch.float32, scale=0.1))
    x = torch.rand(4, 3, 8, 8) - 0.5
    healthy = check_and_flag(flow, x, max_error=1e-4)
    assert len(healthy["level"]) == 2 and max(healthy["level"]) < 1e-5 and healthy["flagged"] == 0
    assert [level.steps.stored for level in flow.levels] == [frozenset(), frozenset()]
    nearly_singular_(flow.levels[0].steps[1], 1e-7)  # condition number 1e7: its float32 inverse drifts
    errs = check_and_flag(flow, x, max_error=1e-4)
    assert errs["step"][0][1] > 1e-4 and errs["level"][0] > 1e-4
    assert 1 in flow.levels[0].steps.stored and (0, 1) in errs["stored"]
    assert errs["flagged"] == len(errs["stored"]) >= 1
    assert 0 not in flow.levels[1].steps.stored


def nearly_singular_(step, smallest: float) -> None:
    """Give ``step``'s 1x1 conv singular values spread log-evenly from 1 down to ``smallest``."""
    conv = [m for m in step.modules() if isinstance(m, InvConv1x1)][0]
    with torch.no_grad():
        u, _, vh = torch.linalg.svd(conv.weight.double())
        s = torch.logspace(0, math.log10(smallest), len(conv.weight), dtype=torch.float64)
        conv.weight.copy_((u @ torch.diag(s) @ vh).to(conv.weight.dtype))


def test_the_wrapper_owns_the_stored_steps_and_gradients_stay_exact():
    """check_and_flag sets the set of stored steps on the chain's wrapper, not on the layers; it is
    runtime state outside the state dict (a resumed run re-derives it at its first check, so a
    checkpoint loads into a wrapped or plain flow alike); gradients stay those of plain autograd."""
    plain = small_flow("glow", levels=2, steps=3, width=8, size=8, scale=0.1, seed=5)
    nearly_singular_(plain.levels[1].steps[2], 1e-14)  # its float64 inverse drifts (2e-2 measured)
    wrapped = inverse_checkpoint(copy.deepcopy(plain))
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) - 0.5
    errs = check_and_flag(wrapped, x, max_error=1e-6)
    assert errs["stored"] == [(1, 2)] and errs["flagged"] == 1, errs
    assert [level.steps.stored for level in wrapped.levels] == [frozenset(), frozenset({2})]
    assert not [type(m).__name__ for m in wrapped.modules() if "store_activations" in vars(m)]
    assert not hasattr(type(wrapped.levels[0].steps[0]), "store_activations")
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    _, _, ga = loss_and_grads(plain, x)
    _, _, gb = loss_and_grads(wrapped, x)
    assert worst_relative_difference(ga, gb) < 1e-10
    # Back under the bound (here: a looser one), the step is recomputed again, and its drifting
    # inverse shows in the gradients (0.1 measured): the stored set is what kept them exact.
    assert check_and_flag(wrapped, x, max_error=1.0)["flagged"] == 0 and wrapped.levels[1].steps.stored == frozenset()
    assert worst_relative_difference(ga, loss_and_grads(wrapped, x)[2]) > 1e-3
    with pytest.raises(IndexError, match=r"steps \[3\] outside this chain of 3 steps"):
        wrapped.levels[0].steps.store([3])
    # The switch is per instance too: plain_autograd turns it off for the block and restores it.
    assert not hasattr(InvertibleSequence, "recompute")
    wrapped.levels[1].steps.recompute = False
    with plain_autograd(wrapped):
        assert [level.steps.recompute for level in wrapped.levels] == [False, False]
    assert [level.steps.recompute for level in wrapped.levels] == [True, False]


def test_recompute_levels_selects_levels():
    flow = inverse_checkpoint(small_flow("glow", levels=3, steps=2, width=8, size=16, scale=0.1), levels=[0, 2])
    kinds = [type(level.steps) for level in flow.levels]
    assert kinds == [InvertibleSequence, FlowSequence, InvertibleSequence]


@pytest.mark.usefixtures("single_process_env")
def test_training_logs_reconstruction_health(tmp_path):
    from flowscale.config import load_config
    from flowscale.logging import read_metrics
    from flowscale.train import main

    cfg = load_config(None, ["model.levels=2", "model.steps=2", "model.width=16", "data.train_size=256",
                             "data.test_size=32", "data.batch_size=8", "train.steps=6", "train.eval_every=0",
                             "train.sample_every=0", "memory.inverse_recompute=true", "memory.check_every=3",
                             f"train.run_dir={tmp_path}", "train.progress=false"])
    main(cfg)
    health = [r for r in read_metrics(tmp_path) if "health/recon_err/level_0" in r]
    assert [r["step"] for r in health] == [0, 3]
    assert all(0 <= r["health/recon_err/level_1"] < 1e-4 and r["health/recon_unstable_steps"] == 0 for r in health)
    for r in health:  # per-level log-det statistics ride along with the reconstruction check
        for lvl in (0, 1):
            lo, mean, hi = (r[f"health/logdet_step/level_{lvl}/{k}"] for k in ("min", "mean", "max"))
            assert lo <= mean <= hi and math.isfinite(lo) and math.isfinite(hi)
            assert r["health/logdet_step/max_abs"] >= max(abs(lo), abs(hi)) - 1e-12


def test_bench_memory_command(tmp_path, capsys):
    rc = cli_main(["bench", "memory", "--cases", "16:2", "--ks", "4", "--width", "8", "--repeats", "1",
                   "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| 16 | 2 | 4 | inverse |" in out
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert len(rows) == 3 and not any("error" in r for r in rows)
    assert all(r["step_s"] > 0 and r["step_s_isolated"] > 0 for r in rows), "side-by-side timings replace isolated ones"
    by = {(r["k"], r["mode"]): r["saved_bytes"] for r in rows}
    assert by[(4, "inverse")] < by[(4, "plain")]
    assert (tmp_path / "memory.png").stat().st_size > 1000


def test_the_wrappers_refuse_a_flow_without_declared_chains_by_name():
    """The multi-scale walk is part of the contract (Flow.step_chains / Flow.walk); a flow that
    declares none (here a bare chain of steps) is refused with its class name."""
    from flowscale.flows.base import FlowSequence
    from flowscale.inverse_checkpoint import checkpoint_steps

    bare = FlowSequence(list(small_flow("glow", levels=1, steps=2).levels[0].steps))
    for wrap in (inverse_checkpoint, checkpoint_steps):
        with pytest.raises(TypeError, match="FlowSequence declares none"):
            wrap(bare)
    with pytest.raises(TypeError, match="FlowSequence declares no chains"):
        next(bare.walk(torch.zeros(1, 12, 2, 2)))


def test_walk_is_the_forward_path():
    """Every user of the walk sees what the forward pass computes: the chains' inputs and outputs
    along walk() give the flow's own latents and log-det (priors added outside the walk)."""
    flow = small_flow("glow", levels=3, steps=2, width=8, size=16, scale=0.2)
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64) - 0.5
    eps, logdet = flow(x)
    passes = list(flow.walk(x))
    assert [p.index for p in passes] == [0, 1, 2] and passes[-1].z2 is None
    total = sum(p.logdet for p in passes)
    for p in passes:
        if p.z2 is not None:
            total = total + p.holder.prior(p.z2, cond=p.h)[1]
    total = total + flow.top_prior(passes[-1].h, cond=None)[1]
    assert torch.allclose(total, logdet, rtol=0, atol=1e-10)
    assert torch.equal(flow.top_prior(passes[-1].h, cond=None)[0], eps[-1])


def _train_bf16(tmp_path, *extra):
    from flowscale.config import load_config
    from flowscale.logging import read_metrics
    from flowscale.train import main

    cfg = load_config(None, ["model.levels=2", "model.steps=3", "model.width=16", "data.train_size=64",
                             "data.test_size=16", "data.batch_size=8", "train.steps=4", "train.eval_every=0",
                             "train.sample_every=0", "memory.inverse_recompute=true", "memory.check_every=2",
                             "engine.precision=bf16", f"train.run_dir={tmp_path}", "train.progress=false",
                             "wandb.mode=disabled", *extra])
    main(cfg)
    return [r for r in read_metrics(tmp_path) if "health/recon_err/level_0" in r]


@pytest.mark.usefixtures("single_process_env")
def test_bf16_recompute_stays_on_at_the_precision_tolerance(tmp_path, capsys):
    """bf16 reconstructs to ~1 eps per step (6e-3 measured); the default bound follows the
    precision (max(1e-3, 4 eps) = 3.1e-2), so recompute is not switched off silently."""
    from flowscale.reconstruction import reconstruction_tolerance

    assert reconstruction_tolerance(None, torch.bfloat16) == pytest.approx(4 * 2 ** -7)
    assert reconstruction_tolerance(None, torch.float32) == 1e-3
    assert reconstruction_tolerance(5e-2, torch.float32) == 5e-2
    health = _train_bf16(tmp_path)
    assert [r["step"] for r in health] == [0, 2]
    assert all(r["health/recon_stored_steps"] == 0 and r["health/recon_stored_mib"] == 0 for r in health), health
    assert all(1e-4 < r["health/recon_err/step_max"] < 4 * 2 ** -7 for r in health), health  # bf16-sized, under the bound
    assert "store their activations" not in capsys.readouterr().out


@pytest.mark.usefixtures("single_process_env")
def test_steps_made_to_store_activations_are_said_once_and_can_be_an_error(tmp_path, capsys):
    health = _train_bf16(tmp_path / "store", "memory.max_reconstruction_error=1e-6")
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "store their activations" in ln]
    assert len(lines) == 1, out  # the set did not change between the two checks: said once
    assert "6 of 6 steps" in lines[0] and "level 0: steps [0, 1, 2]; level 1: steps [0, 1, 2]" in lines[0], lines
    assert "MiB per micro-batch of 8" in lines[0], lines
    assert all(r["health/recon_stored_steps"] == 6 and r["health/recon_stored_mib"] > 0 for r in health), health
    with pytest.raises(FloatingPointError, match=r"step 0: 6 of 6 recomputed flow steps .* memory.on_unstable=error"):
        _train_bf16(tmp_path / "error", "memory.max_reconstruction_error=1e-6", "memory.on_unstable=error")
