"""``flowscale submit``: run ``flowscale train`` as a Slurm job through submitit.

One task per GPU. Each task reads its place in the job from submitit's JobEnvironment (global
and local rank, task count, first host) and hands it, with the job's rendezvous port
(:func:`flowscale.distributed.master_port`, or MASTER_PORT where exported), to the same
``flowscale.train.main`` as ``flowscale train``, as arguments: nothing is written into the
environment (DeepSpeed picks the device from the local rank; CUDA_VISIBLE_DEVICES is left alone).

Preemption and time limits: Slurm sends USR2 (``--signal`` ahead of the limit); submitit
calls :meth:`TrainJob.checkpoint` on rank 0 inside the signal handler, which only returns a
resubmission of the same callable -- no collective save can run there -- and requeues the
job. The job id, the submitit folder and the run directory stay the same, and the requeued
job resumes through the one resolve-latest function from the newest complete checkpoint,
which the training loop writes every ``train.checkpoint_every`` steps / ``train.checkpoint_minutes``.

Where the job goes is never guessed: Slurm's commands must be on PATH (:class:`SlurmNotFound`
otherwise), ``local=True`` asks for submitit's local executor, and ``dry_run=True`` returns the
script the Slurm executor would hand to sbatch, built by the same function on any machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import submitit
import yaml

from flowscale.cli import add_config_args, split_config_and_overrides
from flowscale.config import Config, ConfigError, config_path as resolve_config, load_config
from flowscale.distributed import DistInfo, master_port


class TrainJob:
    """The callable every task runs; picklable, and requeued as itself."""

    def __init__(self, config_path: str | None, overrides: list[str]):
        self.config_path = config_path
        self.overrides = list(overrides)

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        place = DistInfo(rank=env.global_rank, world_size=env.num_tasks, local_rank=env.local_rank,
                         master_addr=env.hostnames[0],
                         master_port=int(os.environ.get("MASTER_PORT") or master_port(str(env.job_id))))
        from flowscale.train import main

        cfg = load_config(self.config_path, self.overrides)
        result = main(cfg, rendezvous=place)  # resumes from the newest complete checkpoint of train.run_dir
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
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--array {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict) and "sweep" in data:
        data = data["sweep"]
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data) or not data:
        raise ConfigError(f"{path}: a sweep is a non-empty YAML list of mappings like "
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


def cpus_per_task_of(cfgs: list, given: int | None) -> tuple[int, str]:
    """Slurm CPUs per task and why: as given (--cpus-per-task), else one per data-loader worker
    plus the training process's intra-op threads (engine.threads, 1 when automatic: see
    flowscale.distributed.cpu_threads), the most any of the jobs' configs asks for."""
    if given is not None:
        if given < 1:
            raise ConfigError(f"--cpus-per-task must be >= 1, got {given}")
        return given, "--cpus-per-task"
    need = {c.data.num_workers + max(1, c.engine.threads): c for c in cfgs}
    n = max(need)
    c = need[n]
    return n, (f"{c.data.num_workers} loader worker(s) (data.num_workers) + {max(1, c.engine.threads)} for the "
               f"training process (engine.threads={c.engine.threads}); --cpus-per-task N to change")


# sbatch options that flowscale writes from its own flags (or submitit for its logs): `--slurm`
# may not set them, so the flags and what the job does (world size, logs) cannot disagree.
OWN_SBATCH = {"nodes": "--nodes", "ntasks": "--nodes and --tasks-per-node", "ntasks_per_node": "--tasks-per-node",
              "cpus_per_task": "--cpus-per-task", "gpus_per_node": "--gpus-per-node", "time": "--time",
              "partition": "--partition", "account": "--account", "constraint": "--constraint", "mem": "--mem-gb",
              "signal": "--signal-delay", "array": "--array", "output": "submitit (<run_dir>/submitit/)",
              "error": "submitit (<run_dir>/submitit/)", "open_mode": "submitit"}


def slurm_option(text: str) -> tuple[str, str | bool]:
    """One ``--slurm KEY[=VALUE]``: an sbatch option (``requeue``, ``qos=high``,
    ``mem-per-cpu=4G``) for the job script, as (key, value) of submitit's
    ``additional_parameters``; a bare KEY is a flag (``#SBATCH --requeue``)."""
    key, eq, value = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", key) or (eq and not value):
        raise ValueError(f"'{text}' is not an sbatch option: give KEY or KEY=VALUE, e.g. requeue, qos=high, "
                         f"mem-per-cpu=4G")
    if key in OWN_SBATCH:
        raise ValueError(f"'{text}': #SBATCH --{key.replace('_', '-')} is set by {OWN_SBATCH[key]}")
    return key, value if eq else True


class SlurmNotFound(FileNotFoundError):
    """A real submit on a machine without Slurm's commands, and without ``--local``."""


SLURM_COMMANDS = ("sbatch", "srun")
"""What submitit runs here to submit (sbatch) and what it detects Slurm by (srun)."""


def require_slurm() -> None:
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        raise SlurmNotFound(f"no Slurm on this machine ({' and '.join(missing)} not on PATH): submit from a node of "
                            f"your cluster, or add --local to run the job here with submitit's local executor "
                            f"(--dry-run prints the job script without Slurm)")


class _ScriptOnly(submitit.SlurmExecutor):
    """submitit's SlurmExecutor for --dry-run: the same parameters and script, without the
    check for ``srun`` that a machine without Slurm fails (it never submits)."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def _slurm_executor(cls, folder: Path, max_timeouts: int, nodes: int, tasks: int, cpus: int, gpus_per_node: int,
                    time_min: int, signal_delay_s: int, partition: str | None, account: str | None,
                    constraint: str | None, mem_gb: float | None, slurm: dict) -> submitit.SlurmExecutor:
    """The executor a submit uses and the one --dry-run previews with: one function, so the
    script shown is the script submitted."""
    # submitit gives up after 3 time-limit requeues by default: a week on a 24 h partition needs 7.
    ex = cls(folder=str(folder), max_num_timeout=max_timeouts)
    params = dict(job_name="flowscale", nodes=nodes, ntasks_per_node=tasks, cpus_per_task=cpus, time=time_min,
                  signal_delay_s=signal_delay_s)
    mem = None if not mem_gb else f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"
    optional = dict(gpus_per_node=gpus_per_node or None, partition=partition, account=account, constraint=constraint,
                    mem=mem, additional_parameters=dict(slurm) or None)
    ex.update_parameters(**params, **{k: v for k, v in optional.items() if v is not None})
    return ex


def _plan(config_path: str | None, overrides: list[str], array: str | None) \
        -> tuple[str | None, list[str], Config, list[list[str]], list[Config]]:
    """(the config file pinned to an absolute path, the overrides every job shares, their config,
    each job's overrides, each job's config): every job's config is validated before anything is
    submitted."""
    # The job reads the config file on the node: pin a bundled name or a relative path to the
    # absolute file now, so the job's working directory (and requeues) cannot change which one.
    if config_path is not None:
        config_path = str(resolve_config(config_path).absolute())
    base = _absolute_run_dir(config_path, list(overrides))
    cfg = load_config(config_path, base)
    if array is None:
        return config_path, base, cfg, [base], [cfg]
    jobs = [base + [f"{k}={v}" for k, v in point.items()] + [f"train.run_dir={Path(cfg.train.run_dir) / f'sweep_{i:03d}'}"]
            for i, point in enumerate(load_sweep(array))]
    return config_path, base, cfg, jobs, [load_config(config_path, ov) for ov in jobs]


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # stdout is the script of --dry-run, or the job ids


def submit(config_path: str | None, overrides: list[str], nodes: int = 1, gpus_per_node: int = 0,
           tasks_per_node: int | None = None, cpus_per_task: int | None = None, partition: str | None = None,
           time_min: int = 60, account: str | None = None, constraint: str | None = None,
           array: str | None = None, local: bool = False, signal_delay_s: int = 120, mem_gb: float | None = None,
           max_timeouts: int = 100, slurm: dict | None = None, dry_run: bool = False):
    """Submit one job (or a job array from a sweep file); returns the submitit jobs, or with
    ``dry_run`` the sbatch script submitit would submit (made here without Slurm).

    Without ``local`` Slurm's commands must be on PATH (:class:`SlurmNotFound` otherwise):
    nothing falls back to running on this machine unasked. ``cpus_per_task``: None = one per
    data-loader worker plus the training threads (:func:`cpus_per_task_of`, printed).
    ``slurm``: extra sbatch options {key: value or True} (``--slurm KEY[=VALUE]``).
    ``max_timeouts``: how many times a job that reaches its time limit is requeued (preemptions
    are requeued without limit)."""
    if max_timeouts < 0:
        raise ConfigError(f"--max-timeouts must be >= 0 (got {max_timeouts})")
    if local and (dry_run or nodes > 1):
        raise ConfigError("--local runs the job on this machine with submitit's local executor: one node, and no "
                          "job script to print (drop --dry-run, or --nodes)")
    if not local and not dry_run:
        require_slurm()  # before anything is checked or written
    config_path, base, cfg, jobs, job_cfgs = _plan(config_path, overrides, array)
    tasks = tasks_per_node_of(tasks_per_node, gpus_per_node)
    folder = Path(cfg.train.run_dir) / "submitit"
    if local:
        ex = submitit.AutoExecutor(folder=str(folder), cluster="local")
        ex.update_parameters(nodes=1, tasks_per_node=tasks, timeout_min=time_min, name="flowscale",
                             **({"gpus_per_node": gpus_per_node} if gpus_per_node else {}))
    else:
        cpus, why = cpus_per_task_of(job_cfgs, cpus_per_task)
        _note(f"cpus per task: {cpus} ({why})")
        ex = _slurm_executor(_ScriptOnly if dry_run else submitit.SlurmExecutor, folder, max_timeouts, nodes, tasks,
                             cpus, gpus_per_node, time_min, signal_delay_s, partition, account, constraint, mem_gb,
                             slurm or {})
    if dry_run:
        if len(jobs) > 1:  # submitit makes a batch of several jobs one array job (a batch of one is a plain job)
            ex.parameters["map_count"] = len(jobs)
            for i, ov in enumerate(jobs):
                _note(f"array task {i}: {' '.join(ov[len(base):])}")
        # the text SlurmExecutor._submit_command writes to the file it hands to sbatch
        return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")
    if array is None:  # an existing run on another topology: refused here, not after waiting in the queue
        check_resume(cfg, nodes * tasks)
        return [ex.submit(TrainJob(config_path, jobs[0]))]
    with ex.batch():  # one array job (submitted when the block ends)
        submitted = [ex.submit(TrainJob(config_path, ov)) for ov in jobs]
    return submitted


# -- the `flowscale submit` command (declared in pyproject's flowscale.commands entry points) -------

def cmd_submit(ns) -> int:
    path, overrides = split_config_and_overrides(ns.args)
    out = submit(path, overrides, nodes=ns.nodes, gpus_per_node=ns.gpus_per_node, tasks_per_node=ns.tasks_per_node,
                 cpus_per_task=ns.cpus_per_task, partition=ns.partition, time_min=ns.time, account=ns.account,
                 constraint=ns.constraint, signal_delay_s=ns.signal_delay, mem_gb=ns.mem_gb, array=ns.array,
                 local=ns.local, max_timeouts=ns.max_timeouts, slurm=dict(ns.slurm), dry_run=ns.dry_run)
    if ns.dry_run:
        print(out, end="")  # the script, byte for byte
        return 0
    where = "on this machine (submitit's local executor)" if ns.local else "to Slurm"
    for j in out:
        print(f"submitted job {j.job_id} {where}; logs: {j.paths.stdout} / {j.paths.stderr}")
    if ns.wait:
        for j in out:
            print(f"job {j.job_id}: {j.results()}")
    return 0


def _slurm_option(text: str) -> tuple[str, str | bool]:
    try:
        return slurm_option(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_command(sub) -> None:
    """Add ``flowscale submit`` to the ``flowscale`` command's sub-parsers."""
    s = sub.add_parser("submit", help="run the same training as a Slurm job through submitit (requeues on preemption)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Submit `flowscale train CONFIG [overrides]` to Slurm: one task per GPU, resume on requeue.\n\n"
                                   "CONFIG is the name of a bundled config (--list-configs) or a YAML file. Slurm's sbatch and\n"
                                   "srun must be on PATH; without them submit stops (it never trains here unasked): --local runs\n"
                                   "the job on this machine through submitit's local executor, and --dry-run prints the job\n"
                                   "script, exactly as submitit would submit it, on any machine.\n\n"
                                   "CPUs per task default to one per loader worker (data.num_workers) plus the training\n"
                                   "process's threads (engine.threads, 1 when automatic), printed at submission. Any other\n"
                                   "sbatch option goes in with --slurm KEY[=VALUE] (repeatable), e.g. --slurm requeue for sites\n"
                                   "that requeue only jobs asking for it, --slurm mem-per-cpu=4G, --slurm qos=high; memory per\n"
                                   "node is --mem-gb.\n\n"
                                   "examples:\n  flowscale submit glow_imagenet64 --nodes 2 --gpus-per-node 8 --partition gpu --time 1440\n"
                                   "  flowscale submit glow_imagenet64 --gpus-per-node 8 --mem-gb 480 --slurm requeue --slurm qos=high\n"
                                   "  flowscale submit demo --array sweep.yaml --dry-run\n"
                                   "  flowscale submit demo --local train.steps=100")
    add_config_args(s)
    s.add_argument("--nodes", type=int, default=1, help="nodes (default: 1)")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU (default: 0 = CPU)")
    s.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node (default: gpus-per-node, or 1)")
    s.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPU cores per task (default: data.num_workers + max(1, engine.threads), printed)")
    s.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: the partition's)")
    s.add_argument("--partition", default=None, help="Slurm partition")
    s.add_argument("--time", type=int, default=60, help="time limit per job in minutes; the job requeues itself (default: 60)")
    s.add_argument("--account", default=None, help="Slurm account")
    s.add_argument("--constraint", default=None, help="Slurm constraint (e.g. a100)")
    s.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which Slurm sends USR2 (default: 120)")
    s.add_argument("--max-timeouts", type=int, default=100,
                   help="requeues after hitting the time limit before giving up (default: 100; submitit's own "
                        "default of 3 would end a week-long run on a 24 h partition); preemptions requeue without limit")
    s.add_argument("--slurm", action="append", default=[], metavar="KEY[=VALUE]", type=_slurm_option,
                   help="an extra sbatch option for the job script (repeatable): requeue -> #SBATCH --requeue, "
                        "qos=high -> #SBATCH --qos=high; options that flags above set are refused")
    s.add_argument("--array", default=None, metavar="SWEEP.yaml",
                   help="a job array: a YAML list of {dotted.key: value} overrides, one job each")
    how = s.add_mutually_exclusive_group()
    how.add_argument("--local", action="store_true",
                     help="run the job on this machine with submitit's local executor (no Slurm needed)")
    how.add_argument("--dry-run", action="store_true",
                     help="print the job script submitit would submit (arrays included) and submit nothing; "
                          "needs no Slurm")
    s.add_argument("--wait", action="store_true", help="wait for the job(s) and print their results")
    s.set_defaults(func=cmd_submit)
