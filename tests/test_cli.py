"""The `flowscale` command line: overrides after options and --debug on every command, the
start-up line naming the data, and `prep --help` stating the encoding rule the code follows."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from flowscale.cli import build_parser, main as cli_main
from flowscale.config import ConfigError
from flowscale.logging import read_metrics

from helpers import write_split


@pytest.mark.parametrize("argv, dest, expected", [
    (["train", "demo", "--no-resume", "train.steps=1", "--resume", "r", "optim.lr=0.1"], "args",
     ["demo", "train.steps=1", "optim.lr=0.1"]),
    (["bound", "demo", "--split", "test", "data.image_size=16"], "args", ["demo", "data.image_size=16"]),
    (["submit", "demo", "--nodes", "2", "train.steps=3", "--dry-run", "optim.lr=1"], "args",
     ["demo", "train.steps=3", "optim.lr=1"]),
    (["plan", "demo", "--gpus", "2", "model.width=8"], "args", ["demo", "model.width=8"]),
    (["bench", "reproduce", "demo", "--steps", "3", "model.width=8"], "overrides", ["model.width=8"]),
])
def test_overrides_may_follow_options(argv, dest, expected):
    assert getattr(build_parser().parse_args(argv), dest) == expected


@pytest.mark.parametrize("argv", [["--debug", "train"], ["train", "--debug"], ["train", "demo", "--debug", "a.b=1"],
                                  ["eval", "run", "--debug"], ["prep", "verify", "shards", "--debug"],
                                  ["bench", "reproduce", "demo", "--debug"]])
def test_debug_is_taken_anywhere(argv):
    assert build_parser().parse_args(argv).debug is True


def test_debug_after_the_command_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("FLOWSCALE_DEBUG", raising=False)
    assert cli_main(["train", "model.levels=nope"]) == 2
    assert capsys.readouterr().err.startswith("flowscale: error: config field 'model.levels'")
    for argv in (["train", "model.levels=nope", "--debug"], ["--debug", "train", "model.levels=nope"],
                 ["bound", "--debug", "model.levels=nope"]):
        with pytest.raises(ConfigError, match="model.levels"):
            cli_main(argv)


def test_train_overrides_after_an_option_and_the_start_up_line_names_the_data(tmp_path, capsys, single_process_env):
    write_split(tmp_path / "train", [6, 6])
    write_split(tmp_path / "test", [5], split="test")
    run = tmp_path / "run"
    common = ["data.dataset=shards", f"data.train_manifest={tmp_path / 'train'}", "data.image_size=8",
              "data.batch_size=4", "data.shuffle_buffer=0", "model.levels=1", "model.steps=1", "model.width=8",
              "train.init_batch_size=4", "train.progress=false", "train.log_every=1", "train.eval_every=0",
              "train.sample_every=0", "wandb.mode=disabled", f"train.run_dir={run}"]
    rc = cli_main(["train", *common, "--no-resume", f"data.test_manifest={tmp_path / 'test'}", "train.steps=1",
                   "--debug", "train.steps=2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run) if "train/bpd" in r] == [1, 2], "the last override wins"
    line = next(ln for ln in out.splitlines() if ln.startswith("data:"))
    assert f"data: shards, train 12 images ({tmp_path / 'train' / 'manifest.json'}), test 5 images" in line, line
    assert "3x8x8 8-bit" in line


def test_prep_help_states_the_encoding_threshold_the_code_uses(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["prep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    stated = int(re.search(r"--encoding auto \(the default\) writes raw \.npy for images of at most (\d+) px per "
                           r"side and PNG for larger ones", text).group(1))
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (stated + 8, stated + 8, 3), dtype=np.uint8)).save(src / f"{i}.png")
    for px, encoding in ((stated, "npy"), (stated + 1, "png")):
        assert cli_main(["prep", "folder", str(src), str(tmp_path / str(px)), "--resolution", str(px),
                         "--workers", "1", "--no-progress"]) == 0
        assert json.loads((tmp_path / str(px) / "train" / "manifest.json").read_text())["encoding"] == encoding


def test_a_stale_egg_info_in_the_working_directory_hides_no_command(tmp_path):
    """``python -m`` puts the working directory first on sys.path, so an old ``flowscale.egg-info``
    there (no entry_points.txt) is the flowscale importlib.metadata reads first; ``submit`` and
    ``prep`` (entry points of the installed flowscale) must still be commands."""
    import subprocess
    import sys

    stale = tmp_path / "flowscale.egg-info"
    stale.mkdir()
    (stale / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: flowscale\nVersion: 0.0.1\n")
    probe = "import importlib.metadata as m; print(m.distribution('flowscale').version)"
    shadowed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert shadowed.stdout.strip() == "0.0.1", shadowed  # the stale metadata is what importlib reads first
    for command in ("submit", "prep"):
        p = subprocess.run([sys.executable, "-m", "flowscale.cli", command, "--help"], cwd=tmp_path,
                           capture_output=True, text=True)
        assert p.returncode == 0 and f"usage: flowscale {command}" in p.stdout, p.stderr[-2000:]
