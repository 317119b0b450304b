"""Intra-op threads per process: how many CPU threads torch may use, and why.

Several tasks on one node (torchrun, Slurm) must not each take every core, which is torch's
default; the trainer and the benchmarks set ``torch.set_num_threads(cpu_threads(...)[0])`` and
print the reason.
"""

from __future__ import annotations

import os


def cpu_threads(requested: int = 0, num_workers: int = 0) -> tuple[int, str]:
    """Intra-op threads for this process and why: ``requested`` (engine.threads) when > 0, else
    OMP_NUM_THREADS when the launcher set it (torchrun sets 1), else the CPUs this process may
    run on (its affinity mask; at most SLURM_CPUS_PER_TASK; shared among the tasks of the node
    when they all see the same mask) less one per data-loader worker, at least 1. torch's own
    default is every core of the node in every process, which oversubscribes OpenMP as soon as
    several tasks share a node."""
    env = os.environ
    if requested > 0:
        return requested, f"engine.threads={requested}"
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"]), f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    cpus = len(os.sched_getaffinity(0))
    why = f"{cpus} CPUs in this process's affinity mask"
    per_task = env.get("SLURM_CPUS_PER_TASK", "")
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or 1)
    if per_task.isdigit() and 0 < int(per_task) < cpus:
        cpus, why = int(per_task), f"SLURM_CPUS_PER_TASK={per_task}"
    elif local > 1 and cpus >= local and (not per_task or cpus == int(env.get("SLURM_CPUS_ON_NODE", cpus))):
        cpus, why = cpus // local, f"{why} shared by {local} processes on this node"
    if num_workers:
        why += f", less {num_workers} data.num_workers"
    return max(1, cpus - num_workers), why
