"""Fixtures shared by the test modules; the shared helpers are in helpers.py."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from helpers import JOB_VARIABLES, clear_env, free_port  # noqa: E402 (needs the path above)


@pytest.fixture
def single_process_env(monkeypatch):
    """A fresh single-process rendezvous for each in-process training run."""
    clear_env(monkeypatch, *JOB_VARIABLES)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors (on a busy 2-core machine two spinning
    OpenMP threads made such modules 10-100x slower); restored afterwards. A module asks for it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def float64_default():
    """float64 as the default dtype (layers checked against brute-force float64 Jacobians) and the
    global RNG seeded, so layer constructors draw the same weights in any test order; restored afterwards."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)
