"""Real files for the data tests: images whose pixels identify them, shard splits written with
the production writer, and hand-made broken shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowscale.data.codec import encode_sample
from flowscale.data.manifest import Manifest, ShardEntry, shard_name, write_manifest
from flowscale.data.tar import TarWriter


def tagged_image(i: int, size: int = 8, channels: int = 3) -> np.ndarray:
    """uint8 [size, size, C]: noise from seed i with the id i written into the first pixel row."""
    x = np.random.default_rng(i).integers(0, 256, (size, size, channels), dtype=np.uint8)
    x[0, 0, 0], x[0, 1, 0], x[0, 2, 0] = i % 256, (i // 256) % 256, 77
    return x


def image_id(x_chw) -> int:
    """The id of a (possibly horizontally flipped) tagged image, from a [C, H, W] tensor/array."""
    x = np.asarray(x_chw)
    if x[0, 0, 2] != 77:  # flipped: the tag row reads right to left
        x = x[:, :, ::-1]
    assert x[0, 0, 2] == 77, "not a tagged image"
    return int(x[0, 0, 0]) + 256 * int(x[0, 0, 1])


def write_split(split_dir: Path, counts: list[int], size: int = 8, encoding: str = "npy", labels: bool = True,
                prefix: str = "t", split: str = "train", members=None) -> Manifest:
    """Shards of tagged images (ids 0..N-1, label = id) with ``counts[k]`` samples in shard k.
    ``members(i, key, default_members)`` may replace a sample's tar members to make bad data;
    the manifest then describes the files as written (sizes, hashes)."""
    split_dir.mkdir(parents=True, exist_ok=True)
    entries, i = [], 0
    for k, n in enumerate(counts):
        name = shard_name(prefix, split, k)
        w = TarWriter(split_dir / name)
        keys = []
        for _ in range(n):
            key = f"s{i:06d}"
            ms = encode_sample(key, tagged_image(i, size), encoding, i if labels else None)
            if members is not None:
                ms = members(i, key, ms)
            for mname, data in ms:
                w.add(mname, data)
            keys.append(key)
            i += 1
        nbytes, digest = w.close()
        entries.append(ShardEntry(name, n, nbytes, digest, keys[0], keys[-1]))
    m = Manifest(dataset="test", variant="tagged", split=split, resolution=size, channels=3, encoding=encoding,
                 num_samples=sum(counts), labels=labels, num_classes=sum(counts) if labels else 0, shards=entries)
    write_manifest(m, split_dir)
    return m


def data_cfg(train_dir, test_dir=None, **kw):
    from flowscale.config import DataConfig

    args = dict(dataset="shards", train_manifest=str(train_dir), test_manifest=str(test_dir or train_dir),
                image_size=8, batch_size=4, num_workers=0, shuffle_buffer=8)
    args.update(kw)
    return DataConfig(**args)
