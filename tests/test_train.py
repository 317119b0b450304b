"""The training loop on the demo data (single process, DeepSpeed on CPU with gloo): bits/dim
fall, outputs land in the run directory, resume continues exactly, the guards hold, and the
eval/sample commands use the exported weights."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flowscale.checkpoint import list_complete
from flowscale.cli import main as cli_main
from flowscale.config import load_config
from flowscale.lock import RunDirLocked, acquire, release
from flowscale.logging import read_metrics
from flowscale.train import main as train_main

from helpers import final_weights

SMALL = ["model.levels=2", "model.steps=2", "model.width=32", "data.train_size=1024", "data.test_size=128",
         "data.batch_size=16", "train.init_batch_size=64", "train.progress=false", "wandb.mode=disabled"]
QUIET = ["train.eval_every=0", "train.sample_every=0"]

pytestmark = pytest.mark.usefixtures("single_process_env")


def small_cfg(run_dir, *extra):
    return load_config(None, SMALL + [f"train.run_dir={run_dir}", *extra])


def test_short_demo_run_lowers_bits_per_dim(tmp_path):
    cfg = small_cfg(tmp_path / "run", "train.steps=150", "train.log_every=10", "optim.warmup_steps=10",
                    "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=150")
    result = train_main(cfg)
    train_bpd = [r["train/bpd"] for r in read_metrics(cfg.train.run_dir) if "train/bpd" in r]
    assert len(train_bpd) == 15
    first, last = sum(train_bpd[:2]) / 2, sum(train_bpd[-2:]) / 2
    assert last < first - 0.5, f"bits/dim did not fall: {train_bpd}"
    assert result["test_bpd"] < 7.0
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml") == cfg
    with Image.open(run / "samples" / "step_00000150.png") as im:
        assert im.size[0] > 32
    assert [p.name for p in list_complete(run)] == ["step_00000150"]
    assert not (run / ".lock").exists(), "the run-dir lock is released at exit"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_train_device_is_honoured(tmp_path):
    from flowscale.config import ConfigError

    # train.device=cuda used to be ignored (training silently ran on whatever was there).
    with pytest.raises(ConfigError, match="train.device"):
        train_main(small_cfg(tmp_path / "run", "train.device=cuda", "train.steps=1"))
    assert not (tmp_path / "run").exists(), "refused before anything was written"


def test_resume_continues_exactly(tmp_path):
    common = ["train.log_every=1", *QUIET, "train.checkpoint_every=6", "optim.warmup_steps=3", "optim.ema_decay=0.9"]
    train_main(small_cfg(tmp_path / "a", "train.steps=12", *common))
    train_main(small_cfg(tmp_path / "b", "train.steps=6", *common))
    train_main(small_cfg(tmp_path / "b", "train.steps=12", *common))
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ema_a = load_file(str(list_complete(tmp_path / "a")[-1] / "ema.safetensors"))
    ema_b = load_file(str(list_complete(tmp_path / "b")[-1] / "ema.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    loss_a = [r["train/bpd"] for r in read_metrics(tmp_path / "a") if "train/bpd" in r]
    loss_b = [r["train/bpd"] for r in read_metrics(tmp_path / "b") if "train/bpd" in r]
    assert loss_a == loss_b and len(loss_a) == 12


def test_no_resume_refuses_existing_run(tmp_path):
    cfg = small_cfg(tmp_path / "run", "train.steps=2", *QUIET)
    train_main(cfg)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train_main(cfg, resume=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_resume_from_a_chosen_checkpoint(tmp_path, capsys):
    # --resume PATH: from another run only with --trust-checkpoint (pickles), exact either way; in the
    # same run, newer checkpoints are set aside (kept) so that later restarts continue the new branch.
    common = ["train.steps=8", "train.checkpoint_every=4", "train.keep_last=5", "train.log_every=1", *QUIET]
    a, b = tmp_path / "a", tmp_path / "b"
    train_main(small_cfg(a, *common))
    mid = a / "checkpoints" / "step_00000004"
    final_a = final_weights(a)
    argv = ["train", *SMALL, *common, f"train.run_dir={b}", "--resume", str(mid)]
    assert cli_main(argv) == 1
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert not b.exists(), "a refused resume writes nothing"
    assert cli_main(argv + ["--trust-checkpoint"]) == 0
    final_b = final_weights(b)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert [r["step"] for r in read_metrics(b) if "train/bpd" in r] == [5, 6, 7, 8]

    train_main(small_cfg(a, *common), resume_from=mid)  # own run: no trust needed
    aside = [p for p in (a / "checkpoints").iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and (aside[0] / "step_00000008" / "COMPLETE").is_file()
    again = final_weights(a)
    assert all(torch.equal(final_a[k], again[k]) for k in final_a)
    with pytest.raises(ValueError, match="contradict"):
        train_main(small_cfg(a, *common), resume=False, resume_from=mid)


def test_keep_last_k(tmp_path):
    train_main(small_cfg(tmp_path / "run", "train.steps=8", "train.checkpoint_every=2", "train.keep_last=2", *QUIET))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["latest", "step_00000006", "step_00000008"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000008"  # DeepSpeed's pointer


def test_incomplete_and_corrupt_checkpoints_are_not_resumed(tmp_path):
    run = tmp_path / "run"
    train_main(small_cfg(run, "train.steps=4", "train.checkpoint_every=2", *QUIET))
    newest = list_complete(run)[-1]
    assert newest.name == "step_00000004"
    model_file = newest / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])  # a truncated file
    partial = run / "checkpoints" / "step_00000006"  # a save that crashed before COMPLETE
    partial.mkdir()
    with pytest.warns(UserWarning, match="unreadable"):
        result = train_main(small_cfg(run, "train.steps=6", "train.checkpoint_every=2", *QUIET))
    assert result["step"] == 6
    rows = [r for r in read_metrics(run) if "train/bpd" in r]
    assert rows[-1]["step"] == 6


def test_non_finite_loss_skips_then_stops_with_the_step(tmp_path):
    cfg = small_cfg(tmp_path / "run", "train.steps=50", "optim.lr=1e4", "optim.warmup_steps=0",
                    "optim.grad_clip=0", *QUIET, "train.checkpoint_every=1000", "engine.max_bad_steps=3")
    with pytest.raises(FloatingPointError, match=r"3 steps in a row \(last at step \d+\)"):
        train_main(cfg)
    assert list_complete(tmp_path / "run") == [], "no checkpoint may be written from bad weights"
    skipped = [r["optim/skipped_steps"] for r in read_metrics(tmp_path / "run") if "optim/skipped_steps" in r]
    assert skipped[-3:] == [skipped[-1] - 2, skipped[-1] - 1, skipped[-1]]


def test_second_job_on_a_run_dir_is_refused(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    # A live process of another "job" holds the lock.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": holder.pid,
                                               "slurm_job_id": None, "started": "now"}))
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid}"):
            train_main(small_cfg(run, "train.steps=1", *QUIET))
    finally:
        holder.kill()
        holder.wait()
    # The holder died: its lock is stale and is taken over.
    lock = acquire(run, log=lambda m: None)
    release(lock)
    assert not (run / ".lock").exists()


def test_eval_and_sample_commands_use_safetensors(tmp_path, capsys):
    run = tmp_path / "run"
    train_main(small_cfg(run, "train.steps=3", *QUIET, "optim.ema_decay=0.5"))
    capsys.readouterr()
    assert cli_main(["eval", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    bpd = float(out.split("bits/dim:")[1].split()[0])
    assert 0 < bpd < 9
    ckpt = list_complete(run)[-1]
    png = tmp_path / "grid.png"
    assert cli_main(["sample", str(ckpt), "--temperatures", "0", "1", "--n", "3", "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size == (3 * 33 + 1, 2 * 33 + 1)
    assert cli_main(["eval", str(tmp_path / "missing")]) == 1
