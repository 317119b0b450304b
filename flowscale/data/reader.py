"""Reading samples of a split, checked: one shard cursor, the sample decoder, the bad-data
policy and batch stacking, shared by the training stream and evaluation.

A :class:`ShardCursor` walks one shard forward and holds it to its manifest entry:

    first key differs from the manifest's         DataError (the shard is not the one listed)
    more samples than the manifest's count        DataError
    fewer samples than the manifest's count       broken: "shard ends after k samples ..."
    cannot open, truncated or corrupt tar         broken: the reason, with the sample count

A manifest that disagrees with its shard is always an error. A broken shard is bad data:
every sample that is asked for after the break, like a sample that does not decode (not an
image, wrong size or mode, missing or out-of-range label), goes to the :class:`BadDataPolicy`:
a :class:`DataError` naming the shard and sample (``data.bad_data=error``) or a counted skip
printed to stderr (``data.bad_data=skip``, at most ``data.max_skipped`` per worker).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from .codec import IMAGE_EXTS, decode_image, decode_label
from .manifest import DataError, Manifest
from .splits import Split
from .tar import SampleReader, open_shard


class ShardCursor:
    """Shard ``s`` of ``split``, read forward: ``read(idx, want)`` returns sample ``idx`` as
    (key, {ext: bytes}) (the bytes only when ``want``; samples in between are skipped unread),
    or None when the shard is broken before it, with the reason in ``broken``."""

    def __init__(self, split: Split, s: int):
        self.url, self.entry, self.where = split.urls[s], split.manifest.shards[s], split.where
        self.broken: str | None = None
        self.f, self.reader = None, None
        try:
            self.f, seekable = open_shard(self.url)
        except OSError as e:
            self.broken = f"cannot open shard ({type(e).__name__}: {e})"
            return
        try:
            self.reader = SampleReader(self.f, seekable)
        except (EOFError, ValueError) as e:
            self.broken = f"truncated or corrupt tar after 0 samples ({e})"

    def read(self, idx: int, want: bool) -> tuple[str, dict[str, bytes]] | None:
        if self.broken is not None:
            return None
        count = self.entry.count
        try:
            while self.reader.index <= idx:
                got = self.reader.next(want=want and self.reader.index == idx)
                if got is None:
                    self.broken = f"shard ends after {self.reader.index} samples; the manifest says {count}"
                    return None
                if self.reader.index == 1 and self.entry.first_key and got[0] != self.entry.first_key:
                    raise DataError(f"shard {self.url} starts with sample {got[0]!r} but manifest {self.where} "
                                    f"says {self.entry.first_key!r}: the shard and the manifest do not match")
                if self.reader.index == count and self.reader.next(want=False) is not None:
                    raise DataError(f"shard {self.url} holds more samples than the {count} in manifest "
                                    f"{self.where}: the shard and the manifest do not match")
        except DataError:
            raise
        except (EOFError, ValueError) as e:
            self.broken = f"truncated or corrupt tar after {self.reader.index} samples ({e})"
            return None
        return got

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        self.f, self.reader = None, None


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


def stack_batch(xs: list[np.ndarray], ys: list[int | None], has_labels: bool,
                image_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoded samples (uint8 [H, W, C] each) -> (x uint8 [b, C, H, W], y int64 [b] | None);
    ``image_shape`` (C, H, W) gives the shape of an empty batch (b = 0)."""
    if xs:
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    else:
        x = torch.zeros((0, *image_shape), dtype=torch.uint8)
    return x, (torch.tensor(ys, dtype=torch.int64) if has_labels else None)
