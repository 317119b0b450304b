"""Checkpoints: ``<run_dir>/checkpoints/step_XXXXXXXX.pt``, written atomically, keep-last-k.

A checkpoint is written to a temporary name and renamed into place, so a crash mid-save
never leaves a partial file under a real name. :func:`resolve_latest` is the one place that
decides what "latest" means; :func:`load_latest` falls back to an older checkpoint, with a
warning, when the newest cannot be read. Checkpoints load with ``weights_only=True``: they
hold tensors and plain Python values only, never pickled code.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep_last: int) -> Path:
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{step:08d}.pt"
    tmp = d / f".{path.name}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_latest(run_dir: str | Path, map_location="cpu") -> tuple[Path, dict] | None:
    """(path, state) of the newest readable checkpoint; unreadable newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except Exception as e:  # a truncated or corrupt file: fall back to the previous one
            warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); falling back to an older one")
    return None
