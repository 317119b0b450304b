"""Checkpoints: save on every rank, resolve "latest" in one place, export safetensors.

Layout of one checkpoint, ``<run_dir>/checkpoints/step_XXXXXXXX/``::

    (DeepSpeed's files)      model, optimizer (sharded per ZeRO stage), LR schedule
    rank_00000.pt ...        per-rank state: RNG streams, data-loader position
    client.pt                step, skipped-step counters, resolved config
    model.safetensors        consolidated weights: what eval/sample load
    ema.safetensors          the EMA weights (when optim.ema_decay > 0): eval/sample prefer them, resume reads them
    config.yaml              the resolved config
    COMPLETE                 written last, by rank 0, after every rank finished writing

Beside them, ``<run_dir>/checkpoints/latest`` holds the tag of the newest complete checkpoint
(``step_XXXXXXXX``): DeepSpeed's own pointer, which its ``zero_to_fp32.py`` (copied into
``checkpoints/`` by DeepSpeed) and ``load_checkpoint(tag=None)`` read. flowscale never reads it;
:func:`point_latest` rewrites it (atomically) from :func:`resolve_latest` whenever the set of
complete checkpoints changes, so it never names an incomplete, pruned or set-aside one.

The W&B run id lives beside the checkpoints, in ``<run_dir>/wandb_id.txt`` (see :mod:`flowscale.logging`).

A directory without COMPLETE is a save that crashed midway and is never resumed from, so a
crash can not leave a "latest" that points at a partial checkpoint. :func:`resolve_latest`
is the only definition of "latest"; :func:`list_complete` also drives keep-last-k. Pruning
renames a checkpoint out of ``step_*`` before deleting it, so a half-deleted one never looks
complete; :func:`remove_partial` clears what a killed save or prune left behind.

What is saved is named: :func:`save` and :func:`load` take and give a
:class:`~flowscale.state.TrainState` (client.pt, with the resolved config) and a
:class:`~flowscale.state.RankState` (rank_XXXXX.pt). Which checkpoint to load, and which rank
file, is decided in :mod:`flowscale.restore`. :func:`save` passes the crash points declared in
:mod:`flowscale.faults` (``faults.point``), where crash-consistency tests can kill it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import faults
from .config import Config, to_dict, to_yaml
from .deepspeed_universal import UNIVERSAL, load_whole
from .distributed import any_rank, barrier, world_size
from .state import RankState, TrainState

_NAME = re.compile(r"^step_(\d{8})$")
_DELETING = ".deleting-"  # prefix of a checkpoint being pruned: no longer a step_* directory

def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def list_complete(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir()
             if (m := _NAME.match(p.name)) and (p / "COMPLETE").is_file()]
    return [p for _, p in sorted(found)]


def resolve_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    ckpts = list_complete(run_dir)
    return ckpts[-1] if ckpts else None


LATEST = "latest"
"""DeepSpeed's pointer file in ``checkpoints/``: the tag of the newest complete checkpoint."""


def point_latest(run_dir: str | Path) -> str | None:
    """Make DeepSpeed's ``checkpoints/latest`` name :func:`resolve_latest` (written to a temporary
    file, then renamed over it: a crash leaves the old pointer or the new one, never a torn one);
    removed when no checkpoint is complete. Returns the tag, or None. Rank 0 only."""
    latest = resolve_latest(run_dir)
    path = checkpoint_dir(run_dir) / LATEST
    if latest is None:
        path.unlink(missing_ok=True)
        return None
    if not path.is_file() or path.read_text() != latest.name:
        _atomic_write_bytes(path, latest.name.encode())
    return latest.name


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (its latest) or a checkpoint directory."""
    p = Path(path)
    if (p / "COMPLETE").is_file():
        return p
    latest = resolve_latest(p)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint under {p}; give a run directory that has trained, "
                                f"or a checkpoint directory <run_dir>/checkpoints/step_XXXXXXXX")
    return latest


def remove_partial(run_dir: str | Path) -> list[str]:
    """Delete what an interrupted save or prune left (``step_*`` directories without COMPLETE,
    ``.deleting-*`` ones); returns their names. Only the process holding the run lock calls it."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    gone = [p for p in sorted(d.iterdir()) if p.is_dir() and (
        p.name.startswith(_DELETING) or (_NAME.match(p.name) and not (p / "COMPLETE").is_file()))]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in gone]


def set_aside_newer(run_dir: str | Path, step: int) -> Path | None:
    """Move this run's checkpoints newer than ``step`` into ``checkpoints/superseded-<time>/``
    (kept, but no longer "latest"); returns that folder, or None when there were none."""
    newer = [p for p in list_complete(run_dir) if int(_NAME.match(p.name).group(1)) > step]
    if not newer:
        return None
    base = checkpoint_dir(run_dir) / time.strftime("superseded-%Y%m%d-%H%M%S")
    dest, n = base, 1
    while dest.exists():  # twice within a second (rollbacks): a folder of its own each time
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    dest.mkdir(parents=True)
    for p in newer:
        p.rename(dest / p.name)
    point_latest(run_dir)
    return dest


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def consolidated_state_dict(engine) -> dict:
    """Full model state (parameters and buffers) on rank 0, whatever the ZeRO stage."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, quota, I/O error); the partial directory
    was removed and earlier checkpoints are untouched."""


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _no_space(e: BaseException) -> bool:
    # torch.save reports a full disk as a RuntimeError from its zip writer ("unexpected pos ...").
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in str(e) \
        or "No space left" in str(e)


def save(engine, *, run_dir: str | Path, train_state: TrainState, rank_state: RankState, config: Config,
         ema: dict | None, keep_last: int, rank: int, warn: Callable[[str], None] | None = None) -> Path:
    """Collective: every rank calls it. Writes a checkpoint of step ``train_state.step``: DeepSpeed's
    files, ``rank_state`` (this rank's file), and on rank 0 ``train_state`` with ``config``
    (client.pt, config.yaml), the consolidated weights and ``ema`` (safetensors); then COMPLETE,
    then keeps the ``keep_last`` newest. Returns the checkpoint directory.

    A write that fails on any rank (full disk, I/O error) fails on every rank with
    :class:`CheckpointWriteError`: the partial directory is removed, COMPLETE was never written,
    earlier checkpoints stay as they were. Before writing, rank 0 calls ``warn(message)`` when
    the disk has less free space than the previous checkpoint took (with 10% to spare)."""
    from safetensors.torch import save_file

    step = train_state.step
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    path = root / tag
    previous = resolve_latest(run_dir)
    needed = _dir_bytes(previous) if previous is not None and rank == 0 else None  # the messages are rank 0's
    if needed is not None and warn is not None and shutil.disk_usage(root).free < 1.1 * needed:
        warn(f"only {_fmt_bytes(shutil.disk_usage(root).free)} free on the disk of {root}, the last checkpoint "
             f"took {_fmt_bytes(needed)}: the next save may fail; free space or lower train.keep_last")
    if rank == 0 and (path / "COMPLETE").exists():
        (path / "COMPLETE").unlink()  # re-saving a step: it is incomplete until rewritten
        point_latest(run_dir)  # and DeepSpeed's "latest" must not name it meanwhile
    barrier()
    failure: BaseException | None = None
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        path.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(rank_state.state_dict(), path / f"rank_{rank:05d}.pt")
        faults.point("engine_state", step, rank)
    except (OSError, RuntimeError) as e:
        failure = e
    full = consolidated_state_dict(engine)  # collective under ZeRO-3: every rank takes part, failed or not
    if rank == 0 and failure is None:
        try:
            _atomic_torch_save({**train_state.state_dict(), "config": to_dict(config)}, path / "client.pt")
            save_file({k: v.contiguous().float() if v.is_floating_point() else v.contiguous() for k, v in full.items()},
                      str(path / "model.safetensors"))
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.items()}, str(path / "ema.safetensors"))
            (path / "config.yaml").write_text(to_yaml(config))
            faults.point("export", step, rank)
        except (OSError, RuntimeError) as e:
            failure = e
    if any_rank(failure is not None):
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        barrier()
        raise _write_error(path, failure, needed, previous)
    barrier()
    if rank == 0:
        _atomic_write_bytes(path / "COMPLETE", json.dumps({"step": step, "world_size": world_size(),
                                                           "time": time.time()}).encode())
        point_latest(run_dir)  # only now: a crash before it leaves "latest" at the previous complete one
        faults.point("complete", step, rank)
        for old in list_complete(run_dir)[:-keep_last]:  # never the newest (keep_last >= 1): "latest" stays valid
            doomed = old.with_name(_DELETING + old.name)
            old.rename(doomed)  # atomic: from here on it is not a checkpoint, whatever rmtree reaches
            faults.point("prune", step, rank)
            shutil.rmtree(doomed, ignore_errors=True)
    barrier()
    return path


def _write_error(path: Path, failure: BaseException | None, needed: int | None, previous: Path | None):
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
    what = "no space left on the device" if failure is not None and _no_space(failure) else \
        (f"{type(failure).__name__}: {failure}" if failure is not None else "a write failed on another rank")
    size = f"the previous checkpoint took {_fmt_bytes(needed)}, " if needed is not None else ""
    resume = f"it resumes from {previous.name}" if previous is not None else "no earlier checkpoint exists"
    return CheckpointWriteError(
        f"writing checkpoint {path} failed ({what}); {size}{_fmt_bytes(free)} are free on that disk. Free space "
        f"(or lower train.keep_last) and rerun the same command: {resume}. The partial {path.name} was removed; "
        f"earlier checkpoints are untouched.")


def written_healthy(ckpt: Path) -> bool:
    """The ``healthy`` flag of a checkpoint's client state: no step was flagged by the divergence
    watch when it was written (checkpoints from before the flag: True)."""
    return bool(torch.load(ckpt / "client.pt", map_location="cpu", weights_only=True).get("healthy", True))


@dataclass
class Loaded:
    """A checkpoint read back by :func:`load`."""
    path: Path
    """The checkpoint directory."""
    train_state: TrainState
    """The loop's counters (client.pt)."""
    rank_state: RankState
    """This rank's loader position and RNG streams (the rank file :mod:`flowscale.restore` chose)."""
    client: dict
    """client.pt as saved: the counters, the resolved config, and older checkpoints' EMA."""


def load(engine, ckpt: Path, *, rank_file: Path, universal: bool = False) -> Loaded:
    """Load model/optimizer/schedule into ``engine``, and the saved states (``rank_file``: this
    rank's, as :func:`flowscale.restore.rank_file` chose it). ``universal``: from ``ckpt/universal``
    (see :func:`flowscale.deepspeed_universal.to_universal`; the engine was built with DeepSpeed's
    ``checkpoint.load_universal``)."""
    if universal and engine.zero_optimization_stage() == 0:  # DeepSpeed reads universal into ZeRO-1/2/3 only
        load_whole(engine, ckpt / UNIVERSAL)
    else:
        load_path, _ = engine.load_checkpoint(str(ckpt if universal else ckpt.parent), tag=UNIVERSAL if universal
                                              else ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {ckpt}")
    client = torch.load(ckpt / "client.pt", map_location="cpu", weights_only=True)
    if not rank_file.is_file():
        raise RuntimeError(f"{rank_file} is missing from {ckpt}, which is marked complete: it was copied or edited "
                           f"in part. Resume from another checkpoint (--resume PATH), or start a new run_dir from "
                           f"its model.safetensors")
    train_state = TrainState()
    train_state.load_state_dict(client)
    rank_state = RankState.from_state_dict(torch.load(rank_file, map_location="cpu", weights_only=True))
    return Loaded(path=ckpt, train_state=train_state, rank_state=rank_state, client=client)


def load_ema(ckpt: Path, client: dict) -> dict:
    """The EMA weights of a checkpoint: ema.safetensors (older checkpoints kept them in client.pt)."""
    from safetensors.torch import load_file

    if (ckpt / "ema.safetensors").is_file():
        return load_file(str(ckpt / "ema.safetensors"))
    if client.get("ema") is not None:
        return client["ema"]
    raise FileNotFoundError(f"{ckpt} has no EMA weights (ema.safetensors) but optim.ema_decay > 0; resume with "
                            f"the run's own config, or start a new run_dir")


def load_exported(ckpt: str | Path, use_ema: bool = True) -> tuple[dict, Path, bool]:
    """(state dict, checkpoint directory, used_ema) from a checkpoint's safetensors export.

    Only safetensors are read: sharing a model never means unpickling code.
    """
    from safetensors.torch import load_file

    path = resolve(ckpt)
    state = load_file(str(path / "model.safetensors"))
    used_ema = False
    if use_ema and (path / "ema.safetensors").is_file():
        ema = load_file(str(path / "ema.safetensors"))
        state.update(ema)
        used_ema = True
    return state, path, used_ema


def load_trained(ckpt: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """(flow in eval mode, Config) from a run directory (its latest) or a checkpoint directory.

    Reads only the safetensors export and config.yaml, never pickles.
    """
    from .build import build_model
    from .config import load_config

    state, path, _ = load_exported(ckpt, use_ema)
    cfg = load_config(path / "config.yaml")
    flow = build_model(cfg, device)
    flow.load_state_dict(state)
    flow.eval()
    return flow, cfg
