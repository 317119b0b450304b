"""Re-read shards and check them against their manifest: existence, size, sha256, sample
count, first/last keys, and that every sample decodes to an 8-bit image of the manifest's
resolution and channels with a label when the split has labels."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from flowscale.data.codec import decode_attributes
from flowscale.data.manifest import DataError, Manifest, sha256_file
from flowscale.data.reader import SampleDecoder
from flowscale.data.tar import SampleReader, open_shard


def find_manifests(paths: list[str]) -> list[Path]:
    """Manifest files named by ``paths``: a manifest.json, a split directory, or a root holding split directories."""
    out = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif (p / "manifest.json").is_file():
            out.append(p / "manifest.json")
        elif p.is_dir():
            found = sorted(p.glob("*/manifest.json"))
            if not found:
                raise FileNotFoundError(f"{p}: no manifest.json in it or in its subdirectories")
            out.extend(found)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return out


def _check_shard(args) -> list[str]:
    url, entry, manifest, full = args
    problems = []
    name = entry.name
    try:
        size = Path(url).stat().st_size
    except OSError:
        return [f"{name}: missing ({url})"]
    if size != entry.bytes:
        problems.append(f"{name}: {size} bytes, manifest says {entry.bytes}")
    if full and sha256_file(url) != entry.sha256:
        problems.append(f"{name}: sha256 differs from the manifest")
    decode = SampleDecoder(manifest)
    count, keys, last = 0, set(), ""
    f, seekable = open_shard(url)
    try:
        reader = SampleReader(f, seekable)
        while (got := reader.next(want=True)) is not None:
            key, members = got
            if count == 0 and entry.first_key and key != entry.first_key:
                problems.append(f"{name}: first sample {key!r}, manifest says {entry.first_key!r}")
            if key in keys:
                problems.append(f"{name}: sample key {key!r} appears twice")
            keys.add(key)
            try:
                decode(members)
                if manifest.attributes:  # optional member, but present in every sample once listed
                    if "attr" not in members:
                        raise ValueError("no .attr member, but the manifest lists attributes")
                    decode_attributes(members["attr"], len(manifest.attributes))
            except ValueError as e:
                problems.append(f"{name}: sample {key!r} (#{count}): {e}")
            count, last = count + 1, key
    except (EOFError, ValueError) as e:
        problems.append(f"{name}: truncated or corrupt tar after {count} samples ({e})")
    finally:
        f.close()
    if count != entry.count:
        problems.append(f"{name}: {count} samples, manifest says {entry.count}")
    if entry.last_key and last and last != entry.last_key:
        problems.append(f"{name}: last sample {last!r}, manifest says {entry.last_key!r}")
    return problems


def verify(paths: list[str], workers: int = 1, full: bool = True, progress: bool = True) -> tuple[list[str], list[dict]]:
    """(problems, one summary row per split)."""
    from tqdm import tqdm

    problems, rows = [], []
    for mpath in find_manifests(paths):
        try:
            m = Manifest.from_json(mpath.read_text(), str(mpath))
        except DataError as e:
            problems.append(str(e))
            continue
        tasks = [(str(mpath.parent / e.name), e, m, full) for e in m.shards]
        pool = mp.get_context("fork").Pool(workers) if workers > 1 and len(tasks) > 1 else None
        found = []
        it = pool.imap(_check_shard, tasks) if pool else map(_check_shard, tasks)
        for res in tqdm(it, total=len(tasks), desc=str(mpath.parent.name), unit="shard", disable=not progress):
            found.extend(res)
        if pool:
            pool.close()
            pool.join()
        problems.extend(f"{mpath}: {p}" for p in found)
        rows.append({"manifest": str(mpath), "split": m.split, "dataset": m.dataset, "variant": m.variant,
                     "resolution": m.resolution, "channels": m.channels, "encoding": m.encoding,
                     "shards": len(m.shards), "samples": m.num_samples, "labels": m.labels, "ok": not found})
    return problems, rows
