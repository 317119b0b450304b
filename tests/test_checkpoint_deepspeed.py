"""A flowscale run's checkpoints as DeepSpeed's own tools see them: DeepSpeed's ``latest`` pointer,
and ``zero_to_fp32.py`` (which DeepSpeed copies beside the checkpoints) run exactly as DeepSpeed
documents it, without ``--tag``, giving every tensor of model.safetensors bit for bit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import SMALL_RUN, child_env, train_command

from flowscale.checkpoint import LATEST, list_complete, point_latest, set_aside_newer


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_to_fp32_without_tag_equals_model_safetensors(tmp_path, stage):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    # keep_last=1 with a save every step: step 1 is pruned, "latest" must name step 2.
    cmd = train_command(*SMALL_RUN, f"train.run_dir={run_dir}", "data.train_size=64", "data.test_size=16",
                        "data.batch_size=8", "train.init_batch_size=16", "train.steps=2", "train.checkpoint_every=1",
                        "train.keep_last=1", f"engine.zero_stage={stage}", nproc=2)
    p = subprocess.run(cmd, env=child_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert [c.name for c in list_complete(run_dir)] == ["step_00000002"]
    assert (ckpts / LATEST).read_text() == "step_00000002"

    out = tmp_path / "fp32"  # DeepSpeed's documented invocation: python zero_to_fp32.py <checkpoint_dir> <output_dir>
    p = subprocess.run([sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(out)],
                       env=child_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    theirs = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    ours = load_file(str(ckpts / "step_00000002" / "model.safetensors"))
    assert theirs.keys() == ours.keys() and len(ours) > 20
    differ = [k for k in ours if theirs[k].dtype != ours[k].dtype or not torch.equal(theirs[k], ours[k])]
    assert not differ, f"{len(differ)} of {len(ours)} tensors differ: {differ[:5]}"


def test_latest_follows_the_complete_checkpoints(tmp_path):
    """The pointer names the newest COMPLETE checkpoint: not a newer partial one, not one set aside,
    and it is removed when none is left."""
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (ckpts / f"step_{step:08d}").mkdir(parents=True)
    for step in (1, 2):
        (ckpts / f"step_{step:08d}" / "COMPLETE").write_text("{}")
    assert point_latest(tmp_path) == "step_00000002" and (ckpts / LATEST).read_text() == "step_00000002"
    set_aside_newer(tmp_path, 1)  # resuming from step 1: step 2 moves out of sight, and so does "latest"
    assert (ckpts / LATEST).read_text() == "step_00000001"
    (ckpts / "step_00000001" / "COMPLETE").unlink()
    assert point_latest(tmp_path) is None and not (ckpts / LATEST).exists()
    assert not list(ckpts.glob(".latest.tmp-*")), "no temporary file left behind"
