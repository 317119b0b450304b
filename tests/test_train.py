"""The single-process training loop on the demo data: bits/dim fall, outputs land in the run
directory, resume continues exactly, and the eval/sample commands use the checkpoint."""

import json

import pytest
import torch
from PIL import Image

from flowscale.checkpoint import list_checkpoints, load_checkpoint
from flowscale.cli import main as cli_main
from flowscale.config import load_config
from flowscale.logging import read_metrics
from flowscale.train import main as train_main

SMALL = ["model.levels=2", "model.steps=2", "model.width=32", "data.train_size=1024", "data.test_size=128",
         "data.batch_size=16", "train.init_batch_size=64", "train.progress=false"]


def small_cfg(run_dir, *extra):
    return load_config(None, SMALL + [f"train.run_dir={run_dir}", *extra])


def test_short_demo_run_lowers_bits_per_dim(tmp_path):
    cfg = small_cfg(tmp_path / "run", "train.steps=150", "train.log_every=10", "optim.warmup_steps=10",
                    "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=150")
    result = train_main(cfg)
    train_bpd = [r["bpd"] for r in read_metrics(cfg.train.run_dir) if "bpd" in r]
    assert len(train_bpd) == 15
    first, last = sum(train_bpd[:2]) / 2, sum(train_bpd[-2:]) / 2
    assert last < first - 0.5, f"bits/dim did not fall: {train_bpd}"
    assert result["test_bpd"] < 7.0
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml") == cfg
    with Image.open(run / "samples" / "step_00000150.png") as im:
        assert im.size[0] > 32
    assert [p.name for p in list_checkpoints(run)] == ["step_00000150.pt"]


def test_resume_continues_exactly(tmp_path):
    common = ["train.log_every=1", "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=6",
              "optim.warmup_steps=3"]
    straight = small_cfg(tmp_path / "a", "train.steps=12", *common)
    train_main(straight)
    half = small_cfg(tmp_path / "b", "train.steps=6", *common)
    train_main(half)
    resumed = small_cfg(tmp_path / "b", "train.steps=12", *common)
    train_main(resumed)
    a = load_checkpoint(list_checkpoints(tmp_path / "a")[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / "b")[-1])
    assert a["step"] == b["step"] == 12
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    loss_a = [r["bpd"] for r in read_metrics(tmp_path / "a") if "bpd" in r]
    loss_b = [r["bpd"] for r in read_metrics(tmp_path / "b") if "bpd" in r]
    assert loss_a == loss_b and len(loss_a) == 12


def test_no_resume_refuses_existing_run(tmp_path):
    cfg = small_cfg(tmp_path / "run", "train.steps=2", "train.eval_every=0", "train.sample_every=0")
    train_main(cfg)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train_main(cfg, resume=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_keep_last_and_atomic_names(tmp_path):
    cfg = small_cfg(tmp_path / "run", "train.steps=8", "train.checkpoint_every=2", "train.keep_last=2",
                    "train.eval_every=0", "train.sample_every=0")
    train_main(cfg)
    names = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert sorted(names) == ["step_00000006.pt", "step_00000008.pt"]


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    cfg = small_cfg(tmp_path / "run", "train.steps=4", "train.checkpoint_every=2", "train.eval_every=0",
                    "train.sample_every=0")
    train_main(cfg)
    newest = list_checkpoints(tmp_path / "run")[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a crash
    with pytest.warns(UserWarning, match="unreadable"):
        result = train_main(small_cfg(tmp_path / "run", "train.steps=4", "train.checkpoint_every=2",
                                      "train.eval_every=0", "train.sample_every=0"))
    assert result["step"] == 4


def test_non_finite_loss_stops_with_the_step(tmp_path):
    cfg = small_cfg(tmp_path / "run", "train.steps=50", "optim.lr=1e4", "optim.warmup_steps=0",
                    "optim.grad_clip=0", "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=1000")
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        train_main(cfg)
    assert list_checkpoints(tmp_path / "run") == [], "no checkpoint may be written from bad weights"


def test_eval_and_sample_commands(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = small_cfg(run, "train.steps=3", "train.eval_every=0", "train.sample_every=0")
    train_main(cfg)
    capsys.readouterr()
    assert cli_main(["eval", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    bpd = float(out.split("bits/dim:")[1].split()[0])
    assert 0 < bpd < 9
    ckpt = list_checkpoints(run)[-1]
    png = tmp_path / "grid.png"
    assert cli_main(["sample", str(ckpt), "--temperatures", "0", "1", "--n", "3", "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size == (3 * 33 + 1, 2 * 33 + 1)
    assert cli_main(["eval", str(tmp_path / "missing")]) == 1
