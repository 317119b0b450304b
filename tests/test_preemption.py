"""Save on signal (flowscale.preemption): a real SIGTERM / SIGUSR1 sent to a real training
process, far from any periodic checkpoint, makes it write a complete checkpoint of the step it
reached and exit with code 75; rerunning the same command resumes there, and the final weights
equal those of an uninterrupted run, bit for bit. With two ranks the signal reaches one of
them only and both agree on the step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowscale.checkpoint import list_complete
from flowscale.preemption import EXIT_PREEMPTED

from helpers import child_env, final_weights, free_port, train_command

SMALL = ["model.levels=2", "model.steps=2", "model.width=16", "data.train_size=256", "data.test_size=32",
         "data.batch_size=8", "train.init_batch_size=32", "train.progress=false", "wandb.mode=disabled",
         "train.eval_every=0", "train.sample_every=0", "train.log_every=1", "memory.check_every=0",
         "optim.warmup_steps=3", "optim.ema_decay=0.9"]
# Far more steps than the test lets run: the signal always comes first; the periodic checkpoint
# is never due.
LONG = ["train.steps=100000", "train.checkpoint_every=100000"]


def _logged_steps(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in f.read_text().splitlines() if '"train/bpd"' in line]
    return max(steps, default=0)


def _wait_for_step(proc, run_dir: Path, n: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while _logged_steps(run_dir) < n:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early (rc {proc.returncode}): {proc.communicate()[1][-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"step {n} not reached in {timeout} s")
        time.sleep(0.2)


def _train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return train_command(*SMALL, f"train.run_dir={run_dir}", *extra)


def _uninterrupted(tmp_path, steps: int) -> dict:
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(ref, f"train.steps={steps}", f"train.checkpoint_every={steps}"),
                   env=child_env(tmp_path), check=True, capture_output=True, text=True, timeout=900)
    return final_weights(ref, ema=True)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("signum,twice", [(signal.SIGTERM, False), (signal.SIGUSR1, True)],
                         ids=["sigterm", "sigusr1-twice"])
def test_signal_saves_the_step_reached_and_resume_is_exact(tmp_path, signum, twice):
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(run, *LONG), env=child_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run, 4)
    proc.send_signal(signum)
    if twice:  # a second signal while the checkpoint is being written changes nothing
        time.sleep(0.05)
        proc.send_signal(signum)
        # and a third once the checkpoint is complete, while the process is on its way out
        # (it found the default action restored once, and died by the signal instead of exiting 75)
        while proc.poll() is None and not list_complete(run):
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signum)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    ckpts = list_complete(run)
    assert len(ckpts) == 1, "exactly the preemption checkpoint"
    reached = int(ckpts[0].name.split("_")[1])
    assert reached >= 4 and reached == _logged_steps(run), "the checkpoint is of the last step taken"
    assert f"at step {reached}" in err and "resume" in err and "Traceback" not in err, err[-2000:]
    # Rerun the same command (only the end point changes: no LR decay, so the schedule is the same).
    subprocess.run(_train_cmd(run, f"train.steps={reached + 3}", "train.checkpoint_every=100000"),
                   env=child_env(tmp_path), check=True, capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "train/bpd" in r) == list(range(1, reached + 4)), "no step lost or repeated"
    _same(final_weights(run, ema=True), _uninterrupted(tmp_path, reached + 3))


def test_two_ranks_agree_on_the_step_when_one_is_signalled(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "flowscale.cli", "train", *SMALL, f"train.run_dir={run}", *LONG, "engine.zero_stage=2"]
    proc = subprocess.Popen(cmd, env=child_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run, 3)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = int(pid)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGTERM)  # only rank 1 hears it
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0, "a preempted run does not report success"
    ckpts = list_complete(run)
    assert len(ckpts) == 1 and json.loads((ckpts[0] / "COMPLETE").read_text())["world_size"] == 2
    reached = int(ckpts[0].name.split("_")[1])
    assert reached >= 3 and "stopped by SIGTERM at step" in err, err[-3000:]
