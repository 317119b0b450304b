"""Every random stream of a run, derived from one seed by name.

A stream is ``(seed, name, *index)``: the name says what the numbers are for, the index which
instance (a level and step, an epoch and shard, a global batch). Keys are mixed by numpy's
``SeedSequence`` (a hash designed for this), so streams never overlap by accident the way
``seed * 1000 + rank`` does when two keys happen to collide, and adding a stream changes no
other stream's numbers.

    seeds.generator(cfg.train.seed, "dequant", step)          # torch.Generator
    seeds.numpy_rng(cfg.data.seed, "data_order", epoch)       # numpy Generator
    seeds.derive(cfg.model.seed, "permutation", level, k)     # an int seed for code that takes one

The names are fixed here, so a typo is an error instead of a silently new stream.

The global RNGs of python, numpy and torch are seeded from these streams too
(:func:`seed_everything`, :func:`seed_rank_streams`), and their state is what a checkpoint keeps
of each rank's randomness (:func:`rng_state`, :func:`set_rng_state`).
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import torch

STREAMS = {
    "model_init": "weights of the coupling networks and priors (torch's global RNG)",
    "permutation": "fixed channel permutations and initial 1x1-conv rotations, per (level, step)",
    "spectral": "power-iteration start vectors of spectral-norm convs",
    "actnorm_init": "dequantisation noise of the batch that initialises ActNorm",
    "data_order": "shard order of an epoch",
    "shuffle_buffer": "shuffle-buffer eviction order, per (epoch, global worker)",
    "flip": "horizontal flips, per (epoch, shard)",
    "dequant": "training dequantisation noise (torch's global RNG, per rank)",
    "dequant_sample": "training noise of one sample with data.streams, per (step, global row): any number of ranks",
    "eval_noise": "dequantisation noise of evaluation, per batch start index",
    "health": "dequantisation noise of the reconstruction-health check",
    "bench": "batch order and noise of benchmarks",
    "bound": "dequantisation noise of the linear-flow bound's covariance",
    "sample": "latent draws of sample grids",
}


def _tag(name: str) -> int:
    if name not in STREAMS:
        raise KeyError(f"unknown random stream {name!r}; the streams are {sorted(STREAMS)} (flowscale/seeds.py)")
    return zlib.crc32(name.encode())


def sequence(seed: int, name: str, *index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, _tag(name), *(int(i) for i in index)])


def derive(seed: int, name: str, *index: int) -> int:
    """A 63-bit integer seed for stream ``name`` at ``index``."""
    return int(sequence(seed, name, *index).generate_state(1, np.uint64)[0]) & (2 ** 63 - 1)


def generator(seed: int, name: str, *index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator for stream ``name`` at ``index``."""
    return torch.Generator(device=device).manual_seed(derive(seed, name, *index))


def numpy_rng(seed: int, name: str, *index: int) -> np.random.Generator:
    """A numpy generator for stream ``name`` at ``index``."""
    return np.random.default_rng(sequence(seed, name, *index))


# -- the global RNGs (python, numpy, torch) ---------------------------------------------------------

def seed_everything(seed: int, rank: int | None = None) -> None:
    """Seed python, numpy and torch's global RNGs from the ``model_init`` stream (the same
    weights on every rank); with ``rank``, then from that rank's stream (:func:`seed_rank_streams`)."""
    _seed_globals(derive(seed, "model_init"))
    if rank is not None:
        seed_rank_streams(seed, rank)


def seed_rank_streams(seed: int, rank: int) -> None:
    """Global RNGs of this rank from the ``dequant`` stream (different noise on every rank)."""
    _seed_globals(derive(seed, "dequant", rank))


def _seed_globals(s: int) -> None:
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)


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
