"""Items -> deterministic tar shards + manifest.json, in parallel, resumably.

The shard plan (which items go into which shard) is fixed before any pixel is written: the
items' order comes from the source plan, and the samples per shard from ``--samples-per-shard``
or from the target shard size divided by the encoded size of the first few items. Workers
decode and encode items; the main process writes each shard in order through
:class:`flowscale.data.tar.TarWriter` (a temporary file renamed when complete) and then a
small ``.<shard>.json`` record. Re-running skips every shard that has its record and the
recorded size, so an interrupted conversion continues where it stopped and the result is
byte-identical to an uninterrupted one. The manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
from collections import Counter
from pathlib import Path

from flowscale.data.codec import default_encoding, encode_sample
from flowscale.data.manifest import Manifest, ShardEntry, shard_name, write_manifest
from flowscale.data.tar import TarWriter

from .sources import SplitPlan, load_item

TAR_OVERHEAD = 1536  # two 512-byte headers + padding per sample, roughly


def parse_size(text: str) -> int:
    """'256MB', '1.5GB', '100000' -> bytes."""
    t = text.strip().upper().replace("IB", "B")
    for unit, mult in (("KB", 10 ** 3), ("MB", 10 ** 6), ("GB", 10 ** 9), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[:-len(unit)]) * mult)
    return int(float(t))


def _task(plan: SplitPlan, item: tuple, encoding: str) -> tuple:
    """What a worker needs to encode ``item`` (small and picklable)."""
    return item, plan.resolution, plan.resize, plan.channels, encoding, len(plan.attributes)


def _encode(task):
    item, resolution, resize, channels, encoding, n_attr = task
    try:
        x, notes, attributes = load_item(item, resolution, resize, channels)
        if n_attr and (attributes is None or len(attributes) != n_attr):
            raise ValueError(f"{0 if attributes is None else len(attributes)} attributes, the split has {n_attr}")
        return item[0], encode_sample(item[0], x, encoding, item[3], attributes if n_attr else None), notes, None
    except Exception as e:  # reported by the main process with the item's name, per --bad-input
        return item[0], None, [], f"{item[2]}: {type(e).__name__}: {e}"


def choose_encoding(encoding: str, resolution: int) -> str:
    if encoding == "auto":
        return default_encoding(resolution)
    return encoding


def _fingerprint(plan: SplitPlan, prefix: str, split: str, encoding: str, spp: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([prefix, split, encoding, spp, plan.resolution, plan.resize, plan.variant]
                        + ([plan.attributes] if plan.attributes else [])
                        # channels only when 1, so that RGB conversions begun before it keep their fingerprint
                        + ([plan.channels] if plan.channels != 3 else [])).encode())
    for it in plan.items:
        h.update(json.dumps(list(it)).encode())
    return h.hexdigest()


def convert_split(plan: SplitPlan, out: str | Path, prefix: str, split: str, encoding: str = "auto",
                  shard_bytes: int = 256 * 10 ** 6, samples_per_shard: int | None = None, workers: int | None = None,
                  bad_input: str = "error", progress: bool = True) -> Path:
    """Write ``plan``'s items as shards under ``out/split/``; returns the manifest path."""
    from tqdm import tqdm

    split_dir = Path(out) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    encoding = choose_encoding(encoding, plan.resolution)
    items = plan.items
    if not items:
        raise ValueError(f"split {split!r} has no items")
    if samples_per_shard is None:  # deterministic estimate from the first items
        probe = [_encode(_task(plan, it, encoding)) for it in items[:16]]
        sizes = [sum(len(d) for _, d in r[1]) for r in probe if r[1] is not None]
        per = (sum(sizes) / len(sizes) if sizes else 4096) + TAR_OVERHEAD
        samples_per_shard = max(1, int(shard_bytes // per))
    spp = samples_per_shard
    fp = _fingerprint(plan, prefix, split, encoding, spp)
    plan_file = split_dir / ".plan.json"
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old.get("fingerprint") != fp:
            raise FileExistsError(f"{split_dir} holds shards from a different conversion (other inputs or options); "
                                  f"use a new output directory or delete {split_dir}")
    else:
        plan_file.write_text(json.dumps({"fingerprint": fp, "samples_per_shard": spp}) + "\n")

    groups = [items[i:i + spp] for i in range(0, len(items), spp)]
    names = [shard_name(prefix, split, k) for k in range(len(groups))]

    def record(k):
        return split_dir / f".{names[k]}.json"

    def complete(k):
        r, p = record(k), split_dir / names[k]
        return r.is_file() and p.is_file() and json.loads(r.read_text())["bytes"] == p.stat().st_size

    todo = [k for k in range(len(groups)) if not complete(k)]
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(items), initial=len(items) - sum(len(groups[k]) for k in todo), unit="img",
               desc=f"{prefix}-{split}", disable=not progress, dynamic_ncols=True)
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and todo else None
    chunk = 32 if plan.resolution <= 64 else 2
    try:
        for k in todo:
            tasks = [_task(plan, it, encoding) for it in groups[k]]
            results = pool.imap(_encode, tasks, chunksize=chunk) if pool else map(_encode, tasks)
            writer = TarWriter(split_dir / names[k])
            notes, skipped, keys = Counter(), [], []
            try:
                for key, members, item_notes, err in results:
                    bar.update(1)
                    if err is not None:
                        if bad_input == "error":
                            raise ValueError(f"cannot convert {err} (use --bad-input skip to leave such inputs out, "
                                             f"counted in the manifest)")
                        skipped.append(err)
                        print(f"data_prep: skipped {err}", file=sys.stderr, flush=True)
                        continue
                    for name, data in members:
                        writer.add(name, data)
                    notes.update(item_notes)
                    keys.append(key)
                if not keys:
                    raise ValueError(f"every input of shard {names[k]} failed; nothing to write")
            except BaseException:
                writer.abort()
                raise
            size, digest = writer.close()
            entry = {"name": names[k], "count": len(keys), "bytes": size, "sha256": digest, "first_key": keys[0],
                     "last_key": keys[-1], "notes": dict(sorted(notes.items())), "skipped": skipped}
            record(k).write_text(json.dumps(entry, sort_keys=True) + "\n")
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()

    entries, notes, skipped = [], Counter(), []
    for k in range(len(groups)):
        e = json.loads(record(k).read_text())
        notes.update(e.pop("notes"))
        skipped.extend(e.pop("skipped"))
        entries.append(ShardEntry(**e))
    source = dict(plan.source, resize=plan.resize, conversions=dict(sorted(notes.items())),
                  skipped_inputs=len(skipped), samples_per_shard=spp)
    if skipped:
        source["skipped_examples"] = skipped[:20]
    m = Manifest(dataset=plan.dataset, variant=plan.variant, split=split, resolution=plan.resolution,
                 channels=plan.channels, encoding=encoding, num_samples=sum(e.count for e in entries),
                 labels=plan.labels,
                 num_classes=len(plan.classes) if plan.labels else 0, classes=plan.classes if plan.labels else [],
                 split_rule=plan.split_rule, source=source, attributes=list(plan.attributes), shards=entries)
    return write_manifest(m, split_dir)
