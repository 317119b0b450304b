"""`flowscale submit` on a machine without Slurm: the sbatch script of --dry-run (arrays
included), the refusal of a real submit, --local, CPUs per task, --slurm options, sweep files,
the rendezvous port, and the Slurm environment mapping of a bare srun task. "Without Slurm" is
a child process whose PATH holds only this Python's directory (no sbatch, no srun); the same
script against the real sbatch is checked in test_slurm.py."""

import os
import shutil
import subprocess
import sys
import zlib

import pytest

from helpers import child_env, clear_env
from flowscale.cli import main as cli_main
from flowscale.distributed import dist_env, master_port
from launch.submit import SLURM_COMMANDS, load_sweep

TINY = ["model.levels=1", "model.steps=1", "model.width=8", "data.image_size=8", "data.train_size=16",
        "data.test_size=8", "data.batch_size=4", "train.init_batch_size=4", "train.progress=false",
        "wandb.mode=disabled", "train.eval_every=0", "train.sample_every=0", "train.steps=1"]


def _without_slurm(tmp_path, *args):
    """`flowscale submit ARGS` in a child process that finds no Slurm command on its PATH."""
    bin_dir = os.path.dirname(sys.executable)
    assert not any(shutil.which(c, path=bin_dir) for c in SLURM_COMMANDS), f"{bin_dir} holds Slurm commands"
    env = child_env(tmp_path, PATH=bin_dir, XDG_CACHE_HOME=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "flowscale.cli", "submit", *args], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)


def test_without_slurm_dry_run_prints_the_array_script_and_a_submit_refuses(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("- {optim.lr: 0.001}\n- {optim.lr: 0.0005}\n- {optim.lr: 0.0002}\n")
    run = tmp_path / "run"
    p = _without_slurm(tmp_path, "demo", f"train.run_dir={run}", "--array", str(sweep), "--dry-run")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stdout.startswith("#!/bin/bash\n") and "#SBATCH --array=0-2%3\n" in p.stdout, p.stdout
    assert f"--output={run}/submitit/%A_%a_0_log.out" in p.stdout, "array logs are named per task"
    assert f"array task 2: optim.lr=0.0002 train.run_dir={run}/sweep_002" in p.stderr, p.stderr
    assert not run.exists(), "a dry run writes nothing"

    p = _without_slurm(tmp_path, "demo", f"train.run_dir={run}", "train.steps=3")  # a real submit
    errors = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(errors) == 1, p.stderr[-3000:]
    assert errors[0].startswith("flowscale: error: no Slurm on this machine (sbatch and srun not on PATH)")
    assert "--local" in errors[0]
    assert not run.exists(), "nothing was started or written"


def test_without_slurm_local_runs_the_job_here(tmp_path):
    run = tmp_path / "run"
    p = _without_slurm(tmp_path, *TINY, f"train.run_dir={run}", "--local", "--wait")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on this machine (submitit's local executor)" in p.stdout and "'step': 1" in p.stdout, p.stdout
    assert (run / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    (log,) = (run / "submitit").glob("*_0_log.out")
    assert "data: demo photos (scikit-image), train 16 images (" in log.read_text(), "the start-up line names the data"


def test_a_sweep_of_one_is_a_plain_job(tmp_path, capsys):
    sweep = tmp_path / "one.yaml"
    sweep.write_text("- {optim.lr: 0.001}\n")
    assert cli_main(["submit", "demo", f"train.run_dir={tmp_path / 'run'}", "--array", str(sweep), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--array" not in out and f"{tmp_path / 'run'}/submitit/%j_0_log.out" in out  # as submitit submits it


@pytest.mark.parametrize("given, cpus", [([], 4), (["engine.threads=2"], 5), (["--cpus-per-task", "7"], 7)])
def test_cpus_per_task_follow_the_loader_workers(tmp_path, capsys, given, cpus):
    rc = cli_main(["submit", "demo", f"train.run_dir={tmp_path / 'run'}", "--dry-run", "data.num_workers=3", *given])
    assert rc == 0
    out, err = capsys.readouterr()
    assert f"#SBATCH --cpus-per-task={cpus}\n" in out
    assert f"cpus per task: {cpus} (" in err


def test_slurm_options_reach_the_script(tmp_path, capsys):
    rc = cli_main(["submit", "demo", f"train.run_dir={tmp_path / 'run'}", "--slurm", "requeue", "--slurm",
                   "qos=high", "--slurm=--mail-type=END", "--mem-gb", "16", "--dry-run"])
    assert rc == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --requeue", "#SBATCH --qos=high", "#SBATCH --mail-type=END", "#SBATCH --mem=16GB"):
        assert line + "\n" in out, line
    for bad, says in (("cpus-per-task=2", "set by --cpus-per-task"), ("output=x", "submitit"),
                      ("two words", "not an sbatch option"), ("qos=", "not an sbatch option")):
        with pytest.raises(SystemExit) as e:
            cli_main(["submit", "demo", "--slurm", bad, "--dry-run"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err.splitlines()[-1], err
    with pytest.raises(SystemExit):
        cli_main(["submit", "--help"])
    assert "--slurm requeue" in capsys.readouterr().out, "--help shows how to add --requeue"


def test_local_with_dry_run_or_nodes_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["submit", "demo", "--local", "--dry-run"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert cli_main(["submit", "demo", f"train.run_dir={tmp_path / 'run'}", "--local", "--nodes", "2"]) == 2
    assert "one node" in capsys.readouterr().err


def test_dry_run_prints_the_sbatch_script(tmp_path, capsys):
    rc = cli_main(["submit", "configs/demo.yaml", f"train.run_dir={tmp_path / 'run'}", "--nodes", "2",
                   "--gpus-per-node", "8", "--partition", "gpu", "--time", "1440", "--account", "acct",
                   "--constraint", "a100", "--signal-delay", "90", "--dry-run"])
    assert rc == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1440", "#SBATCH --account=acct",
                 "#SBATCH --constraint=a100", "#SBATCH --signal=USR2@90"):
        assert line in out, line
    assert str(tmp_path / "run" / "submitit") in out, "logs go to <run_dir>/submitit"
    assert not (tmp_path / "run" / "checkpoints").exists(), "a dry run starts nothing"


def test_dry_run_takes_a_bundled_config_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert cli_main(["submit", "glow_imagenet64", f"train.run_dir={tmp_path / 'run'}", "--gpus-per-node", "8",
                     "--dry-run"]) == 0
    assert "#SBATCH --ntasks-per-node=8" in capsys.readouterr().out
    assert cli_main(["submit", "glow_imagenet65", "--dry-run"]) == 2
    assert "glow_imagenet64" in capsys.readouterr().err  # the error lists the bundled names


def test_sweep_file(tmp_path):
    good = tmp_path / "sweep.yaml"
    good.write_text("- {optim.lr: 0.001}\n- {optim.lr: 0.0005, model.width: 64}\n")
    assert load_sweep(str(good)) == [{"optim.lr": 0.001}, {"optim.lr": 0.0005, "model.width": 64}]
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim.lr: 0.001\n")
    with pytest.raises(ValueError, match="non-empty YAML list"):
        load_sweep(str(bad))


def test_master_port_is_stable_and_below_the_ephemeral_range():
    ports = {master_port(str(j)) for j in range(1, 5000)}
    assert all(15000 <= p < 30000 for p in ports) and len(ports) > 3000
    assert master_port("4242") == 15000 + zlib.crc32(b"4242") % 15000 == master_port(4242)


def test_bare_srun_task_environment(monkeypatch):
    clear_env(monkeypatch, "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[012-015,020],cpu01")
    info = dist_env()
    import os

    assert (info.rank, info.world_size, info.local_rank) == (3, 8, 1)
    assert info.master_addr == "gpu012" and info.master_port == master_port("777")
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)  # nothing written
