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
"""

from __future__ import annotations

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
