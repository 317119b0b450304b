"""The streaming loader: manifest -> shard URLs -> per-worker sample order -> decoded uint8 batches.

Order. For epoch ``e`` every rank and worker computes the same shard permutation from
``(data.seed, e)``; global worker ``g = rank * num_workers + worker`` of ``G = world_size *
num_workers`` takes every G-th shard. With fewer shards than G, each shard is split into
``m = ceil(G / n_shards)`` interleaved parts (sample i belongs to part i mod m) and the
parts are dealt out instead; a worker then reads the whole shard but decodes only its part.
Within a worker, samples pass through a shuffle buffer of ``data.shuffle_buffer`` slots. The
buffer's behaviour depends only on sample *positions*, never on pixels, so a worker computes
its whole emission order for an epoch from the manifest's per-shard counts and the seed::

    positions  = concat(parts of the worker's shards)           0 .. L-1, in reading order
    order      = shuffle_buffer(positions, rng(seed, e, g))      order[t] = position emitted at time t

The state of a worker is therefore just ``(epoch, t, skipped)``. Resuming at ``t`` reopens the
stream at the earliest position still to be emitted, skips (seeks over, unread and
undecoded) everything already delivered, and continues: the next batches are exactly those
an uninterrupted run would have produced. Each epoch covers every sample of the split once
across all ranks and workers, disjointly.

Workers run as torch DataLoader processes that build whole batches; the DataLoader hands them
out round-robin, so batch n of a rank came from worker n mod num_workers. The loader records
each batch's end position per worker; ``state_dict()`` is that list.

Bad data never passes silently: every problem (truncated or corrupt tar, a member that is not
an image, wrong size or mode, missing label, missing shard, fewer samples than the manifest
says) is either a :class:`DataError` naming the shard and sample (``data.bad_data=error``) or
a counted skip printed to stderr (``data.bad_data=skip``, at most ``data.max_skipped`` per
worker). A manifest that disagrees with its shard (size, first key, extra samples) is always
an error.
"""

from __future__ import annotations

import bisect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .shards import (IMAGE_EXTS, DataError, Manifest, SampleReader, decode_image, decode_label, is_local,
                     open_shard, read_text)


# -- where a split lives ----------------------------------------------------------------------

@dataclass
class Split:
    """A split's manifest and one URL per manifest shard."""
    manifest: Manifest
    urls: list[str]
    where: str
    """The manifest's location, for messages."""

    @property
    def counts(self) -> list[int]:
        return [s.count for s in self.manifest.shards]


def _manifest_url(loc: str) -> str:
    if is_local(loc) and Path(loc).is_dir():
        return str(Path(loc) / "manifest.json")
    return loc


def load_split(manifest: str, shards: str | None = None, bad_data: str = "error") -> Split:
    """Read ``manifest`` (a manifest.json, the split directory holding one, or a URL) and
    resolve its shards: next to the manifest, or from ``shards`` (a brace pattern / list of
    paths or URLs separated by '::' whose file names match the manifest's).

    Local shards are checked now: a missing one is an error (a counted skip with
    bad_data=skip); a size different from the manifest's is always an error.
    """
    where = _manifest_url(str(manifest))
    if is_local(where) and not Path(where).is_file():
        raise DataError(f"manifest {where} not found; create shards with `flowscale prep ...` "
                        f"(see README, Data) or point data.train_manifest/test_manifest at one")
    m = Manifest.from_json(read_text(where), where)
    names = [s.name for s in m.shards]
    if shards:
        from webdataset.shardlists import expand_urls

        given = expand_urls(shards)
        by_name = {}
        for u in given:
            base = u.rstrip("/").rsplit("/", 1)[-1]
            by_name[base] = u
        missing = [n for n in names if n not in by_name]
        extra = sorted(set(by_name) - set(names))
        if missing or extra:
            raise DataError(f"shard list {shards!r} does not match manifest {where}: "
                            + (f"missing {missing[:3]}{'...' if len(missing) > 3 else ''} " if missing else "")
                            + (f"not in the manifest {extra[:3]}{'...' if len(extra) > 3 else ''}" if extra else ""))
        urls = [by_name[n] for n in names]
    else:
        base = str(Path(where).parent) if is_local(where) else where.rsplit("/", 1)[0]
        urls = [str(Path(base) / n) if is_local(where) else f"{base}/{n}" for n in names]
    for url, s in zip(urls, m.shards):
        if not is_local(url):
            continue
        path = url[7:] if url.startswith("file:") else url
        if not os.path.exists(path):
            if bad_data == "error":
                raise DataError(f"shard {path} (listed in manifest {where}, {s.count} samples) is missing; "
                                f"re-run the conversion (it resumes) or set data.bad_data=skip to skip it (counted)")
            continue
        size = os.path.getsize(path)
        if size != s.bytes:
            raise DataError(f"shard {path} is {size} bytes but manifest {where} says {s.bytes}: the shard and the "
                            f"manifest do not match; re-run the conversion or `flowscale prep verify {where}`")
    return Split(m, urls, where)


def resolve_split(data_cfg, split: str) -> Split:
    """The ``train`` or ``test`` split of ``data_cfg``, checked against the config."""
    from ..config import ConfigError

    if data_cfg.dataset == "demo":
        from .demo import demo_shards

        root = demo_shards(data_cfg)
        src = load_split(str(root / split), None, data_cfg.bad_data)
    else:
        field = f"{split}_manifest"
        loc = getattr(data_cfg, field)
        if not loc:
            raise ConfigError(f"config field 'data.{field}': required for data.dataset=shards (a manifest.json, "
                              f"its split directory, or a URL)")
        src = load_split(loc, getattr(data_cfg, f"{split}_shards"), data_cfg.bad_data)
    m = src.manifest
    if m.resolution != data_cfg.image_size:
        raise ConfigError(f"config field 'data.image_size': {data_cfg.image_size}, but {src.where} holds "
                          f"{m.resolution}x{m.resolution} images; set data.image_size={m.resolution} or prep shards "
                          f"at {data_cfg.image_size}")
    if m.channels != data_cfg.channels:
        raise ConfigError(f"config field 'data.channels': {data_cfg.channels}, but {src.where} holds "
                          f"{m.channels}-channel images; set data.channels={m.channels}")
    return src


# -- per-worker order -------------------------------------------------------------------------

def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def shuffle_buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a shuffle buffer with ``size`` slots fed positions 0..n-1: once full,
    each incoming position evicts a uniformly chosen slot; the rest is flushed in random order."""
    if size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    u = rng.random(n)
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


def worker_units(counts: list[int], epoch: int, seed: int, g: int, G: int) -> list[tuple[int, int, int]]:
    """(shard, part, parts) read by global worker ``g`` of ``G`` in ``epoch``."""
    n = len(counts)
    perm = _rng(seed, epoch, 1).permutation(n)
    m = -(-G // n) if n < G else 1
    units = [(int(s), j, m) for s in perm for j in range(m)]
    return units[g::G]


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


class EpochPlan:
    """The reading and emission order of one worker in one epoch (see the module docstring)."""

    def __init__(self, counts: list[int], epoch: int, seed: int, g: int, G: int, shuffle_buffer: int):
        self.units = worker_units(counts, epoch, seed, g, G)
        sizes = [len(range(j, counts[s], m)) for s, j, m in self.units]
        self.unit_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.length = int(self.unit_start[-1])
        self.order = shuffle_buffer_order(self.length, shuffle_buffer, _rng(seed, epoch, g, 2))
        self.emit_time = np.empty(self.length, dtype=np.int64)
        self.emit_time[self.order] = np.arange(self.length)

    def locate(self, p: int) -> tuple[int, int]:
        """Position -> (unit index, sample index within its shard)."""
        u = bisect.bisect_right(self.unit_start, p) - 1
        s, j, m = self.units[u]
        return u, j + m * (p - int(self.unit_start[u]))


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
        self.pending: dict[int, tuple] = {}
        self.ptr = int(plan.order[t0:].min()) if t0 < plan.length else plan.length
        self.unit = -1
        self.reader: SampleReader | None = None
        self.f = None
        self.broken: str | None = None

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        self.f, self.reader = None, None

    def get(self, p: int):
        while self.ptr <= p:
            self._read_one()
        return self.pending.pop(p)

    def _open(self, u: int, first_index: int) -> None:
        self.close()
        s = self.plan.units[u][0]
        url, entry = self.split.urls[s], self.split.manifest.shards[s]
        self.unit, self.broken = u, None
        try:
            self.f, seekable = open_shard(url)
        except OSError as e:
            self.broken = f"cannot open shard ({type(e).__name__}: {e})"
            return
        try:
            self.reader = SampleReader(self.f, seekable)
            while self.reader.index < first_index:
                got = self.reader.next(want=False)
                if got is None:
                    self.broken = f"shard ends after {self.reader.index} samples; the manifest says {entry.count}"
                    return
                if self.reader.index == 1:
                    self._check_first_key(got[0], s)
        except DataError:
            raise
        except (EOFError, ValueError) as e:
            self.broken = f"truncated or corrupt tar ({e})"

    def _check_first_key(self, key: str, s: int) -> None:
        entry = self.split.manifest.shards[s]
        if entry.first_key and key != entry.first_key:
            raise DataError(f"shard {self.split.urls[s]} starts with sample {key!r} but manifest {self.split.where} "
                            f"says {entry.first_key!r}: the shard and the manifest do not match")

    def _read_one(self) -> None:
        p = self.ptr
        u, idx = self.plan.locate(p)
        s, j, m = self.plan.units[u]
        url, entry = self.split.urls[s], self.split.manifest.shards[s]
        if u != self.unit:
            self._open(u, idx)
        want = self.plan.emit_time[p] >= self.t0
        item = None
        if self.broken is None:
            try:
                while self.reader.index < idx:  # other parts of a shared shard
                    if self.reader.next(want=False) is None:
                        raise _Short()
                got = self.reader.next(want=want)
                if got is None:
                    raise _Short()
                if self.reader.index == 1:
                    self._check_first_key(got[0], s)
                item = (s, idx, got[0], got[1])
                if self.reader.index == entry.count:
                    self._check_end(s)
            except DataError:
                raise
            except _Short:
                self.broken = f"shard ends after {self.reader.index} samples; the manifest says {entry.count}"
            except (EOFError, ValueError) as e:
                self.broken = f"truncated or corrupt tar after {self.reader.index} samples ({e})"
        if item is None:
            item = _Bad(url, "?", idx, self.broken)
        if want:
            self.pending[p] = item
        self.ptr += 1

    def _check_end(self, s: int) -> None:
        if self.reader.next(want=False) is not None:
            raise DataError(f"shard {self.split.urls[s]} holds more samples than the {self.split.manifest.shards[s].count} "
                            f"in manifest {self.split.where}: the shard and the manifest do not match")


class _Short(Exception):
    pass


class SampleDecoder:
    """Bytes of one sample -> (uint8 [H, W, C], label or None), or a reason it is bad."""

    def __init__(self, manifest: Manifest):
        self.m = manifest

    def __call__(self, members: dict[str, bytes]) -> tuple[np.ndarray, int | None]:
        exts = [e for e in IMAGE_EXTS if e in members]
        if not exts:
            got = ", ".join("." + e for e in members) or "no members"
            raise ValueError(f"no image member (.png or .npy); found {got}")
        x = decode_image(members[exts[0]], exts[0], self.m.resolution, self.m.channels)
        y = None
        if self.m.labels:
            if "cls" not in members:
                raise ValueError("no .cls label member, but the manifest says the split has labels")
            y = decode_label(members["cls"])
            if self.m.num_classes and not 0 <= y < self.m.num_classes:
                raise ValueError(f"label {y} outside [0, {self.m.num_classes})")
        return x, y


class BadDataPolicy:
    """Raise or count-and-report a bad sample, per ``data.bad_data``."""

    def __init__(self, mode: str, max_skipped: int, where: str, skipped: int = 0):
        self.mode, self.max_skipped, self.where, self.skipped = mode, max_skipped, where, skipped

    def __call__(self, shard: str, key: str, index: int, reason: str) -> None:
        what = f"shard {shard}, sample {key!r} (#{index} in the shard): {reason}"
        if self.mode == "error":
            raise DataError(f"{what}. Set data.bad_data=skip to skip bad samples (counted), or run "
                            f"`flowscale prep verify {self.where}`")
        self.skipped += 1
        if self.skipped <= 10 or self.skipped % 100 == 0:  # every skip is counted; the log shows the first and every 100th
            print(f"flowscale data: skipped {what} [bad_data=skip, {self.skipped} skipped by this worker]",
                  file=sys.stderr, flush=True)
        if self.skipped > self.max_skipped:
            raise DataError(f"more than data.max_skipped={self.max_skipped} bad samples in one worker (last: {what}); "
                            f"check the shards with `flowscale prep verify {self.where}`")


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
                        flips[s] = _rng(seed, epoch, s, 3).random(counts[s]) < 0.5
                    if flips[s][idx]:
                        x = x[:, ::-1]
                xs.append(x)
                ys.append(y)
                if len(xs) == batch_size:
                    xb = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
                    yb = torch.tensor(ys, dtype=torch.int64) if split.manifest.labels else None
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
        return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                                timeout=self.cfg.worker_timeout_s, prefetch_factor=2))

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


# -- evaluation -------------------------------------------------------------------------------

class EvalSplit:
    """A whole split read once in stored order, in batches dealt round-robin to ranks: rank r
    gets global batches r, r + world_size, ... (others' samples are skipped unread). ``start``
    (the batch's first global index) lets callers seed per-batch noise independently of the
    number of ranks."""

    def __init__(self, split: Split, bad_data: str = "error", max_skipped: int = 100):
        self.split = split
        m = split.manifest
        self.image_shape = (m.channels, m.resolution, m.resolution)
        self.policy = BadDataPolicy(bad_data, max_skipped, split.where)

    def __len__(self) -> int:
        return self.split.manifest.num_samples

    @property
    def has_labels(self) -> bool:
        return self.split.manifest.labels

    @property
    def skipped(self) -> int:
        return self.policy.skipped

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1):
        """Yields (start, x uint8 [b, C, H, W], y int64 [b] | None) for this rank's batches."""
        decode = SampleDecoder(self.split.manifest)
        labels = self.split.manifest.labels
        i = 0
        xs, ys = [], []

        def flush(start):
            x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous() if xs else \
                torch.zeros((0, *self.image_shape), dtype=torch.uint8)
            y = torch.tensor(ys, dtype=torch.int64) if labels else None
            xs.clear()
            ys.clear()
            return start, x, y

        for s, (url, entry) in enumerate(zip(self.split.urls, self.split.manifest.shards)):
            f, reader, broken = None, None, None
            try:
                f, seekable = open_shard(url)
                reader = SampleReader(f, seekable)
            except (OSError, EOFError, ValueError) as e:
                broken = f"cannot read shard ({type(e).__name__}: {e})"
            for idx in range(entry.count):
                mine = (i // batch_size) % world_size == rank
                key = "?"
                if broken is None:
                    try:
                        got = reader.next(want=mine)
                        if got is None:
                            broken = f"shard ends after {idx} samples; the manifest says {entry.count}"
                        else:
                            key = got[0]
                            if idx == 0 and entry.first_key and key != entry.first_key:
                                raise DataError(f"shard {url} starts with sample {key!r} but manifest "
                                                f"{self.split.where} says {entry.first_key!r}")
                            if idx == entry.count - 1 and reader.next(want=False) is not None:
                                raise DataError(f"shard {url} holds more samples than the {entry.count} in manifest "
                                                f"{self.split.where}")
                    except (EOFError, ValueError) as e:
                        if isinstance(e, DataError):
                            raise
                        broken = f"truncated or corrupt tar after {idx} samples ({e})"
                if mine:
                    if broken is not None:
                        self.policy(url, key, idx, broken)
                    else:
                        try:
                            x, y = decode(got[1])
                            xs.append(x)
                            ys.append(y)
                        except ValueError as e:
                            self.policy(url, key, idx, str(e))
                i += 1
                if mine and (i % batch_size == 0 or i == len(self)):
                    yield flush((i - 1) // batch_size * batch_size)
            if f is not None:
                f.close()


class TensorSplit:
    """An in-memory uint8 tensor [N, C, H, W] behind the same interface as :class:`EvalSplit`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        self.images, self.labels = images, labels
        self.image_shape = tuple(images.shape[1:])
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1):
        for b in range(rank, self.num_batches(batch_size), world_size):
            s = b * batch_size
            y = None if self.labels is None else self.labels[s:s + batch_size]
            yield s, self.images[s:s + batch_size], y


def eval_split(data_cfg, split: str = "test") -> EvalSplit:
    return EvalSplit(resolve_split(data_cfg, split), data_cfg.bad_data, data_cfg.max_skipped)


def iter_eval_batches(data_cfg, split: str = "test", rank: int = 0, world_size: int = 1, batch_size: int = 256):
    """(x uint8 [b, C, H, W], y | None) over this rank's share of ``split``, read once."""
    for _, x, y in eval_split(data_cfg, split).batches(batch_size, rank, world_size):
        yield x, y


def first_images(data_cfg, n: int, split: str = "train") -> torch.Tensor:
    """The first ``n`` images of a split in stored order (converters shuffle class-ordered
    sources, so this is a fair sample), e.g. for data-dependent initialisation."""
    ev = eval_split(data_cfg, split)
    out, got = [], 0
    for _, x, _ in ev.batches(min(n, 256)):
        out.append(x)
        got += len(x)
        if got >= n:
            break
    return torch.cat(out)[:n]
