import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clear_env(monkeypatch, *names):
    """Remove variables for one test AND restore their absence afterwards: values that the code
    under test writes into os.environ (dist_env fills in RANK, MASTER_PORT, ...) must not leak
    into later tests. (A plain delenv of an absent variable records nothing to undo.)"""
    for k in names:
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)


@pytest.fixture
def single_process_env(monkeypatch):
    """A fresh single-process rendezvous for each in-process training run."""
    clear_env(monkeypatch, "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
              "SLURM_NTASKS")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    yield
