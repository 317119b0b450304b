"""Threads per process (flowscale.threads.cpu_threads): a task takes the CPUs it may run on,
not every core of the node. Each case runs in a fresh process with a real affinity mask
(sched_setaffinity) and the launcher variables Slurm / torchrun would set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flowscale.config import ConfigError, load_config

LAUNCHER_VARS = ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "SLURM_NTASKS_PER_NODE", "SLURM_CPUS_ON_NODE",
                 "LOCAL_WORLD_SIZE")
TWO = {0, 1}
CASES = [  # (affinity mask, launcher variables, engine.threads, data.num_workers, expected threads, reason)
    (TWO, {}, 0, 0, 2, "2 CPUs in this process's affinity mask"),
    ({0}, {}, 0, 0, 1, "1 CPUs in this process's affinity mask"),
    (TWO, {"SLURM_CPUS_PER_TASK": "1"}, 0, 0, 1, "SLURM_CPUS_PER_TASK=1"),
    # two tasks that see the node's whole allocation (no CPU binding) share it
    (TWO, {"SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "2"}, 0, 0, 1, "shared by 2 processes"),
    (TWO, {"LOCAL_WORLD_SIZE": "2"}, 0, 0, 1, "shared by 2 processes"),
    (TWO, {}, 0, 1, 1, "less 1 data.num_workers"),
    (TWO, {"OMP_NUM_THREADS": "1"}, 0, 0, 1, "OMP_NUM_THREADS=1"),
    (TWO, {"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "2"}, 2, 0, 2, "engine.threads=2"),
]
# One fresh process runs every case: the mask (sched_setaffinity) and the variables are set
# for each case in turn, and torch applies the choice.
PROBE = """
import json, os, sys, torch
from flowscale.threads import cpu_threads
out = []
for cpus, env, requested, workers in json.loads(sys.argv[1]):
    for k in {launcher}:
        os.environ.pop(k, None)
    os.environ.update(env)
    os.sched_setaffinity(0, cpus)
    n, why = cpu_threads(requested, workers)
    torch.set_num_threads(n)
    out.append([torch.get_num_threads(), why])
print(json.dumps(out))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs for a 2-CPU mask")
def test_threads_follow_the_cpus_the_task_may_use():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    cases = [[sorted(cpus), e, req, w] for cpus, e, req, w, _, _ in CASES]
    out = subprocess.run([sys.executable, "-c", PROBE.format(launcher=list(LAUNCHER_VARS)), json.dumps(cases)],
                         env=env, capture_output=True, text=True, check=True, timeout=300).stdout
    got = json.loads(out.strip().splitlines()[-1])
    for (cpus, e, req, w, expect, reason), (n, why) in zip(CASES, got):
        assert n == expect and reason in why, (cpus, e, req, w, n, why)


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
