"""Evaluation reading: a whole split once, in stored order, in batches dealt round-robin to
ranks (rank r gets global batches r, r + world_size, ...; others' samples are skipped
unread). Each batch comes with ``start``, its first global index, so callers can seed
per-batch noise independently of the number of ranks. :class:`TensorSplit` puts an
in-memory tensor behind the same interface. Shards are checked as in training
(:class:`.reader.ShardCursor`, :class:`.reader.BadDataPolicy`); the ledger of bad data lives as
long as the :class:`EvalSplit`, so an eval every N steps names and counts a bad sample once.
"""

from __future__ import annotations

import torch

from .manifest import DataError
from .reader import BadDataPolicy, SampleDecoder, ShardCursor, stack_batch
from .splits import Split, resolve_split


class EvalSplit:
    """A split's shards read once in stored order (see the module docstring)."""

    def __init__(self, split: Split, bad_data: str = "error", max_skipped: int = 100):
        self.split = split
        self.image_shape = split.image_shape
        self.policy = BadDataPolicy(bad_data, max_skipped, split.where, advice=split.convert_advice)

    def __len__(self) -> int:
        return self.split.manifest.num_samples

    @property
    def has_labels(self) -> bool:
        return self.split.manifest.labels

    @property
    def skipped(self) -> int:
        """Samples of the split lost to bad data (each bad sample or broken shard counted once)."""
        return self.policy.skipped

    def no_usable_image(self) -> DataError:
        """The one-line error for a split read without a single usable image (all skipped as bad data)."""
        return self.policy.nothing_usable(f"split {self.split.where}")

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1):
        """Yields (start, x uint8 [b, C, H, W], y int64 [b] | None) for this rank's batches."""
        decode = SampleDecoder(self.split.manifest)
        i = 0
        xs, ys = [], []
        for s, entry in enumerate(self.split.manifest.shards):
            # every rank walks every shard, so a broken shard stops all of them (error) or all count it (skip)
            cursor = ShardCursor(self.split, s, self.policy)
            try:
                for idx in range(entry.count):
                    mine = (i // batch_size) % world_size == rank
                    got = cursor.read(idx, want=mine)
                    i += 1
                    if not mine:
                        continue
                    if got is not None:
                        try:
                            x, y = decode(got[1])
                            xs.append(x)
                            ys.append(y)
                        except ValueError as e:
                            self.policy.sample(cursor.url, entry.name, got[0], idx, e)
                    if i % batch_size == 0 or i == len(self):
                        x, y = stack_batch(xs, ys, self.has_labels, self.image_shape)
                        xs, ys = [], []
                        yield (i - 1) // batch_size * batch_size, x, y
            finally:
                cursor.close()


class TensorSplit:
    """An in-memory uint8 tensor [N, C, H, W] behind the same interface as :class:`EvalSplit`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        self.images, self.labels = images, labels
        self.image_shape = tuple(images.shape[1:])
        self.skipped = 0

    def no_usable_image(self) -> DataError:
        return DataError("no images to evaluate (an empty tensor)")

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
    ev.policy.echo = False  # bad data (bad_data=skip) is skipped here too; the stream that trains on the split names it
    out, got = [], 0
    for _, x, _ in ev.batches(min(n, 256)):
        out.append(x)
        got += len(x)
        if got >= n:
            break
    if not got:  # a split of bad data only, skipped (bad_data=skip): nothing to initialise from
        raise ev.no_usable_image()
    return torch.cat(out)[:n]
