"""Resuming with a different config: what may change is printed in one line, what may not
(the model, the data stream and its order, the ZeRO layout, the number of ranks) is refused
with the field and the way out, before anything in the run directory is written."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowscale.checkpoint import list_complete
from flowscale.cli import main as cli_main

from helpers import free_port

SMALL = ["model.levels=2", "model.steps=1", "model.width=8", "data.train_size=64", "data.test_size=16",
         "data.batch_size=8", "train.init_batch_size=16", "train.progress=false", "wandb.mode=disabled",
         "train.eval_every=0", "train.sample_every=0", "memory.check_every=0", "data.streams=0"]
# data.streams=0: the per-rank order, whose rank count is fixed (a new run's default choice is elastic)

pytestmark = pytest.mark.usefixtures("single_process_env")


def _snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("MASTER_ADDR", "127.0.0.1")
    mp.setenv("MASTER_PORT", str(free_port()))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        mp.delenv(k, raising=False)
    try:
        assert cli_main(["train", *SMALL, f"train.run_dir={run}", "train.steps=2"]) == 0
    finally:
        mp.undo()
    return run


@pytest.mark.parametrize("override,field", [
    ("model.width=16", "model.width"),
    ("data.batch_size=16", "data.batch_size"),
    ("data.seed=1", "data.seed"),
    ("engine.precision=bf16", "engine.precision"),
])
def test_a_change_that_cannot_be_honoured_is_refused_before_anything_is_written(trained, capsys, override, field):
    before = _snapshot(trained)
    rc = cli_main(["train", *SMALL, f"train.run_dir={trained}", "train.steps=4", override])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"config field '{field}'" in err and "cannot change on resume" in err and "new train.run_dir" in err
    assert len(err.strip().splitlines()) == 1, err
    assert _snapshot(trained) == before, "nothing in the run directory was written"


def test_allowed_changes_are_printed_once_and_training_goes_on(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", *SMALL, f"train.run_dir={run}", "train.steps=2"]) == 0
    capsys.readouterr()
    assert cli_main(["train", *SMALL, f"train.run_dir={run}", "train.steps=3", "optim.lr=0.0005"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "with changed settings" in line]
    assert lines == ["resuming step_00000002 with changed settings: optim.lr 0.001 -> 0.0005, train.steps 2 -> 3"]
    assert [p.name for p in list_complete(run)][-1] == "step_00000003"


def test_another_number_of_ranks_is_refused_with_the_way_out(trained):
    before = _snapshot(trained)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "-m", "flowscale.cli", "train", *SMALL,
                        f"train.run_dir={trained}", "train.steps=4"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode != 0
    assert "was written by 1 ranks and this run has 2" in p.stderr and "resume on 1 ranks" in p.stderr, p.stderr[-2000:]
    ours = [line for line in p.stderr.splitlines() if line.startswith("flowscale: error:")]
    assert len(ours) == 1, p.stderr[-2000:]  # rank 0's one line (torchrun adds its own report after it)
    assert _snapshot(trained) == before, "nothing in the run directory was written"


def test_the_restore_plan_comes_from_the_files_and_submit_asks_the_same(trained, capsys):
    """plan_restore decides from config.yaml and COMPLETE alone (no engine): which checkpoint, what
    changed, no universal conversion on the same layout, each rank's own rank file; an outside
    checkpoint only when trusted; `flowscale submit`'s check is the same plan."""
    from flowscale.config import load_config
    from flowscale.restore import plan_restore, rank_file
    from launch.submit import check_resume

    newest = list_complete(trained)[-1]
    cfg = load_config(None, [*SMALL, f"train.run_dir={trained}", "train.steps=4"])
    plan = plan_restore(cfg, 1)
    assert (plan.checkpoint, plan.chosen, plan.universal, plan.written_by) == (newest, False, False, 1)
    assert plan.changes == ["train.steps 2 -> 4"] and plan.notes() == [
        "resuming step_00000002 with changed settings: train.steps 2 -> 4"]
    assert str(newest) in str(plan) and "train.steps 2 -> 4" in str(plan)
    assert rank_file(newest, 0, 1) == newest / "rank_00000.pt"
    assert plan_restore(cfg, 1, resume=False).checkpoint is None
    assert check_resume(cfg, 1) == plan.differences == ["train.steps 2 -> 4"]
    assert f"the job resumes {newest} with: train.steps 2 -> 4" in capsys.readouterr().out

    elsewhere = load_config(None, [*SMALL, f"train.run_dir={trained.parent / 'elsewhere'}", "train.steps=4"])
    with pytest.raises(PermissionError, match="--trust-checkpoint"):
        plan_restore(elsewhere, 1, resume_from=trained)
    chosen = plan_restore(elsewhere, 1, resume_from=trained, trust=True)
    assert (chosen.checkpoint, chosen.chosen) == (newest, True)
    with pytest.raises(ValueError, match="contradict"):
        plan_restore(cfg, 1, resume=False, resume_from=newest)
    assert not (trained.parent / "elsewhere").exists(), "planning writes nothing"


def test_a_deepspeed_outside_the_supported_range_is_refused_in_one_line():
    """The DeepSpeed checkpoint layout flowscale rewrites is 0.19's: the installed version passes,
    others are refused naming the range, and pyproject pins the same range."""
    import re

    from flowscale.deepspeed_universal import SUPPORTED, UnsupportedDeepSpeed, check_version

    check_version()  # the installed one
    check_version("0.19.0")
    for version in ("0.18.9", "0.20.0", "1.0.0"):
        with pytest.raises(UnsupportedDeepSpeed, match=re.escape(f"supports deepspeed{SUPPORTED}")) as e:
            check_version(version)
        assert len(str(e.value).splitlines()) == 1 and version in str(e.value)
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.findall(r'"(deepspeed[^"]*)"', pyproject) == [f"deepspeed{SUPPORTED}"]
