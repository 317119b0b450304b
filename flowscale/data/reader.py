"""Reading samples of a split, checked: one shard cursor, the sample decoder, the bad-data
policy and batch stacking, shared by the training stream and evaluation.

A :class:`ShardCursor` walks one shard forward and holds it to its manifest entry. A shard
that fails is *broken from sample k on*, k being where the failure shows:

    left out by load_split (missing, wrong size)      k = 0
    cannot open, not a tar, zero bytes                k = 0
    first key differs from the manifest's             k = 0 (the shard is not the one listed)
    truncated or corrupt tar, fewer samples           k = the first sample that cannot be read
    more samples than the manifest's count            k = count - 1

k depends only on the shard's bytes, never on which worker or rank reads it or on what it
already knows, so the samples a broken shard yields (those before k) are the same in every
epoch and after a resume. A broken shard, like a sample that does not decode (not an image,
wrong size or mode, missing or out-of-range label), goes to the :class:`BadDataPolicy`: a
:class:`DataError` naming the shard and sample (``data.bad_data=error``), or with
``data.bad_data=skip`` an entry in a ledger of distinct bad data, printed and counted once
per run however often it is met again.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from .codec import IMAGE_EXTS, decode_image, decode_label
from .manifest import DataError, Manifest
from .splits import NOT_FLOWSCALE, Split

FOREIGN_IMAGE_EXTS = ("jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "ppm")
"""Image members other webdataset pipelines write and flowscale shards never hold."""


class ForeignSample(ValueError):
    """A sample with an image member flowscale never writes (.jpg, ...): its shard is not a flowscale shard."""
from .tar import READ_AHEAD, SampleReader, open_shard


class BadDataPolicy:
    """What bad data does, per ``data.bad_data``: ``error`` raises a :class:`DataError` naming
    the shard (and sample); ``skip`` keeps a ledger of the distinct bad data met::

        bad[(shard name, index in the shard)] = samples lost there
            1               a sample that does not decode
            count - k       a shard broken from sample #k on (k = 0: all of it)

    Meeting an entry again (the same sample next epoch, or in another worker) changes nothing:
    ``data.max_skipped`` bounds ``len(bad)``, the distinct bad samples and shards, and
    ``skipped`` (their sum) is the samples lost. ``met`` lists the entries new to this ledger as
    (shard name, index, samples lost, message), for a process that keeps a wider one (the
    loader's main process merges its workers'). ``echo`` prints each new entry to stderr.

    A :class:`ForeignSample` (a .jpg in a shard: not a flowscale shard) stops with ``advice``, how
    to convert the split's shards (:attr:`.splits.Split.convert_advice`), instead of suggesting
    bad_data=skip, which cannot make such shards usable.
    """

    def __init__(self, mode: str, max_skipped: int, where: str, bad: dict | None = None, echo: bool = True,
                 advice: str = ""):
        self.mode, self.max_skipped, self.where, self.echo, self.advice = mode, max_skipped, where, echo, advice
        self.bad: dict[tuple[str, int], int] = dict(bad or {})
        self.met: list[tuple[str, int, int, str]] = []
        self.first: str | None = None
        """The first bad data this policy met (for the error when nothing usable is left)."""
        self.foreign = False
        """Whether a ForeignSample was among it."""

    @property
    def skipped(self) -> int:
        """Samples lost to bad data (each bad sample or broken shard counted once)."""
        return sum(self.bad.values())

    def sample(self, url: str, name: str, key: str, index: int, reason: ValueError | str) -> None:
        """Sample ``index`` (key ``key``) of shard ``name`` at ``url`` does not decode (``reason``: why)."""
        what = f"shard {url}, sample {key!r} (#{index} in the shard): {reason}"
        if isinstance(reason, ForeignSample):
            self.foreign = True
            if self.mode == "error":
                raise DataError(f"{what}. {NOT_FLOWSCALE}: {self.advice or 'run `flowscale prep webdataset`'}")
        self._bad(name, index, 1, what)

    def shard(self, url: str, name: str, index: int, count: int, reason: str) -> None:
        """Shard ``name`` (``count`` samples) at ``url`` is broken from sample ``index`` on."""
        rest = "the whole shard" if index == 0 else f"its samples from #{index} on"
        self._bad(name, index, count - index, f"shard {url}: {reason} ({rest}: {count - index} samples)")

    def _bad(self, name: str, index: int, lost: int, what: str) -> None:
        if self.mode == "error":
            raise DataError(f"{what}. Set data.bad_data=skip to skip bad data (counted), or run "
                            f"`flowscale prep verify {self.where}`")
        self.note(name, index, lost, what)

    def note(self, name: str, index: int, lost: int, what: str, echo: bool | None = None) -> bool:
        """Add an entry to the ledger (True when it is new); more than max_skipped is a DataError."""
        self.first = self.first or what
        if (name, index) in self.bad:
            return False
        self.bad[(name, index)] = lost
        self.met.append((name, index, lost, what))
        if self.echo if echo is None else echo:
            print(f"flowscale data: skipped {what} [bad_data=skip: {len(self.bad)} distinct bad samples or shards, "
                  f"{self.skipped} samples skipped]", file=sys.stderr, flush=True)
        if len(self.bad) > self.max_skipped:
            raise DataError(f"more than data.max_skipped={self.max_skipped} distinct bad samples or shards "
                            f"(last: {what}); check the shards with `flowscale prep verify {self.where}`")
        return True

    def nothing_usable(self, what: str) -> DataError:
        """The error for ``what`` (e.g. 'split X') having yielded no usable image: all bad data, skipped."""
        msg = (f"{what} yielded no usable image: every sample read was bad data, skipped under data.bad_data=skip "
               f"({self.skipped} samples; the first: {self.first or 'none met here'})")
        if self.foreign:
            return DataError(f"{msg}. {NOT_FLOWSCALE}: {self.advice}")
        return DataError(f"{msg}. Check the shards with `flowscale prep verify {self.where}`")

    def take_met(self) -> list[tuple[str, int, int, str]]:
        """The entries met since the last call."""
        met, self.met = self.met, []
        return met


class ShardCursor:
    """Shard ``s`` of ``split``, read forward: ``read(idx, want)`` returns sample ``idx`` as
    (key, {ext: bytes}) (the bytes only when ``want``; samples in between are skipped unread),
    or None when the shard is broken at or before it. The break (``broken``: why, ``broken_at``:
    from which sample) goes to ``policy`` once, when it shows, whether or not ``want``."""

    def __init__(self, split: Split, s: int, policy: BadDataPolicy, buffer: int = READ_AHEAD):
        self.url, self.entry, self.where, self.policy = split.urls[s], split.manifest.shards[s], split.where, policy
        self.broken: str | None = None
        self.broken_at: int | None = None
        self.f, self.reader = None, None
        if s in split.bad_shards:
            self._break(0, split.bad_shards[s])
            return
        try:
            self.f, seekable = open_shard(self.url, buffer)
        except OSError as e:
            self._break(0, f"cannot open shard ({type(e).__name__}: {e})")
            return
        try:
            self.reader = SampleReader(self.f, seekable)
        except (EOFError, ValueError, OSError) as e:
            self._break(0, f"truncated or corrupt tar after 0 samples ({e})")

    def _break(self, k: int, reason: str) -> None:
        self.broken, self.broken_at = reason, min(k, self.entry.count - 1)
        self.close()
        self.policy.shard(self.url, self.entry.name, self.broken_at, self.entry.count, reason)

    def read(self, idx: int, want: bool) -> tuple[str, dict[str, bytes]] | None:
        if self.broken is not None:
            return None
        count, first = self.entry.count, self.entry.first_key
        got, broken = None, None
        try:
            while self.reader.index <= idx and broken is None:
                k = self.reader.index
                got = self.reader.next(want=want and k == idx)
                if got is None:
                    broken = k, f"shard ends after {k} samples; the manifest says {count}"
                elif k == 0 and first and got[0] != first:
                    broken = 0, (f"starts with sample {got[0]!r} but manifest {self.where} says {first!r}: the shard "
                                 f"and the manifest do not match")
                elif k == count - 1 and self.reader.next(want=False) is not None:
                    broken = k, (f"holds more samples than the {count} in manifest {self.where}: the shard and the "
                                 f"manifest do not match")
        except (EOFError, ValueError, OSError) as e:  # OSError: a pipe: or remote stream that failed
            broken = self.reader.index, f"truncated or corrupt tar after {self.reader.index} samples ({e})"
        if broken is not None:
            self._break(*broken)
            return None
        return got

    def close(self) -> None:
        f, self.f, self.reader = self.f, None, None
        if f is not None:
            try:
                f.close()
            except OSError:  # a pipe's exit status: what was read has been checked already
                pass


class SampleDecoder:
    """Bytes of one sample -> (uint8 [H, W, C], label or None), or a reason it is bad."""

    def __init__(self, manifest: Manifest):
        self.m = manifest

    def __call__(self, members: dict[str, bytes]) -> tuple[np.ndarray, int | None]:
        exts = [e for e in IMAGE_EXTS if e in members]
        if not exts:
            got = ", ".join("." + e for e in members) or "no members"
            foreign = [e for e in members if e.lower() in FOREIGN_IMAGE_EXTS]
            if foreign:
                raise ForeignSample(f"a .{foreign[0]} image (members {got}): not a flowscale shard")
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


def stack_batch(xs: list[np.ndarray], ys: list[int | None], has_labels: bool,
                image_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoded samples (uint8 [H, W, C] each) -> (x uint8 [b, C, H, W], y int64 [b] | None);
    ``image_shape`` (C, H, W) gives the shape of an empty batch (b = 0)."""
    if xs:
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    else:
        x = torch.zeros((0, *image_shape), dtype=torch.uint8)
    return x, (torch.tensor(ys, dtype=torch.int64) if has_labels else None)
