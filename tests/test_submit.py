"""`flowscale submit` pieces that need no cluster: the sbatch script of --dry-run, sweep files,
the rendezvous port, and the Slurm environment mapping of a bare srun task."""

import zlib

import pytest

from helpers import clear_env
from flowscale.cli import main as cli_main
from flowscale.distributed import dist_env, master_port
from launch.submit import load_sweep


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
