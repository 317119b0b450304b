"""Process groups and collectives: rank, world size and rendezvous read from the launcher's
environment, the process group started and torn down, and every collective flowscale uses.

Understood launchers, in order of precedence:

* torchrun / the ``deepspeed`` launcher / submitit-set variables: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT;
* a bare Slurm task (``srun``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with the first host
  of SLURM_JOB_NODELIST as master and a port derived from the job id (:func:`master_port`);
* nothing: a single process, rendezvous on 127.0.0.1 and a free port.

A launcher that knows the job itself (``flowscale submit``: submitit's JobEnvironment) passes a
:class:`DistInfo` to :func:`init_distributed` instead. Either way the environment is read, not
completed: the rendezvous goes to the process group as arguments (``tcp://MASTER_ADDR:MASTER_PORT``,
rank, world size). The two variables DeepSpeed 0.19 reads from nowhere else are held for the
life of the process group only (:class:`DeepSpeedEnvironment`): set by :func:`init_distributed`
where missing, put back as they were by :func:`cleanup`.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job and where the job meets (:func:`dist_env`)."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: str = "127.0.0.1"
    """Host of the rendezvous store (rank 0's, or the launcher agent's)."""
    master_port: int = 0
    """Its port."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def init_method(self) -> str:
        """The rendezvous as torch.distributed's ``init_method`` URL."""
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr  # an IPv6 literal
        return f"tcp://{host}:{self.master_port}"


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
    """This process's place and the rendezvous, read from the launcher's variables (nothing is
    written); a lone process without MASTER_* meets itself on loopback and a free port."""
    env = os.environ
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        addr = addr or _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        port = port or str(master_port(env.get("SLURM_JOB_ID", "0")))
    else:
        rank, world, local = 0, 1, 0
    if world == 1:  # a lone process: any rendezvous on loopback will do
        addr = addr or "127.0.0.1"
        port = port or str(_free_port())
    if world > 1 and not (addr and port):
        raise RuntimeError(f"rank {rank} of {world}: MASTER_ADDR and MASTER_PORT must be set for a multi-process run")
    return DistInfo(rank, world, local, addr, int(port))


def prepare_accelerator(device: str = "auto") -> str:
    """'cuda' or 'cpu' per ``train.device`` (auto: cuda when a GPU is visible)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


class DeepSpeedEnvironment:
    """The environment variables DeepSpeed (0.19.x) takes from nowhere else, held for the life of
    the process group: DS_ACCELERATOR=cpu (read once, when deepspeed is first imported, to pick
    its accelerator; for cpu it must be said before that) and LOCAL_RANK (DeepSpeedEngine asserts
    it at initialize; ZeRO-3 reads ``os.environ["LOCAL_RANK"]`` to place its buffers, at
    initialize and in its per-step checks). :meth:`hold` sets what the launcher did not, noting
    what was there; :meth:`release` puts every one back (a variable that was absent is removed),
    so a run leaves the environment as it found it. The one place flowscale writes os.environ."""

    def __init__(self):
        self.before: dict[str, str | None] = {}
        """Each variable set, with its value before (None: absent). Empty while nothing is held."""

    def hold(self, info: DistInfo, device: str) -> None:
        wanted = {"LOCAL_RANK": str(info.local_rank)}
        if device == "cpu" and "DS_ACCELERATOR" not in os.environ:
            wanted["DS_ACCELERATOR"] = "cpu"
        for name, value in wanted.items():
            if os.environ.get(name) != value:
                self.before.setdefault(name, os.environ.get(name))
                os.environ[name] = value

    def release(self) -> None:
        for name, value in self.before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.before.clear()


DEEPSPEED_ENVIRONMENT = DeepSpeedEnvironment()
"""This process's: held by :func:`init_distributed`, released by :func:`cleanup`."""


def _skip_deepspeed_shm_comm() -> None:
    """Mark DeepSpeed's shared-memory comm op as not buildable, so TorchBackend does not
    JIT-compile it (~40 s at every start; gloo does not need it). DeepSpeed has no public
    switch for this: 0.19.0 imports ``deepspeed.ops.__compatible_ops__`` from git_version_info,
    0.19.8 probes it on first access and caches it in the module ("edits to it persist"); both
    read it in ``deepspeed.comm.torch.build_shm_op``. Private DeepSpeed state, kept to this function."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(backend: str = "auto", device: str = "auto", rendezvous: DistInfo | None = None) -> DistInfo:
    """Start the process group (gloo on CPU, nccl on GPU unless told otherwise) at
    ``rendezvous`` (a launcher's own account of the job), else that of :func:`dist_env`, passed
    as arguments. Pair with :func:`cleanup`."""
    info = rendezvous or dist_env()
    device = prepare_accelerator(device)
    DEEPSPEED_ENVIRONMENT.hold(info, device)
    import deepspeed

    _skip_deepspeed_shm_comm()
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, init_method=info.init_method,
                                   rank=info.rank, world_size=info.world_size)
    return info


def cleanup() -> None:
    """Destroy the process group (a rare SIGABRT at exit otherwise) and DeepSpeed's cached
    groups with it, so ``main`` can run again in the same process (tests, notebooks), and give
    back the environment variables held for DeepSpeed (:class:`DeepSpeedEnvironment`)."""
    import sys

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and ds_comm.is_initialized():
            ds_comm.destroy_process_group()  # DeepSpeed 0.19.8 forgets its cached groups here too
        else:
            torch.distributed.destroy_process_group()
        import gc

        gc.collect()  # the group's last references: not left for a forked DataLoader worker to collect
    _forget_deepspeed_groups()
    DEEPSPEED_ENVIRONMENT.release()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed before 0.19.8 keeps its process groups (world, data parallel, ...) in module
    globals after ``destroy_process_group``, and a second ``deepspeed.initialize`` in the same
    process would use the dead ones. Its own release function where it has one; else the
    globals are reset by name (private DeepSpeed state, kept to this function)."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None or hasattr(groups, "_release_process_group_references"):
        return  # released by deepspeed.comm.destroy_process_group
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "mpu", "mesh_device",
                 "_TENSOR_MODEL_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE", "_MPU_TENSOR_MODEL_PARALLEL_RANK"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()


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


def bit_identical_on_ranks(tensors: dict[str, torch.Tensor]) -> bool:
    """Collective: True when every rank holds bit-identical ``tensors`` (same names, dtypes,
    shapes and bytes), compared by a SHA-256 of each rank's bytes (one all-gather of digests)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = all_gather_objects(h.hexdigest())
    return all(d == digests[0] for d in digests)
