"""Which samples a worker reads in an epoch, and in what order: pure arithmetic on the
manifest's per-shard counts and the seed, no data read.

For epoch ``e`` every rank and worker computes the same shard permutation from
``(data.seed, e)``; global worker ``g = rank * num_workers + worker`` of ``G = world_size *
num_workers`` takes every G-th shard. With fewer shards than G, each shard is split into
``m = ceil(G / n_shards)`` interleaved parts (sample i belongs to part i mod m) and the
parts are dealt out instead; a worker then reads the whole shard but decodes only its part.
Within a worker, samples pass through a shuffle buffer of ``data.shuffle_buffer`` slots. The
buffer's behaviour depends only on sample *positions*, never on pixels, so a worker computes
its whole emission order for an epoch from the manifest's per-shard counts and the seed::

    units      = every G-th (shard, part) of permutation(n_shards; "data_order", e), from g
    positions  = concat(parts of the worker's units)                 0 .. L-1, in reading order
    order      = shuffle_buffer(positions; "shuffle_buffer", e, g)   order[t] = position emitted at time t

(the random streams are named in :mod:`flowscale.seeds`). A worker's place in an epoch is
therefore just the emission time ``t``, and each epoch covers every sample of the split once
across all ranks and workers, disjointly.
"""

from __future__ import annotations

import bisect
import functools

import numpy as np

from .. import seeds
from .manifest import DataError


def shuffle_buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a shuffle buffer with ``size`` slots fed positions 0..n-1: once full,
    each incoming position evicts a uniformly chosen slot; the rest is flushed in random order."""
    if size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    u = rng.random(n)
    if n < size:  # never full: everything is flushed, the loop below would only fill the buffer
        return rng.permutation(n).astype(np.int64, copy=False)
    buf: list[int] = []
    out = np.empty(n, dtype=np.int64)
    k = 0
    for p in range(n):
        buf.append(p)
        if len(buf) >= size:
            j = int(u[p] * len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out[k] = buf.pop()
            k += 1
    out[k:] = np.asarray(buf, dtype=np.int64)[rng.permutation(len(buf))]
    return out


@functools.lru_cache(maxsize=4)
def shard_permutation(n: int, epoch: int, seed: int) -> np.ndarray:
    """The shard order of ``epoch``: the same for every worker and stream, so drawn once per
    process and epoch (a worker holding many canonical streams asks for it once per stream)."""
    perm = seeds.numpy_rng(seed, "data_order", epoch).permutation(n)
    perm.flags.writeable = False
    return perm


def worker_units(counts: list[int], epoch: int, seed: int, g: int, G: int) -> list[tuple[int, int, int]]:
    """(shard, part, parts) read by global worker ``g`` of ``G`` in ``epoch``: every G-th entry,
    from g, of the list of (shard, part) in shard-permutation order (only those are made)."""
    n = len(counts)
    perm = shard_permutation(n, epoch, seed)
    m = -(-G // n) if n < G else 1
    return [(int(perm[k // m]), k % m, m) for k in range(g, n * m, G)]


def check_sharing(counts: list[int], world_size: int, num_workers: int, where: str) -> None:
    """Every worker must get samples in every epoch (an empty worker would stall the DataLoader)."""
    G, n = world_size * num_workers, len(counts)
    if n >= G:
        return
    m = -(-G // n)
    if min(counts) < m:
        raise DataError(f"{where}: {n} shard(s) with as few as {min(counts)} samples cannot feed {world_size} rank(s) x "
                        f"{num_workers} worker(s): each shard is split into {m} parts and some would be empty. "
                        f"Use fewer data.num_workers, or re-shard with more samples or more shards")


AUTO_STREAMS_FLOOR = 8
"""data.streams=null takes up to this many streams even from fewer shards (see :func:`choose_streams`)."""


def choose_streams(batch_size: int, counts: list[int], world_size: int, num_workers: int) -> tuple[int, str]:
    """The canonical streams a new run takes when data.streams is null, and why (one line)::

        P = world_size x max(1, num_workers)         loader processes of this run
        candidates = {S : S divides batch_size, P divides S, every stream gets samples (check_sharing)}
        S = max(c in candidates : c <= max(n_shards, AUTO_STREAMS_FLOOR))   else min(candidates)   else 0 (off)

    Why: global batch t is batch_size / S samples of every stream, so S divides the global batch;
    this run's loader processes each take whole streams, so P divides S; and a later run can take
    any ranks x workers dividing S, so the more streams the more topologies (a power of two
    batch gives a power of two S: every smaller power of two). Up to the shard count, because
    streams beyond it share shards, each reading the whole shard to decode its strided part
    (measured: 64 streams on 16 shards cost 2.3-2.4x the loader CPU per batch of 16 streams; m times
    the bytes for remote shards), but at least AUTO_STREAMS_FLOOR (1, 2, 4 or 8 processes):
    a split with fewer shards is small, and its parts cost little. When P is beyond that, the
    fewest streams P allows (the least sharing). Off (0) when no multiple of P divides the
    batch: this run could not read canonical streams at all.
    """
    P, n = world_size * max(1, num_workers), len(counts)

    def shared_ok(S: int) -> bool:
        try:
            check_sharing(counts, S, 1, "")
            return True
        except DataError:
            return False

    candidates = [S for S in range(P, batch_size + 1, P) if batch_size % S == 0 and shared_ok(S)]
    procs = f"{world_size} rank(s) x {max(1, num_workers)} loader process(es)"
    if not candidates:
        return 0, (f"off: no multiple of the {P} = {procs} divides the global batch {batch_size} (with every stream "
                   f"given samples of the {n} shard(s)), so this run resumes only on the same ranks and "
                   f"data.num_workers; a global batch that {P} divides makes it elastic")
    limit = max(n, AUTO_STREAMS_FLOOR)
    within = [S for S in candidates if S <= limit]
    S = within[-1] if within else candidates[0]
    how = (f"the largest divisor of the global batch {batch_size} that is a multiple of {P} = {procs} and at most "
           f"max({n} shard(s), {AUTO_STREAMS_FLOOR})" if within else
           f"the smallest divisor of the global batch {batch_size} that is a multiple of {P} = {procs} (streams share "
           f"the {n} shard(s))")
    return S, f"{how}; any ranks x workers dividing {S} can resume it"


class EpochPlan:
    """The reading and emission order of one worker in one epoch (see the module docstring):
    ``order[t]`` is the position emitted at time t, ``emit_time[p]`` the time position p is emitted."""

    def __init__(self, counts: list[int], epoch: int, seed: int, g: int, G: int, shuffle_buffer: int):
        self.units = worker_units(counts, epoch, seed, g, G)
        sizes = [len(range(j, counts[s], m)) for s, j, m in self.units]
        self.unit_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.length = int(self.unit_start[-1])
        rng = seeds.numpy_rng(seed, "shuffle_buffer", epoch, g)
        self.order = shuffle_buffer_order(self.length, shuffle_buffer, rng)
        self.emit_time = np.empty(self.length, dtype=np.int64)
        self.emit_time[self.order] = np.arange(self.length)

    def locate(self, p: int) -> tuple[int, int]:
        """Position -> (unit index, sample index within its shard)."""
        u = bisect.bisect_right(self.unit_start, p) - 1
        s, j, m = self.units[u]
        return u, j + m * (p - int(self.unit_start[u]))
