"""The training stream: per-rank batches in the order of :mod:`.order`, with an exact ``state_dict()``.

A worker's emission order for an epoch follows from the manifest counts and the seed alone
(:class:`.order.EpochPlan`), so the state of a worker is just ``(epoch, t, skipped)``.
Resuming at ``t`` reopens the stream at the earliest position still to be emitted, skips
(seeks over, unread and undecoded) everything already delivered, and continues: the next
batches are exactly those an uninterrupted run would have produced. Horizontal flips are drawn
per (epoch, shard) from the seed ("flip" in :mod:`flowscale.seeds`) and indexed by the
sample's place in its shard, so they do not depend on the number of ranks or workers.

Workers run as torch DataLoader processes that build whole batches; the DataLoader hands them
out round-robin, so batch n of a rank came from worker n mod num_workers. The loader records
each batch's end position per worker; ``state_dict()`` is that list. Shards are read through
:class:`.reader.ShardCursor`, which holds them to the manifest; bad samples go to
:class:`.reader.BadDataPolicy`.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .. import seeds
from .order import EpochPlan, check_sharing
from .reader import BadDataPolicy, SampleDecoder, ShardCursor, stack_batch
from .splits import Split, resolve_split


@dataclass
class _Bad:
    shard: str
    key: str
    index: int
    reason: str


class _PlanReader:
    """Reads a worker's positions in stream order from ``t0`` on, keeping the bytes of those
    still to be emitted and skipping the rest unread."""

    def __init__(self, split: Split, plan: EpochPlan, t0: int):
        self.split, self.plan, self.t0 = split, plan, t0
        self.pending: dict[int, tuple | _Bad] = {}
        self.ptr = int(plan.order[t0:].min()) if t0 < plan.length else plan.length
        self.unit = -1
        self.cursor: ShardCursor | None = None

    def close(self) -> None:
        if self.cursor is not None:
            self.cursor.close()
        self.cursor = None

    def get(self, p: int) -> tuple | _Bad:
        """(shard, index in the shard, key, members) of position ``p``, or why it is bad."""
        while self.ptr <= p:
            self._read_one()
        return self.pending.pop(p)

    def _read_one(self) -> None:
        p = self.ptr
        u, idx = self.plan.locate(p)
        s = self.plan.units[u][0]
        if u != self.unit:
            self.close()
            self.unit, self.cursor = u, ShardCursor(self.split, s)
        want = self.plan.emit_time[p] >= self.t0
        got = self.cursor.read(idx, want)
        if want and got is None:
            self.pending[p] = _Bad(self.split.urls[s], "?", idx, self.cursor.broken)
        elif want:
            self.pending[p] = (s, idx, *got)
        self.ptr += 1


def worker_batches(split: Split, data_cfg, seed: int, g: int, G: int, batch_size: int, start: tuple[int, int, int],
                   worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, tuple]]:
    """Global worker g's infinite stream of (x uint8 [B, C, H, W], y int64 [B] | None,
    (worker, epoch, t, skipped) after the batch)."""
    epoch, t, skipped = start
    counts = split.counts
    decode = SampleDecoder(split.manifest)
    policy = BadDataPolicy(data_cfg.bad_data, data_cfg.max_skipped, split.where, skipped)
    xs, ys = [], []
    flips: dict[int, np.ndarray] = {}
    while True:
        plan = EpochPlan(counts, epoch, seed, g, G, data_cfg.shuffle_buffer)
        reader = _PlanReader(split, plan, t)
        flips.clear()
        try:
            while t < plan.length:
                item = reader.get(int(plan.order[t]))
                t += 1
                if isinstance(item, _Bad):
                    policy(item.shard, item.key, item.index, item.reason)
                    continue
                s, idx, key, members = item
                try:
                    x, y = decode(members)
                except ValueError as e:
                    policy(split.urls[s], key, idx, str(e))
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
                    yield xb, yb, (worker, epoch, t, policy.skipped)
        finally:
            reader.close()
        epoch, t = epoch + 1, 0


class _Stream(torch.utils.data.IterableDataset):
    """DataLoader worker i plays logical worker (i + rotation) mod W, so a resumed DataLoader
    (which always starts with worker 0) continues the round-robin where the last one stopped."""

    def __init__(self, split: Split, data_cfg, seed: int, rank: int, num_workers: int, world_size: int,
                 batch_size: int, starts: list[tuple[int, int, int]], rotation: int):
        self.split, self.cfg, self.seed = split, data_cfg, seed
        self.rank, self.W, self.world = rank, num_workers, world_size
        self.batch_size, self.starts, self.rotation = batch_size, starts, rotation

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        i = 0 if info is None else info.id
        w = (i + self.rotation) % self.W
        g = self.rank * self.W + w
        return worker_batches(self.split, self.cfg, self.seed, g, self.world * self.W, self.batch_size,
                              self.starts[w], w)


class ShardLoader:
    """Infinite iterator of (x uint8 [B, C, H, W], y int64 [B] | None) for one rank, with an
    exact ``state_dict()``. B = data.batch_size / world_size."""

    def __init__(self, split: Split, data_cfg, rank: int = 0, world_size: int = 1, seed: int = 0):
        from ..config import ConfigError

        if data_cfg.batch_size % world_size:
            raise ConfigError(f"config field 'data.batch_size': {data_cfg.batch_size} must be divisible by the "
                              f"world size {world_size}")
        self.split, self.cfg, self.seed = split, data_cfg, seed
        self.rank, self.world_size = rank, world_size
        self.batch_size = data_cfg.batch_size // world_size
        self.num_workers = data_cfg.num_workers
        self.W = max(1, self.num_workers)
        check_sharing(split.counts, world_size, self.W, split.where)
        self.positions: list[tuple[int, int, int]] = [(0, 0, 0)] * self.W
        self.batches = 0
        self._it = None

    def _iterator(self):
        ds = _Stream(self.split, self.cfg, self.seed, self.rank, self.W, self.world_size, self.batch_size,
                     list(self.positions), self.batches % self.W)
        if self.num_workers == 0:
            return iter(ds)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                             timeout=self.cfg.worker_timeout_s, prefetch_factor=2)
        # iter() forks the workers. What they inherit must not be garbage-collected there: the finalizer of
        # a torch.distributed process group left over from an earlier run waits for threads a fork does not
        # copy, and the worker hangs. Frozen objects are never collected in the workers; this process
        # unfreezes them at once.
        gc.freeze()
        try:
            return iter(loader)
        finally:
            gc.unfreeze()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._it is None:
            self._it = self._iterator()
        x, y, (w, epoch, t, skipped) = next(self._it)
        if w != self.batches % self.W:  # the round-robin contract the resume relies on
            raise RuntimeError(f"loader batch {self.batches} came from worker {w}, expected {self.batches % self.W}")
        self.positions[w] = (epoch, t, skipped)
        self.batches += 1
        return x, y

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far by this rank's workers (bad_data=skip)."""
        return sum(p[2] for p in self.positions)

    @property
    def epoch(self) -> float:
        """Epochs completed by this rank's workers, on average (for logging)."""
        return float(np.mean([p[0] for p in self.positions]))

    def _fingerprint(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "workers": self.W,
                "batch_size": self.batch_size, "shuffle_buffer": self.cfg.shuffle_buffer,
                "random_flip": bool(self.cfg.random_flip), "counts": list(self.split.counts)}

    def state_dict(self) -> dict:
        return {"batches": self.batches, "positions": [list(p) for p in self.positions], **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._fingerprint()
        diff = [k for k in mine if state.get(k) != mine[k]]
        if diff:
            show = {k: (state.get(k), mine[k]) for k in diff if k != "counts"}
            if "counts" in diff:
                show["counts"] = "the split's shards differ"
            raise ValueError(f"loader state does not fit this run: {show} (saved, now); resume with the same data "
                             f"config, world size and data.num_workers")
        self.batches = int(state["batches"])
        self.positions = [tuple(int(v) for v in p) for p in state["positions"]]
        self._it = None

    def close(self) -> None:
        self._it = None


def build_train_loader(data_cfg, rank: int = 0, world_size: int = 1, seed: int | None = None) -> ShardLoader:
    """The training stream of ``rank`` (demo data is built into shards on first use)."""
    return ShardLoader(resolve_split(data_cfg, "train"), data_cfg, rank, world_size,
                       data_cfg.seed if seed is None else seed)
