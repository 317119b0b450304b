"""The training stream: per-rank batches in the order of :mod:`.order`, with an exact ``state_dict()``.

A worker's emission order for an epoch follows from the manifest counts and the seed alone
(:class:`.order.EpochPlan`), so the state of a worker is just ``(epoch, t)``.
Resuming at ``t`` reopens the stream at the earliest position still to be emitted, skips
(seeks over, unread and undecoded) everything already delivered, and continues: the next
batches are exactly those an uninterrupted run would have produced. Horizontal flips are drawn
per (epoch, shard) from the seed ("flip" in :mod:`flowscale.seeds`) and indexed by the
sample's place in its shard, so they do not depend on the number of ranks or workers.

Workers run as torch DataLoader processes that build whole batches; the DataLoader hands them
out round-robin, so batch n of a rank came from worker n mod num_workers. They decode each
sample straight into a slot of a :class:`.workers.BatchRing` in shared memory and send only
the batch number; the batch handed out is a view of the slot, which is reused once the
caller lets go of it (a caller keeping batches gets batches the workers made apart). The loader records
each batch's end position per worker; ``state_dict()`` is that list. Shards are read through
:class:`.reader.ShardCursor`, which holds them to the manifest; bad data goes to
:class:`.reader.BadDataPolicy`.

With ``data.bad_data=skip`` the rank keeps a ledger of the distinct bad samples and broken
shards its batches met, in its state: a bad sample is counted, printed and held against
``data.max_skipped`` once per run, not once per epoch, and a resumed run knows what it had met.
Workers report what they meet with each batch; the main process merges it, so the ledger
holds exactly what the delivered batches met. What a worker knows never changes what it
yields (the samples a bad shard gives are a function of its bytes), so resume stays exact.
``merge_bad_keys`` adopts what other ranks met (the trainer all-gathers ``bad_keys``), making
the count and the limit run-wide. DataLoader workers ignore SIGTERM, SIGUSR1 and SIGUSR2:
Slurm signals every process of a task, and the main process, which saves a checkpoint on
those signals, stops its workers itself.
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import weakref

import numpy as np
import torch

from .order import check_sharing, choose_streams
from .reader import BadDataPolicy
from .splits import Split, resolve_split
from .workers import BatchRing, _ignore_job_signals, _Stream, _Streams


def _close_at_exit(ref: weakref.ref) -> None:
    # Registered after multiprocessing's own exit hook, so it runs first: that hook terminate()s daemonic
    # workers (a SIGTERM, ignored) and then joins them, which would wait for ever.
    loader = ref()
    if loader is not None:
        loader.close()


class ShardLoader:
    """Infinite iterator of (x uint8 [B, C, H, W], y int64 [B] | None) for one rank, with an
    exact ``state_dict()``. B = data.batch_size / world_size.

    With ``data.streams`` = S > 0 the order is the canonical streams' (see :class:`_Streams` and
    the config field): global batch t is the same for every world size and worker count that
    divide S, and the state holds every stream's position once the ranks have exchanged theirs
    (:meth:`stream_positions` / :meth:`adopt_positions`), so any such topology can resume it.
    ``data.streams`` = None takes :func:`.order.choose_streams`'s S for this topology (what a new
    run chooses; ``flowscale train`` resolves it first, to the recorded value on a resume)."""

    PREFETCH = 2
    """The DataLoader's prefetch_factor: items asked of each worker ahead of the one being read."""

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
        self.S = data_cfg.streams
        if self.S is None:  # a new run's choice (flowscale train resolves it first, a resume to the recorded one)
            self.S, _ = choose_streams(data_cfg.batch_size, split.counts, world_size, self.num_workers)
        if self.S:
            if self.S % (world_size * self.W):
                raise ConfigError(f"config field 'data.streams': {self.S} streams cannot be divided among {world_size} "
                                  f"rank(s) x {self.W} loader worker(s); use a world size and data.num_workers whose "
                                  f"product divides {self.S} (data.streams is fixed when the run is created)")
            per_rank = self.S // world_size
            self.my_streams = list(range(rank * per_rank, (rank + 1) * per_rank))
            self.stream_pos: dict[int, tuple[int, int]] = {g: (0, 0) for g in range(self.S)}
            self._block_pos: dict[int, list[tuple[int, int]]] = {}  # worker -> its block's latest positions
            check_sharing(split.counts, self.S, 1, split.where)
        else:
            check_sharing(split.counts, world_size, self.W, split.where)
        self.positions: list[tuple[int, int]] = [(0, 0)] * self.W
        self.batches = 0
        self._it = None
        self._n, self._ring, self._parts = 0, None, []  # batches taken from this DataLoader, the workers' BatchRing,
        # and (data.streams) batches the workers sent ahead, each as its parts
        self._workers: list = []
        self.policy = BadDataPolicy(data_cfg.bad_data, data_cfg.max_skipped, split.where)
        self._note_bad_shards(echo=rank == 0)

    def _note_bad_shards(self, echo: bool) -> None:
        """Shards load_split left out: every rank finds the same ones, so rank 0 alone says so."""
        for s, reason in sorted(self.split.bad_shards.items()):
            entry = self.split.manifest.shards[s]
            self.policy.note(entry.name, 0, entry.count, f"shard {self.split.urls[s]}: {reason} (the whole shard: "
                             f"{entry.count} samples, left out of the run)", echo=echo)
        self.policy.take_met()

    def _iterator(self):
        self._n, self._ring, self._parts = 0, None, []
        if self.num_workers:
            # Batches a worker can be writing while the caller holds batch n (and n - 1, until the assignment
            # of n lets it go): the DataLoader asks for PREFETCH items per worker ahead, an item being a batch
            # (data.streams=0) or a worker's parts of W batches (streams). One slot to spare.
            self._ring = BatchRing(self.PREFETCH * self.W + 3, self.batch_size, self.split.image_shape, self.split.manifest.labels)
        if self.S:
            ds = _Streams(self.split, self.cfg, self.seed, self.S, self.my_streams, self.W, self.cfg.batch_size // self.S,
                          dict(self._positions()), dict(self.policy.bad), self._ring, group=self.W)
        else:
            ds = _Stream(self.split, self.cfg, self.seed, self.rank, self.W, self.world_size, self.batch_size,
                         list(self.positions), self.batches % self.W, dict(self.policy.bad), self._ring)
        if self.num_workers == 0:
            return iter(ds)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                             timeout=self.cfg.worker_timeout_s, prefetch_factor=self.PREFETCH,
                                             worker_init_fn=_ignore_job_signals)
        # iter() forks the workers. What they inherit must not be garbage-collected there: the finalizer of
        # a torch.distributed process group left over from an earlier run waits for threads a fork does not
        # copy, and the worker hangs. Frozen objects are never collected in the workers; this process
        # unfreezes them at once.
        before = set(multiprocessing.active_children())
        gc.freeze()
        try:
            it = iter(loader)
        finally:
            gc.unfreeze()
        self._workers = [w for w in multiprocessing.active_children() if w not in before]
        atexit.register(_close_at_exit, weakref.ref(self))
        return it

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._it is None:
            self._it = self._iterator()
        if self.S:
            return self._next_streams()
        x, y, (w, epoch, t, met) = next(self._it)
        if w != self.batches % self.W:  # the round-robin contract the resume relies on
            raise RuntimeError(f"loader batch {self.batches} came from worker {w}, expected {self.batches % self.W}")
        self.positions[w] = (epoch, t)
        self.batches += 1
        for entry in met:  # printed here, so a sample met by two workers is named once
            self.policy.note(*entry)
        return self._take(x, y)

    def _next_streams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self._parts:  # one item per worker, in worker order, each its parts of the next W batches
            self._parts = list(zip(*[next(self._it) for _ in range(self.W)]))[::-1]
        parts = self._parts.pop()  # batch n's part from every worker
        for j, (_, _, (w, positions, met)) in enumerate(parts):
            if w != j:
                raise RuntimeError(f"loader batch {self.batches}: part {j} came from worker {w}")
            self._block_pos[j] = positions  # read into stream_pos when asked (_positions): not per batch
            for entry in met:
                self.policy.note(*entry)
        self.batches += 1
        n, ring = self._n, self._ring
        self._n += 1
        if len(parts) == 1 and not isinstance(parts[0][0], int):  # no workers: the whole batch
            return parts[0][0], parts[0][1]
        for x, _, _ in parts:
            self._check_slot(x, n)
        if all(isinstance(x, int) for x, _, _ in parts):  # the workers wrote it together, in its slot
            return ring.take(n)
        # a worker found the slot still held (the caller keeps batches) and sent its part: join them
        rows = self.batch_size // self.W
        xs, ys = zip(*[(ring.x[n % ring.K, j * rows:(j + 1) * rows], None if ring.y is None else
                        ring.y[n % ring.K, j * rows:(j + 1) * rows]) if isinstance(x, int) else (x, y)
                       for j, (x, y, _) in enumerate(parts)])
        x, y = torch.cat(xs), None if ys[0] is None else torch.cat(ys)
        ring.passed(n)
        return x, y

    def _take(self, x, y) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch of this DataLoader: the tensors its worker handed over, or its slot of the ring."""
        n = self._n
        self._n += 1
        if not isinstance(x, int):
            if self._ring is not None:
                self._ring.passed(n)
            return x, y
        self._check_slot(x, n)
        return self._ring.take(n)

    def _check_slot(self, x, n: int) -> None:
        if isinstance(x, int) and x != n:
            raise RuntimeError(f"loader batch {self.batches - 1}: a worker wrote batch {x} of its ring, expected {n}")

    def _positions(self) -> dict[int, tuple[int, int]]:
        """Every stream's (epoch, t): the workers' latest positions of this rank's streams
        (worker j reads the j-th block of them) over what was saved or adopted."""
        k = len(self.my_streams) // self.W
        for j, positions in self._block_pos.items():
            self.stream_pos.update(zip(self.my_streams[j * k:(j + 1) * k], positions))
        self._block_pos.clear()
        return self.stream_pos

    def stream_positions(self) -> dict[int, tuple[int, int]]:
        """This rank's streams and their (epoch, t): what the other ranks need to hold every
        stream's place (the trainer all-gathers it before each save)."""
        return {g: self._positions()[g] for g in self.my_streams} if self.S else {}

    def adopt_positions(self, gathered) -> None:
        """Take the positions of the streams other ranks read (a list of :meth:`stream_positions`)."""
        for positions in gathered:
            for g, pos in positions.items():
                if int(g) not in self.my_streams:
                    self.stream_pos[int(g)] = (int(pos[0]), int(pos[1]))

    @property
    def bad_keys(self) -> dict[tuple[str, int], int]:
        """The distinct bad data this rank's batches met (bad_data=skip), :class:`.reader.BadDataPolicy`'s
        ledger: (shard name, index in the shard) -> samples lost there."""
        return dict(self.policy.bad)

    @property
    def skipped(self) -> int:
        """Samples lost to bad data so far (each bad sample or broken shard counted once per run)."""
        return self.policy.skipped

    def merge_bad_keys(self, ledgers) -> None:
        """Adopt the ``bad_keys`` of other ranks (e.g. ``all_gather_objects(loader.bad_keys)``): after it,
        ``skipped``, the ``data.max_skipped`` check (a DataError on every rank alike) and the saved state
        are run-wide. What other ranks met is not printed again here."""
        for ledger in ledgers:
            for (name, index), lost in sorted(ledger.items()):
                self.policy.note(name, index, lost, f"shard {name}, #{index} (met by another rank)", echo=False)
        self.policy.take_met()

    @property
    def epoch(self) -> float:
        """Epochs completed by this rank's workers (streams), on average (for logging)."""
        if self.S:
            return float(np.mean([self._positions()[g][0] for g in self.my_streams]))
        return float(np.mean([p[0] for p in self.positions]))

    def _fingerprint(self) -> dict:
        common = {"seed": self.seed, "shuffle_buffer": self.cfg.shuffle_buffer,
                  "random_flip": bool(self.cfg.random_flip), "counts": list(self.split.counts)}
        if self.S:  # no rank, world size or worker count: any topology dividing S resumes it
            return {**common, "streams": self.S, "global_batch": self.cfg.batch_size}
        return {**common, "rank": self.rank, "world_size": self.world_size, "workers": self.W,
                "batch_size": self.batch_size}

    def state_dict(self) -> dict:
        """Batches delivered, each worker's (epoch, t), the bad-data ledger as sorted
        [shard name, index, samples lost] rows, and the fingerprint a resume must match."""
        bad = [[name, index, lost] for (name, index), lost in sorted(self.policy.bad.items())]
        if self.S:
            return {"batches": self.batches, "stream_positions": [list(self._positions()[g]) for g in range(self.S)],
                    "bad": bad, **self._fingerprint()}
        return {"batches": self.batches, "positions": [list(p) for p in self.positions], "bad": bad,
                **self._fingerprint()}

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
        if self.S:
            self.stream_pos = {g: (int(p[0]), int(p[1])) for g, p in enumerate(state["stream_positions"])}
            self._block_pos = {}
        else:
            self.positions = [(int(p[0]), int(p[1])) for p in state["positions"]]  # older states add a skip count
        self.policy.bad.clear()
        self._note_bad_shards(echo=False)  # what this start's load_split left out (said already), and what the run met
        self.merge_bad_keys([{(str(n), int(i)): int(lost) for n, i, lost in state.get("bad", [])}])
        self._it = None

    def close(self) -> None:
        """Stop the workers: the DataLoader's own shutdown, then SIGKILL for a worker that outlives it
        (its last resort, terminate(), is a SIGTERM, which the workers ignore; e.g. one stuck in a read)."""
        it, self._it = self._it, None
        if hasattr(it, "_shutdown_workers"):  # what the DataLoader iterator's __del__ calls
            it._shutdown_workers()
        for w in self._workers:
            if w.is_alive():
                w.kill()
                w.join()
        self._workers = []


def build_train_loader(data_cfg, rank: int = 0, world_size: int = 1, seed: int | None = None) -> ShardLoader:
    """The training stream of ``rank`` (demo data is built into shards on first use)."""
    return ShardLoader(resolve_split(data_cfg, "train"), data_cfg, rank, world_size,
                       data_cfg.seed if seed is None else seed)
