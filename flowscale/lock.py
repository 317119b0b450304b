"""One job per run directory: ``<run_dir>/.lock`` holds the owner (host, pid, Slurm job).

A second job on the same run directory is refused with the owner's details. A lock left by a
dead process on this host, or by an earlier attempt of the same Slurm job (a requeue), is
stale and taken over with a message.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


class RunDirLocked(RuntimeError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def acquire(run_dir: str | Path, log=print) -> Path:
    path = Path(run_dir) / ".lock"
    me = _owner()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                other = {}
            stale = (other.get("host") == me["host"] and not _pid_alive(int(other.get("pid", -1)))) or \
                    (me["slurm_job_id"] is not None and other.get("slurm_job_id") == me["slurm_job_id"])
            if not stale:
                raise RunDirLocked(
                    f"{Path(run_dir)} is in use by another job (host {other.get('host')}, pid {other.get('pid')}, "
                    f"slurm job {other.get('slurm_job_id')}, since {other.get('started')}). Use another train.run_dir; "
                    f"if that job is dead, delete {path}") from None
            log(f"taking over a stale lock on {run_dir} (left by host {other.get('host')} pid {other.get('pid')})")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise RunDirLocked(f"could not lock {path}")


def release(path: Path | None) -> None:
    if path is None:
        return
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, json.JSONDecodeError):
        pass
