"""The worker side of the training stream: what one DataLoader worker (or the training process
itself, with data.num_workers=0) reads and yields.

:func:`worker_batches` is global worker (or canonical stream) ``g`` of ``G``: the emission
order of :class:`.order.EpochPlan`, read through :class:`_PlanReader` (the bytes of samples
still to come, everything already delivered skipped unread), decoded, flipped, stacked into
batches. :class:`_Stream` plays one worker per rank (the round-robin order), :class:`_Streams`
several canonical streams per worker (``data.streams``). :mod:`.loader` is the main-process side.
"""

from __future__ import annotations

import signal
from typing import Iterator

import numpy as np
import torch

from .. import seeds
from .order import EpochPlan
from .reader import BadDataPolicy, SampleDecoder, ShardCursor, stack_batch
from .splits import Split

class _PlanReader:
    """Reads a worker's positions in stream order from ``t0`` on, keeping the bytes of those
    still to be emitted and skipping the rest unread. A position of a broken shard, from its
    break on, holds None (the break went to ``policy`` once, when the cursor met it)."""

    def __init__(self, split: Split, plan: EpochPlan, t0: int, policy: BadDataPolicy):
        self.split, self.plan, self.t0, self.policy = split, plan, t0, policy
        self.pending: dict[int, tuple | None] = {}
        self.ptr = int(plan.order[t0:].min()) if t0 < plan.length else plan.length
        self.unit = -1
        self.cursor: ShardCursor | None = None

    def close(self) -> None:
        if self.cursor is not None:
            self.cursor.close()
        self.cursor = None

    def get(self, p: int) -> tuple | None:
        """(shard, index in the shard, key, members) of position ``p``, or None (a broken shard)."""
        while self.ptr <= p:
            self._read_one()
        return self.pending.pop(p)

    def _read_one(self) -> None:
        p = self.ptr
        u, idx = self.plan.locate(p)
        s = self.plan.units[u][0]
        if u != self.unit:
            self.close()
            self.unit, self.cursor = u, ShardCursor(self.split, s, self.policy)
        want = self.plan.emit_time[p] >= self.t0
        got = self.cursor.read(idx, want)
        if want:
            self.pending[p] = None if got is None else (s, idx, *got)
        self.ptr += 1


def worker_batches(split: Split, data_cfg, seed: int, g: int, G: int, batch_size: int, start: tuple[int, int],
                   worker: int, known: dict | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, tuple]]:
    """Global worker g's infinite stream of (x uint8 [B, C, H, W], y int64 [B] | None,
    (worker, epoch, t, met) after the batch), from ``start`` = (epoch, t). ``met``: the bad data
    first met while making the batch, as :attr:`.reader.BadDataPolicy.met` lists it; ``known``:
    the ledger of what was met before (those are not reported again)."""
    epoch, t = start
    counts = split.counts
    decode = SampleDecoder(split.manifest)
    policy = BadDataPolicy(data_cfg.bad_data, data_cfg.max_skipped, split.where, known, echo=False)
    xs, ys = [], []
    flips: dict[int, np.ndarray] = {}
    while True:
        plan = EpochPlan(counts, epoch, seed, g, G, data_cfg.shuffle_buffer)
        reader = _PlanReader(split, plan, t, policy)
        flips.clear()
        try:
            while t < plan.length:
                item = reader.get(int(plan.order[t]))
                t += 1
                if item is None:  # a broken shard's sample: counted once, with the break
                    continue
                s, idx, key, members = item
                try:
                    x, y = decode(members)
                except ValueError as e:
                    policy.sample(split.urls[s], split.manifest.shards[s].name, key, idx, str(e))
                    continue
                if data_cfg.random_flip:
                    if s not in flips:  # a function of (seed, epoch, shard, index): independent of ranks/workers
                        flips[s] = seeds.numpy_rng(seed, "flip", epoch, s).random(counts[s]) < 0.5
                    if flips[s][idx]:
                        x = x[:, ::-1]
                xs.append(x)
                ys.append(y)
                if len(xs) == batch_size:
                    xb, yb = stack_batch(xs, ys, split.manifest.labels, split.image_shape)
                    xs, ys = [], []
                    yield xb, yb, (worker, epoch, t, policy.take_met())
        finally:
            reader.close()
        epoch, t = epoch + 1, 0


def _ignore_job_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Slurm sends SIGTERM / SIGUSR1 / SIGUSR2 to every process of a
    task; a worker they ended would fail the main process's next fetch, and the main process (which
    saves a checkpoint on them, flowscale.preemption) stops its workers itself. SIG_IGN is inherited
    by pipe: children too, so a shard being streamed is not cut off (that would read as a broken shard)."""
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)


class _Stream(torch.utils.data.IterableDataset):
    """DataLoader worker i plays logical worker (i + rotation) mod W, so a resumed DataLoader
    (which always starts with worker 0) continues the round-robin where the last one stopped."""

    def __init__(self, split: Split, data_cfg, seed: int, rank: int, num_workers: int, world_size: int,
                 batch_size: int, starts: list[tuple[int, int]], rotation: int, known: dict):
        self.split, self.cfg, self.seed = split, data_cfg, seed
        self.rank, self.W, self.world = rank, num_workers, world_size
        self.batch_size, self.starts, self.rotation, self.known = batch_size, starts, rotation, known

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        i = 0 if info is None else info.id
        w = (i + self.rotation) % self.W
        g = self.rank * self.W + w
        return worker_batches(self.split, self.cfg, self.seed, g, self.world * self.W, self.batch_size,
                              self.starts[w], w, self.known)


class _Streams(torch.utils.data.IterableDataset):
    """Canonical streams (``data.streams`` = S): the rank's streams are split into equal blocks,
    DataLoader worker i reads block i and yields, for every step, b samples of each of its
    streams in stream order (stream g is :func:`worker_batches` of g of S). The rank's batch is
    the concatenation of one item from each worker, in worker order."""

    def __init__(self, split: Split, data_cfg, seed: int, streams: list[int], num_workers: int, b: int,
                 starts: dict[int, tuple[int, int]], known: dict):
        self.split, self.cfg, self.seed, self.streams, self.W = split, data_cfg, seed, streams, num_workers
        self.b, self.starts, self.known = b, starts, known

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        i = 0 if info is None else info.id
        k = len(self.streams) // self.W
        S = self.cfg.streams
        gens = [worker_batches(self.split, self.cfg, self.seed, g, S, self.b, self.starts[g], g, self.known)
                for g in self.streams[i * k:(i + 1) * k]]
        while True:
            parts = [next(gen) for gen in gens]
            x = torch.cat([part[0] for part in parts])
            y = None if parts[0][1] is None else torch.cat([part[1] for part in parts])
            yield x, y, (i, [part[2][:3] for part in parts], [m for part in parts for m in part[2][3]])
