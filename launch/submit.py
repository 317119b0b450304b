"""``flowscale submit``: run ``flowscale train`` as a Slurm job through submitit.

One task per GPU. Each task maps submitit's JobEnvironment to RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT and calls the same ``flowscale.train.main`` as ``flowscale train``
(DeepSpeed picks the device from LOCAL_RANK; CUDA_VISIBLE_DEVICES is left alone).

Preemption and time limits: Slurm sends USR2 (``--signal`` ahead of the limit); submitit
calls :meth:`TrainJob.checkpoint` on rank 0 inside the signal handler, which only returns a
resubmission of the same callable -- no collective save can run there -- and requeues the
job. The job id, the submitit folder and the run directory stay the same, and the requeued
job resumes through the one resolve-latest function from the newest complete checkpoint,
which the training loop writes every ``train.checkpoint_every`` steps / ``train.checkpoint_minutes``.
"""

from __future__ import annotations

import os
from pathlib import Path

import submitit
import yaml

from flowscale.config import config_path as resolve_config, load_config
from flowscale.distributed import master_port


class TrainJob:
    """The callable every task runs; picklable, and requeued as itself."""

    def __init__(self, config_path: str | None, overrides: list[str]):
        self.config_path = config_path
        self.overrides = list(overrides)

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        job_key = str(env.job_id)
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                          MASTER_ADDR=env.hostnames[0],
                          MASTER_PORT=os.environ.get("FLOWSCALE_MASTER_PORT", str(master_port(job_key))))
        from flowscale.train import main

        cfg = load_config(self.config_path, self.overrides)
        result = main(cfg)  # resumes from the newest complete checkpoint of train.run_dir
        return {"rank": env.global_rank, **{k: v for k, v in result.items() if isinstance(v, (int, float, str))}}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # Called inside a signal handler on rank 0: never save here (a save is collective).
        # The training loop has been writing checkpoints; the requeued job resumes from them.
        return submitit.helpers.DelayedSubmission(TrainJob(self.config_path, self.overrides))


def _absolute_run_dir(config_path: str | None, overrides: list[str]) -> list[str]:
    cfg = load_config(config_path, overrides)
    run_dir = Path(cfg.train.run_dir).absolute()
    return [o for o in overrides if not o.startswith("train.run_dir=")] + [f"train.run_dir={run_dir}"]


def load_sweep(path: str) -> list[dict]:
    """A sweep file: a YAML list of {dotted.key: value} mappings, one job each."""
    data = yaml.safe_load(Path(path).read_text())
    if isinstance(data, dict) and "sweep" in data:
        data = data["sweep"]
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data) or not data:
        raise ValueError(f"{path}: a sweep is a non-empty YAML list of mappings like "
                         f"[{{optim.lr: 0.001}}, {{optim.lr: 0.0005}}]")
    return data


def check_resume(cfg, world_size: int) -> list[str]:
    """What changes when the job continues ``train.run_dir``'s newest checkpoint on ``world_size``
    ranks (printed, as the job will); raises ConfigError, before anything is submitted, for a
    change the checkpoint cannot honour. The same plan the job makes (flowscale.restore.plan_restore)."""
    from flowscale.restore import plan_restore

    plan = plan_restore(cfg, world_size)
    if plan.differences:
        print(f"the job resumes {plan.checkpoint} with: {', '.join(plan.differences)}")
    return plan.differences


def tasks_per_node_of(tasks_per_node: int | None, gpus_per_node: int) -> int:
    """Slurm tasks per node: as given, else one per GPU (one on a CPU node)."""
    return tasks_per_node or max(gpus_per_node, 1)


def make_executor(folder: Path, nodes: int, gpus_per_node: int, tasks_per_node: int | None, cpus_per_task: int,
                  partition: str | None, time_min: int, account: str | None, constraint: str | None,
                  local: bool, signal_delay_s: int, mem_gb: float | None = None,
                  max_timeouts: int = 100) -> submitit.AutoExecutor:
    if max_timeouts < 0:
        raise ValueError(f"--max-timeouts must be >= 0 (got {max_timeouts})")
    # submitit gives up after 3 time-limit requeues by default: a week on a 24 h partition needs 7.
    ex = submitit.AutoExecutor(folder=str(folder), cluster="local" if local else None,
                               **({} if local else dict(slurm_max_num_timeout=max_timeouts)))
    tasks = tasks_per_node_of(tasks_per_node, gpus_per_node)
    params = dict(nodes=nodes, tasks_per_node=tasks, cpus_per_task=cpus_per_task, timeout_min=time_min,
                  name="flowscale")
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if mem_gb:
        params["mem_gb"] = mem_gb
    slurm = dict(slurm_signal_delay_s=signal_delay_s)
    if partition:
        slurm["slurm_partition"] = partition
    if account:
        slurm["slurm_account"] = account
    if constraint:
        slurm["slurm_constraint"] = constraint
    ex.update_parameters(**params, **({} if local else slurm))
    return ex


def submit(config_path: str | None, overrides: list[str], nodes: int = 1, gpus_per_node: int = 0,
           tasks_per_node: int | None = None, cpus_per_task: int = 1, partition: str | None = None,
           time_min: int = 60, account: str | None = None, constraint: str | None = None,
           array: str | None = None, local: bool = False, signal_delay_s: int = 120, mem_gb: float | None = None,
           max_timeouts: int = 100):
    """Submit one job (or a job array from a sweep file); returns the submitit jobs.

    ``max_timeouts``: how many times a job that reaches its time limit is requeued (preemptions
    are requeued without limit)."""
    # The job reads the config file on the node: pin a bundled name or a relative path to the
    # absolute file now, so the job's working directory (and requeues) cannot change which one.
    if config_path is not None:
        config_path = str(resolve_config(config_path).absolute())
    base = _absolute_run_dir(config_path, list(overrides))
    cfg = load_config(config_path, base)
    if array is None:  # an existing run on another topology: refused here, not after waiting in the queue
        check_resume(cfg, nodes * tasks_per_node_of(tasks_per_node, gpus_per_node))
    folder = Path(cfg.train.run_dir) / "submitit"
    ex = make_executor(folder, nodes, gpus_per_node, tasks_per_node, cpus_per_task, partition, time_min, account,
                       constraint, local, signal_delay_s, mem_gb, max_timeouts)
    if array is None:
        return [ex.submit(TrainJob(config_path, base))]
    jobs = []
    with ex.batch():
        for i, point in enumerate(load_sweep(array)):
            extra = [f"{k}={v}" for k, v in point.items()]
            run_dir = Path(cfg.train.run_dir) / f"sweep_{i:03d}"
            ov = base + extra + [f"train.run_dir={run_dir}"]
            load_config(config_path, ov)  # validate every point before anything is submitted
            jobs.append(ex.submit(TrainJob(config_path, ov)))
    return jobs


def sbatch_preview(config_path: str | None, overrides: list[str], nodes: int = 1, gpus_per_node: int = 0,
                   tasks_per_node: int | None = None, cpus_per_task: int = 1, partition: str | None = None,
                   time_min: int = 60, account: str | None = None, constraint: str | None = None,
                   signal_delay_s: int = 120, mem_gb: float | None = None, **_) -> str:
    """The sbatch script submitit would write (for --dry-run; needs no Slurm on this machine)."""
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    base = _absolute_run_dir(config_path, list(overrides))
    folder = Path(load_config(config_path, base).train.run_dir) / "submitit"
    ex = SlurmExecutor(folder=str(folder))
    params = dict(nodes=nodes, ntasks_per_node=tasks_per_node_of(tasks_per_node, gpus_per_node),
                  cpus_per_task=cpus_per_task, time=time_min, signal_delay_s=signal_delay_s, job_name="flowscale")
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    for k, v in (("partition", partition), ("account", account), ("constraint", constraint)):
        if v:
            params[k] = v
    if mem_gb:
        params["mem"] = f"{int(mem_gb)}GB"
    ex.update_parameters(**params)
    return _make_sbatch_string(command="python -u -m submitit.core._submit " + str(folder), folder=str(folder),
                               **ex.parameters)
