"""Rank, world size and rendezvous from the environment, in one place.

Understood launchers, in order of precedence:

* torchrun / the ``deepspeed`` launcher / submitit-set variables: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT;
* a bare Slurm task (``srun``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with the first host
  of SLURM_JOB_NODELIST (or SLURM_LAUNCH_NODE_IPADDR) as master;
* nothing: a single process, rendezvous on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch

from . import seeds


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def master_port(job_id: str) -> int:
    """The rendezvous port of a Slurm job: the same on every task and across requeues, and in
    15000-29999, below Linux's ephemeral range (32768-60999) where outgoing connections could
    already hold it."""
    import zlib

    return 15000 + zlib.crc32(str(job_id).encode()) % 15000


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist such as 'gpu[001-004,007],cpu01' -> 'gpu001'."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[:nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, rng = head.split("[", 1)
    first = rng.rstrip("]").split(",")[0].split("-")[0]
    return prefix + first


def env_rank() -> int:
    """This process's rank as the launcher set it (RANK, else SLURM_PROCID, else 0), without
    starting anything: for code that runs before or after the process group."""
    env = os.environ  # the precedence of dist_env
    if "RANK" in env:
        return int(env["RANK"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"])
    return 0


def is_main_process() -> bool:
    """The one definition of the main rank outside a running job (inside one: ``DistInfo.is_main``)."""
    return env_rank() == 0


def dist_env() -> DistInfo:
    """Read (and complete) the rendezvous variables; returns this process's place."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))))
        env.setdefault("MASTER_PORT", str(master_port(env.get("SLURM_JOB_ID", "0"))))
    else:
        rank, world, local = 0, 1, 0
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    if world == 1:  # a lone process: any rendezvous on loopback will do
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise RuntimeError(f"rank {rank} of {world}: MASTER_ADDR and MASTER_PORT must be set for a multi-process run")
    for k, v in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local)):
        env[k] = str(v)
    return DistInfo(rank, world, local)


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


def prepare_accelerator(device: str = "auto") -> str:
    """'cuda' or 'cpu' per ``train.device`` (auto: cuda when a GPU is visible); for cpu, tell
    DeepSpeed so before it is imported."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return device


def init_distributed(backend: str = "auto", device: str = "auto") -> DistInfo:
    """Start the process group (gloo on CPU, nccl on GPU unless told otherwise)."""
    info = dist_env()
    device = prepare_accelerator(device)
    import deepspeed
    import deepspeed.ops

    # The shared-memory comm op is JIT-compiled (~40 s) at every initialize; gloo does not need it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return info


def cleanup() -> None:
    """Destroy the process group (a rare SIGABRT at exit otherwise) and forget DeepSpeed's
    cached groups, so ``main`` can run again in the same process (tests, notebooks)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        import gc

        gc.collect()  # the group's last references: not left for a forked DataLoader worker to collect
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "mpu", "mesh_device",
                     "_TENSOR_MODEL_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                     "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE", "_MPU_TENSOR_MODEL_PARALLEL_RANK"):
            if hasattr(groups, name):
                setattr(groups, name, None)
        for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                     "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
            if isinstance(getattr(groups, name, None), dict):
                getattr(groups, name).clear()


def seed_everything(seed: int, rank: int | None = None) -> None:
    """Seed python, numpy and torch's global RNGs from the ``model_init`` stream (the same
    weights on every rank); with ``rank``, then from that rank's stream (:func:`seed_rank_streams`)."""
    _seed_globals(seeds.derive(seed, "model_init"))
    if rank is not None:
        seed_rank_streams(seed, rank)


def seed_rank_streams(seed: int, rank: int) -> None:
    """Global RNGs of this rank from the ``dequant`` stream (different noise on every rank)."""
    _seed_globals(seeds.derive(seed, "dequant", rank))


def _seed_globals(s: int) -> None:
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)


# -- collectives: every one flowscale uses, each a no-op in a single process -------------------------

def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _active() else 1


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (and return it)."""
    if _active() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is True on any."""
    if not _active() or torch.distributed.get_world_size() == 1:
        return bool(flag)
    return all_reduce_sum_(torch.tensor([1.0 if flag else 0.0], device=device)).item() > 0


def max_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (one all-reduce; a copy of ``t`` where single-process)."""
    t = t.detach().clone()
    if _active() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def mean_over_ranks(t: torch.Tensor) -> list[float]:
    """Element-wise mean over ranks of a 1-d tensor (one all-reduce), as floats."""
    t = all_reduce_sum_(t.detach().clone().float())
    return (t / world_size()).tolist()


def all_gather_objects(obj) -> list:
    """``obj`` (picklable) of every rank, in rank order; ``[obj]`` in a single process."""
    if not _active() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def topology(info: DistInfo) -> dict:
    """Collective: ``{"world_size", "nodes", "ranks_per_node"}`` as the launcher laid the ranks
    out (a node = the ranks that share one local-rank numbering: one local rank 0 per node)."""
    local_ranks = all_gather_objects(info.local_rank)
    nodes = max(1, sum(r == 0 for r in local_ranks))
    return {"world_size": info.world_size, "nodes": nodes, "ranks_per_node": max(local_ranks) + 1}


def rank0_decides(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (for decisions taken from a clock, which ranks read differently)."""
    if not _active():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.broadcast(t, 0)
    return bool(t.item())


def all_equal(t: torch.Tensor) -> bool:
    """True when ``t`` is bit-identical on every rank."""
    if not _active():
        return True
    gathered = [torch.zeros_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, t)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def rng_state() -> dict:
    """RNG state of this process as tensors and numbers (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    _, key, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
