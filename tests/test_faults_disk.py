"""A full disk while checkpointing, on a real tmpfs the test mounts (root only): the save fails
with one line naming the directory, the space the previous checkpoint took and what is free;
the partial checkpoint is removed, the earlier one is untouched, and once space is freed the
same command resumes and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowscale.checkpoint import list_complete
from flowscale.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("single_process_env")

SMALL = ["model.levels=2", "model.steps=2", "model.width=16", "data.train_size=256", "data.test_size=32",
         "data.batch_size=8", "train.init_batch_size=32", "train.progress=false", "wandb.mode=disabled",
         "train.eval_every=0", "train.sample_every=0", "train.log_every=1", "memory.check_every=0",
         "train.checkpoint_every=2", "train.keep_last=5"]


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _digest(d: Path) -> dict:
    return {f.relative_to(d).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in d.rglob("*") if f.is_file()}


def _fill(mnt: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free."""
    filler = mnt / "filler"
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_full_disk_at_a_save_is_one_line_and_loses_nothing(small_disk, tmp_path, capsys):
    run = small_disk / "run"
    argv = ["train", *SMALL, f"train.run_dir={run}"]
    assert cli_main(argv + ["train.steps=2"]) == 0
    first = list_complete(run)[0]
    before = _digest(first)
    ckpt_bytes = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    filler = _fill(small_disk, ckpt_bytes // 3)  # room for a third of the next checkpoint
    capsys.readouterr()

    assert cli_main(argv + ["train.steps=4"]) == 4  # CheckpointWriteError
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flowscale: error: writing checkpoint"), err
    assert "no space left" in err[0] and "step_00000004" in err[0] and "step_00000002" in err[0], err[0]
    assert "free" in err[0] and "previous checkpoint took" in err[0]
    assert [p.name for p in list_complete(run)] == ["step_00000002"]
    assert not (run / "checkpoints" / "step_00000004").exists(), "the partial checkpoint is removed"
    assert _digest(first) == before, "the earlier checkpoint is untouched"

    filler.unlink()  # space freed: the same command resumes from step 2 and finishes
    assert cli_main(argv + ["train.steps=4"]) == 0
    ref = tmp_path / "ref"
    assert cli_main(["train", *SMALL, f"train.run_dir={ref}", "train.steps=4"]) == 0
    a = load_file(str(list_complete(run)[-1] / "model.safetensors"))
    b = load_file(str(list_complete(ref)[-1] / "model.safetensors"))
    assert list_complete(run)[-1].name == "step_00000004"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_space_warning_before_a_save_that_may_fail(small_disk, capsys):
    run = small_disk / "run"
    argv = ["train", *SMALL, f"train.run_dir={run}"]
    assert cli_main(argv + ["train.steps=2"]) == 0
    first = list_complete(run)[0]
    _fill(small_disk, sum(f.stat().st_size for f in first.rglob("*") if f.is_file()) // 2)
    cli_main(argv + ["train.steps=4"])
    assert "the next save may fail" in capsys.readouterr().out
