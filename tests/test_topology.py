"""Training whose trajectory is not the topology's business (data.streams): the same global
batch on 1 rank x grad_accum 4, 2 ranks x 2 and 4 ranks x 1 gives the same per-step losses; a
ZeRO-0 run switched 2 ranks -> 1 rank with 2 loader workers -> 4 ranks mid-run, and a run on 2
ranks with ZeRO-2, SIGKILLed mid-epoch and resumed on 1 rank with ZeRO-1, then on 4 ranks with
ZeRO-3 (optimizer state resharded through DeepSpeed's universal checkpoint), end where the
unswitched run ends, each image seen once per epoch. Real torchrun processes, DeepSpeed on
gloo, demo shards.

Tolerances. The runs differ only in the order in which per-sample gradients are summed (within a
micro-batch, over micro-batches, over ranks), i.e. by float32 rounding: a relative 2^-24 per
addition. Per-step losses are compared at 1e-4 relative (the issue's bar). For the weights:
Adam moves a weight by at most ~lr per step, and rounding can change the direction of a move
only where a gradient component is at rounding level, so after T steps two orders differ by at
most T * lr * 1e-3 when fewer than one update in a thousand is affected: 3e-5 here. Measured:
about 1e-7 for the losses and 6e-8 for the weights (float32 ulps), well inside both.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from flowscale.checkpoint import list_complete

from helpers import child_env, final_weights, train_command

STEPS, LR = 30, 1e-3
COMMON = ["model.levels=2", "model.steps=1", "model.width=8", "data.image_size=16", "data.train_size=64",
          "data.test_size=8", "data.batch_size=8", "data.streams=4", "train.init_batch_size=16", "train.log_every=1",
          f"train.checkpoint_every={STEPS}", "train.eval_every=0", "train.sample_every=0", "train.progress=false",
          "wandb.mode=disabled", "memory.check_every=0", "optim.warmup_steps=2", f"optim.lr={LR}"]
WEIGHT_TOL = STEPS * LR * 1e-3


def _train(run_dir: Path, nproc: int, *overrides: str, tmp_path: Path, ok: bool = True,
           kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = child_env(tmp_path, kill_at)  # kill_at: flowscale.checkpoint's crash points, SIGKILL inside a save
    env.pop("WANDB_DIR", None)
    p = subprocess.run(train_command(*COMMON, f"train.run_dir={run_dir}", *overrides, nproc=nproc), env=env,
                       capture_output=True, text=True, timeout=900)
    if ok:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def _bpd(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/bpd" in r]
    assert sorted(steps) == list(range(1, len(steps) + 1)), "every step once"
    return {r["step"]: r["train/bpd"] for r in rows if "train/bpd" in r}


def _compare(a: Path, b: Path) -> tuple[float, float]:
    la, lb = _bpd(a), _bpd(b)
    assert la.keys() == lb.keys() == set(range(1, STEPS + 1))
    loss = max(abs(la[k] - lb[k]) / abs(la[k]) for k in la)
    wa, wb = final_weights(a), final_weights(b)
    weights = max((wa[k] - wb[k]).abs().max().item() for k in wa if wa[k].is_floating_point())
    print(f"{b.parent.name}: per-step bits/dim max relative difference {loss:.2e}, final weights {weights:.2e}")
    return loss, weights


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("topology")
    _train(tmp / "r1", 1, "engine.grad_accum=4", f"train.steps={STEPS}", tmp_path=tmp)
    return tmp / "r1"


@pytest.mark.parametrize("nproc,accum", [(2, 2), (4, 1)])
def test_the_same_trajectory_on_any_number_of_ranks(one_rank, tmp_path, nproc, accum):
    run = tmp_path / "run"
    _train(run, nproc, f"engine.grad_accum={accum}", f"train.steps={STEPS}", tmp_path=tmp_path)
    loss, weights = _compare(one_rank, run)
    assert loss < 1e-4, f"per-step bits/dim differ by {loss:.2e} relative ({nproc} ranks x accum {accum})"
    assert weights < WEIGHT_TOL, f"final weights differ by {weights:.2e} > {WEIGHT_TOL:.0e}"


def test_switched_2_to_1_to_4_ranks_mid_run_ends_where_the_unswitched_run_ends(one_rank, tmp_path):
    """ZeRO-0 on 2 ranks -> ZeRO-2 on 1 rank with 2 workers -> ZeRO-0 on 4 ranks: whole optimizer
    state into DeepSpeed's sharded layout and back (flowscale writes and reads the universal
    layout for ZeRO-0 itself)."""
    run = tmp_path / "run"
    _train(run, 2, "engine.grad_accum=2", "train.steps=11", tmp_path=tmp_path)
    out = _train(run, 1, "engine.grad_accum=4", "train.steps=21", "data.num_workers=2", "engine.zero_stage=2",
                 tmp_path=tmp_path).stdout
    assert "resuming step_00000011 written by 2 rank(s) (ZeRO-0) on 1 (ZeRO-2): optimizer state resharded" in out, out[-2000:]
    assert "data.num_workers 0 -> 2" in out and "engine.zero_stage 0 -> 2" in out
    out = _train(run, 4, "engine.grad_accum=1", f"train.steps={STEPS}", tmp_path=tmp_path).stdout
    assert "resuming step_00000021 written by 1 rank(s) (ZeRO-2) on 4 (ZeRO-0): optimizer state resharded" in out, out[-2000:]
    loss, weights = _compare(one_rank, run)
    assert loss < 1e-4 and weights < WEIGHT_TOL, (loss, weights)
    assert not (run / "metrics.superseded.jsonl").exists(), "no step lost or repeated across the switches"


def test_killed_mid_epoch_on_2_ranks_zero2_resumed_on_1_rank_zero1_then_4_ranks_zero3(one_rank, tmp_path):
    """The issue's switch: 2 ranks under ZeRO-2, rank 1 SIGKILLed inside the save of step 15
    (mid-epoch: an epoch is 8 steps), the run resumed from step 10 on 1 rank with ZeRO-1 and 2
    loader workers, then on 4 ranks with ZeRO-3, then on 1 rank with ZeRO-2 from step 25.
    Optimizer state crosses every layout through DeepSpeed's universal checkpoint. Data coverage is counted from sample keys
    (train.record_batches, matched against the shards): every image exactly once per epoch, and
    the steps redone after the kill saw the very batches the killed run saw."""
    from flowscale.analysis.audit import batch_keys, read_batches
    from flowscale.config import load_config

    run = tmp_path / "run"
    audit = ["train.checkpoint_every=5", "train.record_batches=true", "wandb.mode=offline"]
    p = _train(run, 2, "engine.zero_stage=2", "engine.grad_accum=2", f"train.steps={STEPS}", *audit,
               tmp_path=tmp_path, ok=False, kill_at="engine_state@15:1")
    assert p.returncode != 0 and [c.name for c in list_complete(run)] == ["step_00000005", "step_00000010"], \
        p.stdout[-2000:] + p.stderr[-2000:]
    killed = read_batches(run)
    assert sorted(killed) == list(range(1, 16)), "the killed run recorded steps 1..15"

    out = _train(run, 1, "engine.zero_stage=1", "engine.grad_accum=4", "train.steps=20", "data.num_workers=2", *audit,
                 tmp_path=tmp_path).stdout
    assert "removed 1 unfinished checkpoint directory left by an interrupted run: step_00000015" in out, out[-2000:]
    assert "resuming step_00000010 written by 2 rank(s) (ZeRO-2) on 1 (ZeRO-1): optimizer state resharded (universal checkpoint)" in out
    assert "5 metrics records after step 10 (not in the checkpoint) moved to metrics.superseded.jsonl" in out
    out = _train(run, 4, "engine.zero_stage=3", "engine.grad_accum=1", "train.steps=25", *audit,
                 tmp_path=tmp_path).stdout
    assert "resuming step_00000020 written by 1 rank(s) (ZeRO-1) on 4 (ZeRO-3): optimizer state resharded" in out, out[-2000:]
    out = _train(run, 1, "engine.zero_stage=2", "engine.grad_accum=4", f"train.steps={STEPS}", *audit,
                 tmp_path=tmp_path).stdout  # and out of ZeRO-3 again
    assert "resuming step_00000025 written by 4 rank(s) (ZeRO-3) on 1 (ZeRO-2): optimizer state resharded" in out, out[-2000:]

    loss, weights = _compare(one_rank, run)
    assert loss < 1e-4 and weights < WEIGHT_TOL, (loss, weights)
    batches = read_batches(run)
    assert all(batches[s] == killed[s] for s in range(11, 16)), "the redone steps saw the killed run's batches"
    cfg = load_config(None, COMMON + [f"train.run_dir={run}"])
    keys = batch_keys(run, cfg.data)
    assert sorted(keys) == list(range(1, STEPS + 1)) and all(len(k) == 8 for k in keys.values())
    every = {k for ks in keys.values() for k in ks}
    assert len(every) == 64, "the 64 training images"
    per_epoch = 64 // 8
    for e in range(STEPS // per_epoch):  # whole epochs: each image once
        seen = [k for s in range(e * per_epoch + 1, (e + 1) * per_epoch + 1) for k in keys[s]]
        assert sorted(seen) == sorted(every), f"epoch {e}: {len(set(seen))} distinct of {len(seen)}"
    rest = [k for s in range(STEPS // per_epoch * per_epoch + 1, STEPS + 1) for k in keys[s]]
    assert len(set(rest)) == len(rest), "the last, partial epoch repeats no image"

    # W&B: the run continued from step 10 is a rewind of the logged one, not out-of-order steps
    wandb_id = (run / "wandb_id.txt").read_text().strip()
    logs = b"".join(f.read_bytes() for f in run.glob("wandb/offline-run-*/*.wandb"))
    assert f'"branch_point":{{"run_id":"{wandb_id}","step":10}}'.encode() in logs


def test_adamax_state_resharded_zero2_to_zero1_to_zero0(tmp_path):
    """DeepSpeed's converter knows only Adam's moments by name; Adamax's infinity norm (exp_inf)
    crosses 2 ranks ZeRO-2 -> 1 rank ZeRO-1 -> 2 ranks ZeRO-0 all the same (a lost exp_inf would
    restart it at |g| and move the trajectory far beyond the tolerance)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    _train(ref, 1, "optim.name=adamax", "engine.grad_accum=4", f"train.steps={STEPS}", tmp_path=tmp_path)
    _train(run, 2, "optim.name=adamax", "engine.zero_stage=2", "engine.grad_accum=2", "train.steps=10",
           tmp_path=tmp_path)
    out = _train(run, 1, "optim.name=adamax", "engine.zero_stage=1", "engine.grad_accum=4", "train.steps=20",
                 tmp_path=tmp_path).stdout
    assert "written by 2 rank(s) (ZeRO-2) on 1 (ZeRO-1): optimizer state resharded" in out, out[-2000:]
    assert sorted(p.name for p in (list_complete(run)[0] / "universal" / "zero" / "top_prior.logs").iterdir()) == \
        ["exp_avg.pt", "exp_inf.pt", "fp32.pt", "step.pt"]
    _train(run, 2, "optim.name=adamax", "engine.grad_accum=2", f"train.steps={STEPS}", tmp_path=tmp_path)
    loss, weights = _compare(ref, run)
    assert loss < 1e-4 and weights < WEIGHT_TOL, (loss, weights)


def test_zero_layout_changes_allowed_and_refused(tmp_path):
    """Which ZeRO changes resume_changes allows, from a ZeRO-2 checkpoint of 2 ranks: any ranks
    and any stage (fp32, Adam); refused, naming the field: crossing with ZeRO-0 in bf16, Adamax
    into ZeRO-3 on another layout, and data.streams (fixed when the run was created)."""
    from flowscale.restore import resume_changes
    from flowscale.config import ConfigError, load_config, to_dict

    run = tmp_path / "run"
    _train(run, 2, "engine.zero_stage=2", "engine.grad_accum=2", "train.steps=2", tmp_path=tmp_path)
    ckpt = list_complete(run)[-1]

    def cfg(*extra):
        return to_dict(load_config(None, COMMON + [f"train.run_dir={run}", "train.steps=2", "engine.grad_accum=2",
                                                   *extra]))
    assert resume_changes(ckpt, cfg("engine.zero_stage=2"), 2) == []
    assert resume_changes(ckpt, cfg("engine.zero_stage=1"), 3) == ["engine.zero_stage 2 -> 1"]
    assert resume_changes(ckpt, cfg("engine.zero_stage=3"), 4) == ["engine.zero_stage 2 -> 3"]
    assert resume_changes(ckpt, cfg("engine.zero_stage=0"), 1) == ["engine.zero_stage 2 -> 0"]  # fp32: whole again
    bf16 = tmp_path / "bf16"
    _train(bf16, 1, "engine.zero_stage=1", "engine.grad_accum=4", "engine.precision=bf16", "train.steps=1",
           tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="engine.zero_stage.*not to or from ZeRO-0"):
        resume_changes(list_complete(bf16)[-1], to_dict(load_config(None, COMMON + [
            f"train.run_dir={bf16}", "train.steps=2", "engine.precision=bf16", "engine.zero_stage=0"])), 1)
    with pytest.raises(ConfigError, match="optim.name='adamax'"):
        resume_changes(ckpt, cfg("engine.zero_stage=3", "optim.name=adamax"), 4)
    assert resume_changes(ckpt, cfg("engine.zero_stage=2", "optim.name=adamax"), 4) == ["optim.name 'adam' -> 'adamax'"]
    with pytest.raises(ConfigError, match="data.streams"):
        resume_changes(ckpt, cfg("engine.zero_stage=2", "data.streams=8"), 4)


# -- elastic by default: data.streams left out ------------------------------------------------------

def _shards_config(tmp_path: Path) -> list[str]:
    """A tiny run on real shards (8 shards x 8 images, 8 px) with data.streams left to the run:
    batch 8 and 8 shards make it choose 8 streams on 1 rank and on 2."""
    from helpers import write_split

    write_split(tmp_path / "train", [8] * 8, size=8, labels=False)
    write_split(tmp_path / "test", [8], size=8, labels=False, prefix="v", split="test")
    return ["model.levels=2", "model.steps=1", "model.width=8", "data.dataset=shards",
            f"data.train_manifest={tmp_path / 'train'}", f"data.test_manifest={tmp_path / 'test'}", "data.image_size=8",
            "data.batch_size=8", "train.init_batch_size=16", "train.log_every=1", "train.checkpoint_every=2",
            "train.eval_every=0", "train.sample_every=0", "train.progress=false", "wandb.mode=disabled",
            "memory.check_every=0", "optim.warmup_steps=2", f"optim.lr={LR}"]


def _rows(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/bpd"] for r in rows if "train/bpd" in r}


def _run(cmd_overrides: list[str], nproc: int, tmp_path: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = child_env(tmp_path, kill_at)
    return subprocess.run(train_command(*cmd_overrides, nproc=nproc), env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_default_run_is_elastic_2_ranks_killed_then_1_rank(tmp_path):
    """No data.streams given: 1 rank and 2 ranks choose the same 8 streams (printed) and log the
    same per-step bits/dim; the 2-rank run, SIGKILLed inside the save of step 4, continues from
    step 2 on 1 rank with the recorded streams and ends on the 1-rank run's trajectory."""
    common = _shards_config(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    p = _run([*common, f"train.run_dir={ref}", "train.steps=6"], 1, tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "data.streams=8: chosen for this new run: the largest divisor of the global batch 8" in p.stdout, p.stdout
    p = _run([*common, f"train.run_dir={run}", "train.steps=6"], 2, tmp_path, kill_at="engine_state@4:1")
    assert p.returncode != 0 and [c.name for c in list_complete(run)] == ["step_00000002"], p.stdout[-2000:] + p.stderr[-2000:]
    assert "data.streams=8: chosen for this new run" in p.stdout and "2 rank(s)" in p.stdout, p.stdout
    a, b = _rows(ref), _rows(run)
    assert len(b) >= 3 and set(b) <= set(a)
    two = max(abs(a[k] - b[k]) / abs(a[k]) for k in b)
    assert two < 1e-4, f"2 ranks vs 1: per-step bits/dim differ by {two:.2e} relative"
    assert "streams: 8" in (list_complete(run)[-1] / "config.yaml").read_text(), "the choice is recorded"

    p = _run([*common, f"train.run_dir={run}", "train.steps=6"], 1, tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "data.streams=8: recorded by step_00000002 when the run was created" in p.stdout, p.stdout
    assert "resuming step_00000002 written by 2 rank(s)" in p.stdout, p.stdout
    b = _rows(run)
    assert sorted(b) == list(range(1, 7))
    resumed = max(abs(a[k] - b[k]) / abs(a[k]) for k in a)
    print(f"default data.streams: 2 ranks vs 1 {two:.2e}, 2 ranks killed -> 1 rank vs 1 {resumed:.2e} (relative)")
    assert resumed < 1e-4, f"killed on 2 ranks, resumed on 1: per-step bits/dim differ by {resumed:.2e} relative"


def test_a_checkpoint_without_a_recorded_choice_keeps_the_per_rank_order(tmp_path):
    """A run from before data.streams=null (its config.yaml without the field; it read in the
    per-rank order, data.streams=0) resumed with today's default config: it keeps that order,
    step for step the uninterrupted data.streams=0 run (whose rank count is then fixed, as
    tests/test_resume_changes.py checks)."""
    common = _shards_config(tmp_path)
    straight, old = tmp_path / "straight", tmp_path / "old"
    for run_dir, steps in ((straight, 4), (old, 2)):
        p = _run([*common, f"train.run_dir={run_dir}", f"train.steps={steps}", "data.streams=0"], 1, tmp_path)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for f in (old / "config.yaml", list_complete(old)[-1] / "config.yaml"):  # as written before the field existed
        f.write_text("".join(line for line in f.read_text().splitlines(True) if "streams:" not in line))
    p = _run([*common, f"train.run_dir={old}", "train.steps=4"], 1, tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "data.streams=0: recorded by step_00000002 (not recorded: a run from before it)" in p.stdout, p.stdout
    assert _rows(old) == _rows(straight), "the per-rank order, continued exactly"
    assert "streams: 0" in (list_complete(old)[-1] / "config.yaml").read_text(), "recorded from now on"
