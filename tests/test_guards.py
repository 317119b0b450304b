"""The non-finite guard of train_step on a real DeepSpeed engine (single rank, gloo, CPU), for
every ZeRO stage: a NaN loss in a later micro-batch of an accumulated step, or a NaN gradient
behind a finite loss, skips the whole step -- weights unchanged, LR schedule still advancing --
and the next clean step trains normally."""

import pytest
import torch

from flowscale.build import build_training
from flowscale.checkpoint import consolidated_state_dict
from flowscale.config import load_config
from flowscale.distributed import cleanup, init_distributed
from flowscale.engine import train_step
from flowscale.loss import training_loss

pytestmark = pytest.mark.usefixtures("single_process_env")


def make_engine(*overrides):
    cfg = load_config(None, ["model.levels=2", "model.steps=2", "model.width=8", "data.batch_size=8",
                             "optim.warmup_steps=4", "train.steps=20", *overrides])
    info = init_distributed("gloo")
    run = build_training(cfg, info, batch(cfg, 1), torch.device("cpu"))
    return cfg, run.engine, training_loss(cfg, run.device, run.dtype)


def batch(cfg, seed):
    s = cfg.data.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (cfg.data.batch_size, cfg.data.channels, s, s), generator=g, dtype=torch.uint8)


def weights(engine):
    return {k: v.float() for k, v in consolidated_state_dict(engine).items()}


def nan_logdet_on_call(module, n):
    """Forward hook: the n-th forward call (1-based) returns a NaN log-det."""
    calls = [0]

    def hook(_m, _inp, out):
        calls[0] += 1
        if calls[0] == n:
            return out[0], out[1] * float("nan")
        return out

    return module.register_forward_hook(hook)


CASES = [(stage, "fp32", fault, accum) for stage in (0, 1, 2, 3) for fault, accum in (("loss", 2), ("grad", 1))]
CASES += [(0, "bf16", "grad", 1), (2, "bf16", "loss", 2)]


@pytest.mark.parametrize("stage,precision,fault,accum", CASES)
def test_bad_step_is_skipped_and_training_goes_on(stage, precision, fault, accum):
    cfg, engine, loss_fn = make_engine(f"engine.zero_stage={stage}", f"engine.precision={precision}",
                              f"engine.grad_accum={accum}")
    try:
        train_step(engine, (batch(cfg, 1), None), loss_fn)  # one clean step: optimizer state exists
        before, lr_before = weights(engine), engine.get_lr()[0]
        if fault == "loss":  # the last micro-batch's loss is NaN, the earlier ones were accumulated
            handle = nan_logdet_on_call(engine.module, accum)
        else:  # finite loss, NaN gradient on one parameter
            p = next(q for q in engine.module.parameters() if q.requires_grad)
            handle = p.register_hook(lambda g: g * float("nan"))
        m = train_step(engine, (batch(cfg, 2), None), loss_fn)
        handle.remove()
        assert m["skipped"] == 1
        after = weights(engine)
        assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
        assert engine.get_lr()[0] > lr_before, "the warmup schedule advances with the step count"
        m = train_step(engine, (batch(cfg, 3), None), loss_fn)
        assert m["skipped"] == 0 and m["bpd"] == m["bpd"]
        final = weights(engine)
        assert any(not torch.equal(after[k], final[k]) for k in after), "the next clean step must train"
        assert all(torch.isfinite(v).all() for v in final.values())
    finally:
        cleanup()


def test_nan_in_first_micro_batch_never_reaches_deepspeed():
    cfg, engine, loss_fn = make_engine("engine.grad_accum=2")
    try:
        train_step(engine, (batch(cfg, 1), None), loss_fn)
        micro_before, before = engine.micro_steps, weights(engine)
        handle = nan_logdet_on_call(engine.module, 1)
        assert train_step(engine, (batch(cfg, 2), None), loss_fn)["skipped"] == 1
        handle.remove()
        assert engine.micro_steps == micro_before
        assert all(torch.equal(v, weights(engine)[k]) for k, v in before.items())
        assert train_step(engine, (batch(cfg, 3), None), loss_fn)["skipped"] == 0
    finally:
        cleanup()


def test_a_vetoed_last_step_still_ends_with_eval_and_a_checkpoint(tmp_path, monkeypatch):
    """Eval and save are decided by the step number, not by whether the step was applied: a run
    whose last step is vetoed (a NaN loss, injected at the declared fault point) still writes its
    final checkpoint and test bits/dim, and the veto is counted."""
    from flowscale.checkpoint import list_complete
    from flowscale.logging import read_metrics
    from flowscale.train import main

    monkeypatch.setenv("FLOWSCALE_FAULT", "nan_loss@4")
    cfg = load_config(None, ["model.levels=2", "model.steps=2", "model.width=8", "data.batch_size=8",
                             "data.train_size=64", "data.test_size=16", "train.steps=4", "train.checkpoint_every=100",
                             "train.eval_every=0", "train.sample_every=0", "train.progress=false",
                             "wandb.mode=disabled", f"train.run_dir={tmp_path}"])
    out = main(cfg)
    assert out["step"] == 4 and out["skipped"] == 1 and "test_bpd" in out
    assert [p.name for p in list_complete(tmp_path)] == ["step_00000004"]
    records = read_metrics(tmp_path)
    assert {"step": 4, "optim/skipped_steps": 1} in records
    assert any(r["step"] == 4 and "test/bpd" in r for r in records)
