"""The worker side of the training stream: what one DataLoader worker (or the training process
itself, with data.num_workers=0) reads and yields.

:class:`_StreamReader` is global worker (or canonical stream) ``g`` of ``G``: the emission
order of :class:`.order.EpochPlan`, read through :class:`_PlanReader` (the bytes of samples
still to come, everything already delivered skipped unread), decoded, flipped, written into
batches. :class:`_Stream` plays one worker per rank (the round-robin order), :class:`_Streams`
several canonical streams per worker (``data.streams``). :mod:`.loader` is the main-process side.
"""

from __future__ import annotations

import os
import signal
import weakref

import numpy as np
import torch

from .. import seeds
from .order import EpochPlan
from .reader import BadDataPolicy, SampleDecoder, ShardCursor
from .splits import Split
from .tar import READ_AHEAD, read_ahead

class _PlanReader:
    """Reads a worker's positions in stream order from ``t0`` on, keeping the bytes of those
    still to be emitted and skipping the rest unread. A position of a broken shard, from its
    break on, holds None (the break went to ``policy`` once, when the cursor met it)."""

    def __init__(self, split: Split, plan: EpochPlan, t0: int, policy: BadDataPolicy, buffer: int = READ_AHEAD):
        self.split, self.plan, self.t0, self.policy, self.buffer = split, plan, t0, policy, buffer
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
            self.unit, self.cursor = u, ShardCursor(self.split, s, self.policy, self.buffer)
        want = self.plan.emit_time[p] >= self.t0
        got = self.cursor.read(idx, want)
        if want:
            self.pending[p] = None if got is None else (s, idx, *got)
        self.ptr += 1


class _StreamReader:
    """Global worker (or canonical stream) ``g`` of ``G`` from ``start`` = (epoch, t): the emission
    order of :class:`.order.EpochPlan`, read through :class:`_PlanReader`, decoded and flipped
    straight into the caller's batch rows (:meth:`fill`), so a sample's pixels are copied once,
    from the shard's bytes to the batch. ``known``: the ledger of bad data met before (not
    reported again). ``buffer``: a local shard's read-ahead (:func:`.tar.read_ahead`)."""

    def __init__(self, split: Split, data_cfg, seed: int, g: int, G: int, start: tuple[int, int],
                 known: dict | None = None, buffer: int = READ_AHEAD):
        self.split, self.cfg, self.seed, self.g, self.G, self.buffer = split, data_cfg, seed, g, G, buffer
        self.epoch, self.t = start
        self.counts = split.counts  # a list made from the manifest on every access: once, not per fill
        self.decode = SampleDecoder(split.manifest)
        self.policy = BadDataPolicy(data_cfg.bad_data, data_cfg.max_skipped, split.where, known, echo=False,
                                    advice=split.convert_advice)
        self.plan: EpochPlan | None = None
        self.reader: _PlanReader | None = None
        self.flips: dict[int, np.ndarray] = {}

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def fill(self, x: np.ndarray, y: np.ndarray | None) -> tuple[int, int, list]:
        """Write the next len(x) samples into ``x`` (uint8 [b, C, H, W]) and their labels into ``y``
        (int64 [b], or None); returns (epoch, t, met) after them. ``met``: the bad data first met
        while filling, as :attr:`.reader.BadDataPolicy.met` lists it."""
        split, counts, decode, flip, i, b = self.split, self.counts, self.decode, self.cfg.random_flip, 0, len(x)
        while i < b:
            if self.plan is None:
                self.plan = EpochPlan(counts, self.epoch, self.seed, self.g, self.G, self.cfg.shuffle_buffer)
                self.reader = _PlanReader(split, self.plan, self.t, self.policy, self.buffer)
                self.flips.clear()
                self.whole_epoch, self.usable = self.t == 0, 0
            if self.t >= self.plan.length:
                if self.whole_epoch and not self.usable:  # all skipped (bad_data=skip): no batch could ever be filled
                    raise self.policy.nothing_usable(f"split {split.where} (the shards of data worker {self.g} of "
                                                     f"{self.G})")
                self.reader.close()
                self.plan, self.epoch, self.t = None, self.epoch + 1, 0
                continue
            item = self.reader.get(int(self.plan.order[self.t]))
            self.t += 1
            if item is None:  # a broken shard's sample: counted once, with the break
                continue
            s, idx, key, members = item
            try:
                xi, yi = decode(members)
            except ValueError as e:
                self.policy.sample(split.urls[s], split.manifest.shards[s].name, key, idx, e)
                continue
            if flip:
                if s not in self.flips:  # a function of (seed, epoch, shard, index): independent of ranks/workers
                    self.flips[s] = seeds.numpy_rng(self.seed, "flip", self.epoch, s).random(counts[s]) < 0.5
                if self.flips[s][idx]:
                    xi = xi[:, ::-1]
            x[i] = xi.transpose(2, 0, 1)  # [H, W, C] -> [C, H, W], the one copy of the pixels
            if y is not None:
                y[i] = yi
            i += 1
            self.usable += 1
        return self.epoch, self.t, self.policy.take_met() if self.policy.met else []


def _batch_arrays(b: int, split: Split) -> tuple[np.ndarray, np.ndarray | None]:
    return (np.empty((b, *split.image_shape), dtype=np.uint8),
            np.empty(b, dtype=np.int64) if split.manifest.labels else None)


class BatchRing:
    """K batch slots in shared memory, made by the training process before its DataLoader
    workers start: a worker writes its samples straight into slot n mod K and hands over only
    the batch number n (the n-th batch of this DataLoader), so a batch costs no shared-memory
    segment of its own (an shm file, fd passing, a fresh mapping whose pages fault in on both
    sides), no copy into it, and, with canonical streams, no join of the workers' parts.

    The training process hands batch n out as a view of its slot and lets the slot go when the
    last reference to that view is gone, so a batch stays valid as long as it is held. A worker
    may write batch n into slot k = n mod K once ``released[k] >= n - K``: the training process
    has seen every earlier batch of the slot (n - K, n - 2K, ...) and holds none of them.
    Otherwise (a caller keeping many batches) it makes a batch of its own, handed over the
    usual way, and the slot's turn passes."""

    def __init__(self, slots: int, batch_size: int, image_shape: tuple[int, int, int], labels: bool):
        self.K = slots
        self.x = torch.empty((slots, batch_size, *image_shape), dtype=torch.uint8).share_memory_()
        self.y = torch.empty((slots, batch_size), dtype=torch.int64).share_memory_() if labels else None
        self.released = torch.arange(-slots, 0, dtype=torch.int64).share_memory_()
        self._latest = list(range(-slots, 0))  # training process: the last batch seen per slot, and whether
        self._held = [False] * slots  # the caller holds it

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        # numpy views of the shared tensors, made once per process (not pickled: a spawned worker makes its own)
        if getattr(self, "_pid", None) != os.getpid():
            self._pid = os.getpid()
            self._np = self.x.numpy(), None if self.y is None else self.y.numpy(), self.released.numpy()
        return self._np

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_pid", "_np")}

    def claim(self, n: int, rows: slice) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Worker side: the ``rows`` of slot n mod K to write batch n into, or None while the slot is held."""
        x, y, released = self._arrays()
        k = n % self.K
        if released[k] < n - self.K:
            return None
        return x[k, rows], None if y is None else y[k, rows]

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training-process side: batch n, written into its slot, as (x view of the slot, y copy)."""
        k = n % self.K
        view = self.x.numpy()[k]  # a new array object per batch: its lifetime is the batch's
        self._latest[k], self._held[k] = n, True
        weakref.finalize(view, self._let_go, k)
        return torch.from_numpy(view), None if self.y is None else self.y[k].clone()

    def passed(self, n: int) -> None:
        """Training-process side: batch n came without its slot (or was copied out of it)."""
        k = n % self.K
        self._latest[k] = n
        if not self._held[k]:
            self.released.numpy()[k] = n

    def _let_go(self, k: int) -> None:
        self._held[k] = False
        self.released.numpy()[k] = self._latest[k]


def _ignore_job_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Slurm sends SIGTERM / SIGUSR1 / SIGUSR2 to every process of a
    task; a worker they ended would fail the main process's next fetch, and the main process (which
    saves a checkpoint on them, flowscale.preemption) stops its workers itself. SIG_IGN is inherited
    by pipe: children too, so a shard being streamed is not cut off (that would read as a broken shard)."""
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)


class _Stream(torch.utils.data.IterableDataset):
    """DataLoader worker i plays logical worker (i + rotation) mod W, so a resumed DataLoader
    (which always starts with worker 0) continues the round-robin where the last one stopped.
    Its batches are the DataLoader's i, i + W, ...; with a :class:`BatchRing` they are written
    into it."""

    def __init__(self, split: Split, data_cfg, seed: int, rank: int, num_workers: int, world_size: int,
                 batch_size: int, starts: list[tuple[int, int]], rotation: int, known: dict,
                 ring: BatchRing | None = None):
        self.split, self.cfg, self.seed = split, data_cfg, seed
        self.rank, self.W, self.world = rank, num_workers, world_size
        self.batch_size, self.starts, self.rotation, self.known = batch_size, starts, rotation, known
        self.ring = ring

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        i = 0 if info is None else info.id
        w = (i + self.rotation) % self.W
        g = self.rank * self.W + w
        reader = _StreamReader(self.split, self.cfg, self.seed, g, self.world * self.W, self.starts[w], self.known)
        n = i
        try:
            while True:
                slot = None if self.ring is None else self.ring.claim(n, slice(None))
                x, y = _batch_arrays(self.batch_size, self.split) if slot is None else slot
                epoch, t, met = reader.fill(x, y)
                yield (*_handed_over(n, slot, x, y), (w, epoch, t, met))
                n += self.W
        finally:
            reader.close()


class _Streams(torch.utils.data.IterableDataset):
    """Canonical streams (``data.streams`` = S): the rank's streams are split into equal blocks,
    DataLoader worker i reads block i and writes, for every step, b samples of each of its
    streams in stream order (stream g is :class:`_StreamReader` g of S) into its rows of the
    rank's batch: rows [i k b, (i + 1) k b) for k streams per worker. With a :class:`BatchRing`
    the rows are those of the batch's slot, so the workers build the rank's batch together in
    place; without one (a slot still held, or no workers) the training process joins the parts.
    A DataLoader item is a worker's parts of ``group`` consecutive batches (the loader uses
    group = W), so a batch costs one item, as with data.streams=0, not one per worker: on a
    busy CPU the DataLoader's per-item work in both processes is what a W-fold count costs.
    A part's positions are its block's (epoch, t), in stream order."""

    def __init__(self, split: Split, data_cfg, seed: int, S: int, streams: list[int], num_workers: int, b: int,
                 starts: dict[int, tuple[int, int]], known: dict, ring: BatchRing | None = None, group: int = 1):
        self.split, self.cfg, self.seed, self.S, self.streams, self.W = split, data_cfg, seed, S, streams, num_workers
        self.b, self.starts, self.known, self.ring, self.group = b, starts, known, ring, group

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        i = 0 if info is None else info.id
        k, b = len(self.streams) // self.W, self.b
        mine = self.streams[i * k:(i + 1) * k]
        # its k streams hold k shards open at once: they share one reader's read-ahead
        readers = [_StreamReader(self.split, self.cfg, self.seed, g, self.S, self.starts[g], self.known, read_ahead(k))
                   for g in mine]
        n = 0
        try:
            while True:
                parts = []
                for _ in range(self.group):
                    slot = None if self.ring is None else self.ring.claim(n, slice(i * k * b, (i + 1) * k * b))
                    x, y = _batch_arrays(k * b, self.split) if slot is None else slot
                    positions, met = [], []
                    for j, reader in enumerate(readers):
                        epoch, t, m = reader.fill(x[j * b:(j + 1) * b], None if y is None else y[j * b:(j + 1) * b])
                        positions.append((epoch, t))
                        if m:
                            met += m
                    parts.append((*_handed_over(n, slot, x, y), (i, positions, met)))
                    n += 1
                yield parts
        finally:
            for reader in readers:
                reader.close()


def _handed_over(n: int, slot, x: np.ndarray, y: np.ndarray | None) -> tuple:
    """What a worker hands over for batch n: (n, None) when it is in the ring, else (x, y) as tensors."""
    if slot is not None:
        return n, None
    return torch.from_numpy(x), None if y is None else torch.from_numpy(y)
