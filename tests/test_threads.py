"""Threads per process (flowscale.distributed.cpu_threads): a task takes the CPUs it may run on,
not every core of the node. Each case runs in a fresh process with a real affinity mask
(sched_setaffinity) and the launcher variables Slurm / torchrun would set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flowscale.config import ConfigError, load_config

PROBE = ("import torch; from flowscale.distributed import cpu_threads; "
         "n, why = cpu_threads({requested}, {workers}); torch.set_num_threads(n); "
         "print(torch.get_num_threads(), '|', why)")
LAUNCHER_VARS = ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "SLURM_NTASKS_PER_NODE", "SLURM_CPUS_ON_NODE",
                 "LOCAL_WORLD_SIZE")


def _probe(cpus: set[int], env: dict, requested: int = 0, workers: int = 0) -> tuple[int, str]:
    full = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE.format(requested=requested, workers=workers)], env=full,
                         preexec_fn=lambda: os.sched_setaffinity(0, cpus), capture_output=True, text=True,
                         check=True, timeout=120).stdout
    n, why = out.strip().split(" | ")
    return int(n), why


TWO = {0, 1}
needs_two = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs for a 2-CPU mask")


@needs_two
@pytest.mark.parametrize("cpus,env,requested,workers,expect,reason", [
    (TWO, {}, 0, 0, 2, "2 CPUs in this process's affinity mask"),
    ({0}, {}, 0, 0, 1, "1 CPUs in this process's affinity mask"),
    (TWO, {"SLURM_CPUS_PER_TASK": "1"}, 0, 0, 1, "SLURM_CPUS_PER_TASK=1"),
    # two tasks that see the node's whole allocation (no CPU binding) share it
    (TWO, {"SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "2"}, 0, 0, 1, "shared by 2 processes"),
    (TWO, {"LOCAL_WORLD_SIZE": "2"}, 0, 0, 1, "shared by 2 processes"),
    (TWO, {}, 0, 1, 1, "less 1 data.num_workers"),
    (TWO, {"OMP_NUM_THREADS": "1"}, 0, 0, 1, "OMP_NUM_THREADS=1"),
    (TWO, {"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "2"}, 2, 0, 2, "engine.threads=2"),
], ids=["mask-2", "mask-1", "slurm-cpus-per-task", "slurm-shared-node", "torchrun-local-world", "workers",
        "omp", "explicit"])
def test_threads_follow_the_cpus_the_task_may_use(cpus, env, requested, workers, expect, reason):
    n, why = _probe(cpus, env, requested, workers)
    assert n == expect and reason in why, (n, why)


def test_train_prints_and_applies_its_choice(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and k not in ("RANK", "WORLD_SIZE")}
    env.update(SLURM_CPUS_PER_TASK="1", DS_ACCELERATOR="cpu", TMPDIR=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "flowscale.cli", "train", "model.levels=2", "model.steps=1",
                        "model.width=8", "data.train_size=64", "data.test_size=16", "data.batch_size=8",
                        "train.init_batch_size=16", "train.steps=1", "train.progress=false", "wandb.mode=disabled",
                        "train.eval_every=0", "train.sample_every=0", f"train.run_dir={tmp_path / 'run'}"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if line.startswith("threads per process")]
    why = "SLURM_CPUS_PER_TASK=1" if len(os.sched_getaffinity(0)) > 1 else "1 CPUs in this process's affinity mask"
    assert lines == [f"threads per process: 1 ({why})"], p.stdout[-2000:]


def test_a_negative_thread_count_is_refused():
    with pytest.raises(ConfigError, match="engine.threads"):
        load_config(None, ["engine.threads=-1"])
