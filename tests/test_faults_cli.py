"""Expected failures of a real `flowscale train` process are one line and a documented exit
code (no traceback); --debug / FLOWSCALE_DEBUG=1 brings the traceback back; unexpected errors
keep theirs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import child_env, write_split

BASE = ["data.dataset=shards", "data.image_size=8", "data.batch_size=4", "data.shuffle_buffer=0",
        "model.levels=1", "model.steps=1", "model.width=8", "train.steps=5", "train.eval_every=0",
        "train.sample_every=0", "train.init_batch_size=4", "train.progress=false", "wandb.mode=disabled"]


def _run(tmp_path, *args, debug=False):
    env = child_env(tmp_path, **({"FLOWSCALE_DEBUG": "1"} if debug else {}))
    return subprocess.run([sys.executable, "-m", "flowscale.cli", "train", *BASE, *args], env=env,
                          capture_output=True, text=True, timeout=600)


def _bad_split(tmp_path):
    def members(i, key, ms):
        return [(f"{key}.npy", b"not an array")] if i == 5 else ms

    write_split(tmp_path / "train", [8, 8], members=members)
    write_split(tmp_path / "test", [4], split="test")
    return [f"data.train_manifest={tmp_path / 'train'}", f"data.test_manifest={tmp_path / 'test'}",
            f"train.run_dir={tmp_path / 'run'}"]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_sample_is_one_line_with_exit_code_3(tmp_path, workers):
    p = _run(tmp_path, *_bad_split(tmp_path), f"data.num_workers={workers}")
    assert p.returncode == 3, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "UserWarning" not in ln and "warnings.warn" not in ln]
    errors = [ln for ln in lines if ln.startswith("flowscale: error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "t-train-000000.tar" in errors[0] and "s000005" in errors[0] and "bad_data=skip" in errors[0]


def test_debug_shows_the_traceback(tmp_path):
    p = _run(tmp_path, *_bad_split(tmp_path), debug=True)
    assert p.returncode != 0 and "Traceback" in p.stderr and "DataError" in p.stderr


def test_config_and_missing_manifest_codes(tmp_path):
    p = _run(tmp_path, "model.levels=nope")
    assert p.returncode == 2 and p.stderr.strip().startswith("flowscale: error: ") and "model.levels" in p.stderr
    p = _run(tmp_path, f"data.train_manifest={tmp_path / 'none'}", f"data.test_manifest={tmp_path / 'none'}",
             f"train.run_dir={tmp_path / 'run'}")
    assert p.returncode == 3 and "manifest" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
