"""Crash consistency: a real training process killed with SIGKILL at several points, including
inside a checkpoint write, loses at most the steps since its last complete checkpoint.

One run directory is killed again and again, each restart at a different point:

    crash point (FLOWSCALE_KILL_AT)      what is on disk when it dies
    engine_state @ step 6                DeepSpeed's files + rank state, no export, no COMPLETE
    export       @ step 9                every file but COMPLETE
    complete     @ step 12               COMPLETE written, older checkpoints not pruned yet
    prune        @ step 15              an old checkpoint renamed for deletion, not yet deleted
    external SIGKILL at a random step    anywhere: a forward, a backward, a save, a log line

after which the same command runs to the end. The final weights and EMA must equal an
uninterrupted run's bit for bit, every step must appear exactly once in metrics.jsonl, and the
checkpoint folder must hold exactly the keep_last newest checkpoints and nothing else. With two
ranks, one rank dying inside the write leaves no COMPLETE and the rerun is again exact.

The random kill time comes from FLOWSCALE_FAULT_SEED (a fresh seed each run, printed in every
failure so that a failing point can be replayed).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import torch

from flowscale.checkpoint import list_complete
from flowscale.faults import CRASH_POINTS

from helpers import child_env, final_weights, train_command

SMALL = ["model.levels=2", "model.steps=2", "model.width=16", "data.train_size=256", "data.test_size=32",
         "data.batch_size=8", "train.init_batch_size=32", "train.progress=false", "wandb.mode=disabled",
         "train.eval_every=0", "train.sample_every=0", "train.log_every=1", "memory.check_every=0",
         "optim.warmup_steps=3", "optim.ema_decay=0.9", "train.keep_last=2"]
STEPS = 60  # the random kill lands between step 17 and ~30 however fast the machine
SEED = int(os.environ.get("FLOWSCALE_FAULT_SEED", time.time_ns() % 2 ** 31))
REPLAY = f"(replay with FLOWSCALE_FAULT_SEED={SEED})"


def _cmd(run_dir: Path, nproc: int = 1, *extra: str) -> list[str]:
    return train_command(*SMALL, f"train.run_dir={run_dir}", *extra, nproc=nproc)


def _bpd_steps(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    steps = []
    for line in (f.read_text().splitlines() if f.is_file() else []):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # the line a kill tore
            continue
        if "train/bpd" in r:
            steps.append(r["step"])
    return steps


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{what}: {len(diff)} tensors differ from the uninterrupted run, e.g. {diff[:3]} {REPLAY}"


def _killed_at(run_dir: Path, point: str, step: int, tmp_path: Path) -> None:
    """Run the training (one rank) with a crash point armed; it must die by SIGKILL (not finish, not fail)."""
    p = subprocess.run(_cmd(run_dir, 1, f"train.steps={STEPS}", "train.checkpoint_every=3"),
                       env=child_env(tmp_path, f"{point}@{step}"), capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, f"{point}@{step}: rc {p.returncode}\n{p.stderr[-3000:]}"
    assert max(_bpd_steps(run_dir)) == step, f"{point}@{step}: died at the wrong place"


def _check_folder(run_dir: Path, keep: int) -> None:
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())  # DeepSpeed adds zero_to_*.py
    complete = [p.name for p in list_complete(run_dir)]
    assert names == complete and len(complete) == keep, f"only the {keep} newest complete checkpoints: {names}"
    assert (run_dir / "checkpoints" / "latest").read_text() == complete[-1], "DeepSpeed's latest names the newest"


def test_sigkill_at_every_crash_point_then_resume_is_exact(tmp_path):
    assert CRASH_POINTS == ("engine_state", "export", "complete", "prune")
    ref = tmp_path / "ref"
    reference = subprocess.Popen(_cmd(ref, 1, f"train.steps={STEPS}", "train.checkpoint_every=3"),
                                 env=child_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    ckpts = run / "checkpoints"

    _killed_at(run, "engine_state", 6, tmp_path=tmp_path)
    assert (ckpts / "step_00000006").is_dir() and not (ckpts / "step_00000006" / "COMPLETE").exists()
    assert not (ckpts / "step_00000006" / "model.safetensors").exists(), "died before the export"
    assert [p.name for p in list_complete(run)] == ["step_00000003"]

    _killed_at(run, "export", 9, tmp_path=tmp_path)  # resumes from 3; dies with every file but COMPLETE
    assert (ckpts / "step_00000009" / "model.safetensors").is_file()
    assert not (ckpts / "step_00000009" / "COMPLETE").exists()
    assert not (ckpts / "step_00000006").exists() or (ckpts / "step_00000006" / "COMPLETE").is_file(), \
        "the partial step_6 of the first kill was removed at restart (and step 6 saved again)"

    _killed_at(run, "complete", 12, tmp_path=tmp_path)
    assert [p.name for p in list_complete(run)] == ["step_00000006", "step_00000009", "step_00000012"], \
        "killed between COMPLETE and pruning: one checkpoint too many, all complete"

    _killed_at(run, "prune", 15, tmp_path=tmp_path)
    leftovers = [p.name for p in ckpts.iterdir() if p.name.startswith(".deleting-")]
    assert leftovers, "killed midway through pruning: the checkpoint being deleted is renamed first"
    assert all(not n.startswith("step_") for n in leftovers)
    assert [p.name for p in list_complete(run)][-1] == "step_00000015"

    # Anywhere: SIGKILL from outside at a random moment after step 17 (checkpoints every 3 steps,
    # so it may fall inside a save too).
    rng = random.Random(SEED)
    # An end far away (the schedule has no decay, so only the end point differs): the run is
    # still going when the kill comes, on a fast machine too.
    proc = subprocess.Popen(_cmd(run, 1, "train.steps=100000", "train.checkpoint_every=3"), env=child_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = 17 + rng.randrange(10)
    deadline = time.time() + 600
    while max(_bpd_steps(run), default=0) < target:
        assert proc.poll() is None, f"ended before step {target}: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "training did not reach the kill point"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.05))  # within a step or two: a forward, a backward, a save, a log line
    assert proc.poll() is None, f"the run ended before the random kill {REPLAY}: {proc.communicate()[1][-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_after = max(_bpd_steps(run))
    assert killed_after < STEPS, f"killed after step {killed_after}: past the end of the comparison {REPLAY}"

    # The same command runs to the end.
    partial = sorted({c.name for c in ckpts.iterdir() if c.is_dir()} - {c.name for c in list_complete(run)})
    p = subprocess.run(_cmd(run, 1, f"train.steps={STEPS}", "train.checkpoint_every=3"), env=child_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    if partial:  # the random kill fell inside a save or prune: cleared, and said once
        assert f"left by an interrupted run: {', '.join(partial)}" in p.stdout, (partial, p.stdout[-2000:], REPLAY)
    else:
        assert "unfinished checkpoint" not in p.stdout
    assert sorted(_bpd_steps(run)) == list(range(1, STEPS + 1)), f"every step exactly once {REPLAY}"
    assert (run / "metrics.superseded.jsonl").is_file(), "the records of lost steps were moved aside"
    _check_folder(run, keep=2)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    _assert_same(final_weights(run, ema=True), final_weights(ref, ema=True),
                 f"after kills at every crash point and a random one at step >={target} (last logged {killed_after})")


def test_one_rank_killed_inside_a_checkpoint_write(tmp_path):
    """Two ranks, ZeRO-2: rank 1 dies after writing its DeepSpeed files of step 6, rank 0 is
    still writing; no COMPLETE appears, and the rerun resumes from step 3 and ends exact."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    common = ("engine.zero_stage=2", "train.checkpoint_every=3", "train.steps=9")
    p = subprocess.run(_cmd(run, 2, *common), env=child_env(tmp_path, "engine_state@6:1"), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode != 0, "a run that lost a rank does not report success"
    assert [c.name for c in list_complete(run)] == ["step_00000003"], "no COMPLETE for the step being written"
    assert (run / "checkpoints" / "step_00000006").is_dir()
    outs = []
    for cmd_dir in (run, ref):
        p = subprocess.run(_cmd(cmd_dir, 2, *common), env=child_env(tmp_path), capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append(p.stdout)
    assert "removed 1 unfinished checkpoint directory left by an interrupted run: step_00000006" in outs[0]
    assert "resumed from" in outs[0] and "step_00000003 at step 3" in outs[0]
    assert sorted(_bpd_steps(run)) == list(range(1, 10))
    _check_folder(run, keep=2)
    _assert_same(final_weights(run, ema=True), final_weights(ref, ema=True),
                 "two ranks, one killed inside the write of step 6")
