"""Per-sample binary attributes (CelebA's 40, or a CSV's columns) read from a split's shards.

Shards carry them as ``<key>.attr`` members, named by the manifest's ``attributes`` (see
:mod:`.codec`). The training loader never reads them; the latent tools stream a split through
:func:`attribute_batches` to compute attribute directions, separately from training.
"""

from __future__ import annotations

from .codec import decode_attributes
from .manifest import DataError
from .reader import BadDataPolicy, SampleDecoder, ShardCursor, stack_batch
from .splits import Split


def require_attribute(split: Split, name: str) -> int:
    """The index of attribute ``name`` in ``split``, or a DataError listing those it has."""
    names = split.manifest.attributes
    if not names:
        raise DataError(f"{split.where} carries no attributes; make shards with attributes (`flowscale prep "
                        f"celebahq ... --attributes list_attr_celeba.txt`, or `flowscale prep folder ... "
                        f"--attributes labels.csv`) and pass their split directory with --data")
    if name not in names:
        raise DataError(f"attribute {name!r} is not in {split.where}; it carries: {', '.join(names)}")
    return names.index(name)


def attribute_batches(split: Split, name: str, batch_size: int = 64, max_images: int | None = None):
    """Yields (uint8 images [b, C, H, W], bool [b] has ``name``, int64 labels [b] or None when the
    split has none) over ``split`` in stored order, at most ``max_images`` images. A sample without
    a valid ``.attr`` member is a DataError naming the shard and sample."""
    k = require_attribute(split, name)
    n_attr = len(split.manifest.attributes)
    policy = BadDataPolicy("error", 0, split.where, advice=split.convert_advice)
    decode = SampleDecoder(split.manifest)
    xs, has, ys, seen = [], [], [], 0
    limit = split.manifest.num_samples if max_images is None else min(max_images, split.manifest.num_samples)
    for s, entry in enumerate(split.manifest.shards):
        if seen >= limit:
            break
        cursor = ShardCursor(split, s, policy)
        try:
            for idx in range(entry.count):
                if seen >= limit:
                    break
                key, members = cursor.read(idx, want=True)
                try:
                    x, y = decode(members)
                    if "attr" not in members:
                        raise ValueError("no .attr member, but the manifest lists attributes")
                    a = decode_attributes(members["attr"], n_attr)
                except ValueError as e:
                    policy.sample(cursor.url, entry.name, key, idx, e)
                xs.append(x)
                ys.append(y)
                has.append(bool(a[k]))
                seen += 1
                if len(xs) == batch_size:
                    yield _batch(xs, ys, has, split)
                    xs, has, ys = [], [], []
        finally:
            cursor.close()
    if xs:
        yield _batch(xs, ys, has, split)


def _batch(xs, ys, has, split: Split):
    x, y = stack_batch(xs, ys, split.manifest.labels, split.image_shape)
    return x, has, y
