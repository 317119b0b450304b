"""Multi-process training through real launchers (torchrun, DeepSpeed on gloo), exact resume
after SIGKILL, and W&B offline tracking."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import SMALL_RUN, child_env, clear_env, final_weights, free_port, last_by_step, train_command


def train_cmd(nproc, run_dir, *overrides):
    return train_command(*SMALL_RUN, f"train.run_dir={run_dir}", *overrides, nproc=nproc)


def run(cmd, tmp_path, timeout=300):
    p = subprocess.run(cmd, env=child_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_stages_two_ranks(tmp_path, stage, precision):
    run_dir = tmp_path / "run"
    run(train_cmd(2, run_dir, "train.steps=8", f"engine.zero_stage={stage}", f"engine.precision={precision}",
                  "optim.lr=2e-3", "train.checkpoint_every=8"), tmp_path)
    bpd = last_by_step(run_dir)
    assert len(bpd) == 8 and all(v == v and v < 20 for v in bpd.values())
    assert sum(list(bpd.values())[-2:]) < sum(list(bpd.values())[:2]), bpd
    assert last_by_step(run_dir, "ranks_agree") == {8: 1}
    w = final_weights(run_dir)
    assert all(torch.isfinite(t).all() for t in w.values() if t.is_floating_point())


def kill_after_checkpoint(cmd, tmp_path, run_dir, step):
    marker = Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "COMPLETE"
    p = subprocess.Popen(cmd, env=child_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    deadline = time.time() + 240
    while not marker.exists():
        assert p.poll() is None, "training ended before it could be killed: " + p.stdout.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    assert p.poll() is None, "the run finished before the SIGKILL; the test needs a longer run"
    os.killpg(p.pid, signal.SIGKILL)  # no clean exit, for every process of the job
    p.wait()
    assert p.returncode == -signal.SIGKILL


@pytest.mark.parametrize("nproc, stage", [(1, 0), (2, 2)])
def test_exact_resume_after_sigkill(tmp_path, nproc, stage):
    common = [f"engine.zero_stage={stage}", "train.steps=60", "train.checkpoint_every=20", "optim.ema_decay=0.9"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(train_cmd(nproc, straight, *common), tmp_path)
    kill_after_checkpoint(train_cmd(nproc, killed, *common), tmp_path, killed, 20)
    assert not (killed / "checkpoints" / "step_00000060").exists()
    run(train_cmd(nproc, killed, *common), tmp_path)  # resumes by default
    a, b = final_weights(straight), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = last_by_step(straight), last_by_step(killed)
    assert len(la) == 60 and la == lb


def test_wandb_offline_run_id_persists_and_no_secrets(tmp_path):
    run_dir = tmp_path / "run"
    secret = "wandb-secret-4c1f9e0d"
    env = child_env(tmp_path, WANDB_API_KEY=secret, WANDB_MODE="offline")
    cmd = train_cmd(1, run_dir, "wandb.mode=offline", "train.sample_every=2", "train.steps=2", "train.checkpoint_every=2")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert list(runs[0].glob("*.wandb")), "no offline W&B history written"
    cmd2 = train_cmd(1, run_dir, "wandb.mode=offline", "train.sample_every=2", "train.steps=4", "train.checkpoint_every=2")
    p = subprocess.run(cmd2, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs), "the resumed job must continue the W&B run"
    leaked = [str(f) for f in run_dir.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]
    assert not leaked, f"secret written to {leaked}"


def test_deepspeed_launcher(tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "flowscale.cli", "train",
           *SMALL_RUN, f"train.run_dir={run_dir}", "train.steps=3", "engine.zero_stage=1"]
    p = run(cmd, tmp_path)
    assert p.stdout.count("done: step 3") == 1, "only rank 0 reports"
    assert last_by_step(run_dir, "ranks_agree") == {3: 1}


def test_eval_across_ranks_matches_one_rank(tmp_path):
    run_dir = tmp_path / "run"
    run(train_cmd(1, run_dir, "train.steps=2"), tmp_path)
    one = run([sys.executable, "-m", "flowscale.cli", "eval", str(run_dir), "--device", "cpu", "--batch-size", "8"],
              tmp_path).stdout
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "flowscale.cli", "eval", str(run_dir), "--device", "cpu", "--batch-size", "8"], tmp_path).stdout
    b1 = float(one.split("bits/dim:")[1].split()[0])
    b2 = float(two.split("bits/dim:")[1].split()[0])
    assert "2 rank(s)" in two and two.count("bits/dim:") == 1
    assert abs(b1 - b2) <= 1.5e-4, (b1, b2)  # printed with 4 decimals


def test_bench_step_command(tmp_path):
    p = run([sys.executable, "-m", "flowscale.cli", "bench", "step", "model.levels=2", "model.steps=2",
             "model.width=16", "data.train_size=256", "data.batch_size=8", "--steps", "2", "--warmup", "1"], tmp_path)
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and "case" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["torch", "deepspeed", "ds+inverse"]
    assert all("error" not in r for r in rows)
    assert all(float(r.split("|")[2]) > 0 for r in rows)


def test_dist_env_single_process_without_rendezvous(monkeypatch):
    # RANK/WORLD_SIZE left by an earlier run but no MASTER_*: a lone process still gets a loopback rendezvous;
    # two ranks without MASTER_* are refused with a message naming the variables.
    from flowscale.distributed import dist_env

    clear_env(monkeypatch, "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_RANK")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    info = dist_env()
    assert (info.rank, info.world_size) == (0, 1)
    assert info.master_addr == "127.0.0.1" and info.master_port > 0
    assert info.init_method == f"tcp://127.0.0.1:{info.master_port}"
    assert "MASTER_ADDR" not in os.environ and "MASTER_PORT" not in os.environ  # read, never written
    monkeypatch.setenv("MASTER_PORT", "29500")  # a port but no address
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR and MASTER_PORT"):
        dist_env()
