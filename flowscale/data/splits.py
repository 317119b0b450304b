"""Where a split lives: a manifest and one URL per shard, checked against the config.

``load_split`` reads the manifest (a manifest.json, its split directory, or a URL) and
resolves its shards next to it or from an explicit list whose file names must match the
manifest's. Local shards are checked at once, so every rank decides alike and before the
first step: a missing shard, or one whose size differs from the manifest's (truncated, a member
added or dropped, zero bytes, not a tar), is a :class:`DataError` naming it, or with
``data.bad_data=skip`` is left out of the run (``Split.bad_shards``: it keeps its place in the
order and yields nothing; the readers count its samples as skipped, once). ``resolve_split``
picks the train or test split of a data config (building the demo shards on first use) and
refuses a manifest whose resolution or channels differ from the config's.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import DataError, Manifest, NotAManifest
from .tar import is_local, read_text

NOT_FLOWSCALE = ("flowscale reads the shards `flowscale prep` writes (.png/.npy images, a manifest.json), so "
                 "webdataset shards made elsewhere are converted once")


@dataclass
class Split:
    """A split's manifest and one URL per manifest shard."""
    manifest: Manifest
    urls: list[str]
    where: str
    """The manifest's location, for messages."""
    bad_shards: dict[int, str] = field(default_factory=dict)
    """Shards found unusable when the split was loaded (bad_data=skip): index -> why."""

    @property
    def counts(self) -> list[int]:
        return [s.count for s in self.manifest.shards]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image in the split."""
        return self.manifest.channels, self.manifest.resolution, self.manifest.resolution

    @functools.cached_property
    def convert_advice(self) -> str:
        """How to turn this split's shards into flowscale shards, when they turn out to be foreign."""
        return convert_advice(self.urls, self.manifest.split, self.manifest.resolution)


def compact_urls(urls: list[str]) -> str:
    """Shard URLs -> one source string: a brace pattern when they are numbered consecutively
    (``/d/x-{0000..0041}.tar``), else the URLs joined by '::' (both as data.train_shards reads them)."""
    if len(urls) == 1:
        return urls[0]
    parts = [re.fullmatch(r"(.*?)(\d+)(\D*)", u) for u in urls]  # the last run of digits
    if all(parts):
        pre, first, post = parts[0].groups()
        nums = [int(m.group(2)) for m in parts]
        if all(m.group(1) == pre and m.group(3) == post and len(m.group(2)) == len(first) for m in parts) \
                and nums == list(range(nums[0], nums[0] + len(nums))):
            return f"{pre}{{{first}..{parts[-1].group(2)}}}{post}"
    return "::".join(urls)


def convert_advice(urls: list[str], split: str, resolution: int | None, field: str | None = None) -> str:
    """'run `flowscale prep webdataset SRC OUT ...` and set data.<field>=OUT/<split>' for
    foreign shards at ``urls`` (OUT: beside the first shard's folder, or ./ for remote shards)."""
    out = f"{urls[0].rsplit('/', 1)[0]}-flowscale" if is_local(urls[0]) and "/" in urls[0] else "./flowscale-shards"
    cmd = (f"flowscale prep webdataset {shlex.quote(compact_urls(urls))} {shlex.quote(out)} --split {split}"
           + (f" --resolution {resolution}" if resolution else ""))
    point = f"set data.{field}={out}/{split}" if field else \
        f"point data.train_manifest or data.test_manifest (the one naming them) at {out}/{split}"
    return f"run `{cmd}` and {point}"


def _numbered_like(path: Path) -> list[str]:
    """The .tar files beside ``path`` named like it up to the number (its split's shards), in order."""
    pattern = r"\d+".join(map(re.escape, re.split(r"\d+", path.name)))
    same = sorted(str(p) for p in path.parent.iterdir() if re.fullmatch(pattern, p.name))
    return same or [str(path)]


def _is_tar(where: str) -> bool:
    if where.endswith((".tar", ".tar.gz", ".tgz")):
        return True
    if not is_local(where) or not os.path.isfile(where):
        return False
    with open(where, "rb") as f:
        return f.read(512)[257:262] == b"ustar"


def _not_a_manifest(where: str, split: str, resolution: int | None, field: str | None) -> DataError | None:
    """The error for a manifest location that holds (or sits among) tar shards instead, or None."""
    path = Path(where[7:] if where.startswith("file:") else where)
    if _is_tar(where):
        urls = _numbered_like(path) if is_local(where) else [where]
        return DataError(f"{where} is a tar shard, not a manifest: data.{field or 'train_manifest'} names the "
                         f"manifest.json that `flowscale prep` writes (or its folder). {NOT_FLOWSCALE}: "
                         f"{convert_advice(urls, split, resolution, field)}")
    if is_local(where) and path.parent.is_dir():
        tars = sorted(p for p in path.parent.iterdir() if p.suffix == ".tar" and p.is_file())
        if tars:
            return DataError(f"{path.parent} holds .tar shards but no flowscale manifest.json. {NOT_FLOWSCALE}: "
                             f"{convert_advice(_numbered_like(tars[0]), split, resolution, field)}")
    return None


def _manifest_url(loc: str) -> str:
    if is_local(loc) and Path(loc).is_dir():
        return str(Path(loc) / "manifest.json")
    return loc


def load_split(manifest: str, shards: str | None = None, bad_data: str = "error", split: str = "train",
               resolution: int | None = None, field: str | None = None) -> Split:
    """Read ``manifest`` (a manifest.json, the split directory holding one, or a URL) and
    resolve its shards: next to the manifest, or from ``shards`` (a brace pattern / list of
    paths or URLs separated by '::' whose file names match the manifest's).

    Local shards are checked now: a missing one, or one whose size differs from the manifest's,
    is a DataError naming it, or with bad_data=skip an entry of ``bad_shards``. A tar shard (or
    a folder of shards without a manifest) given as the manifest is a DataError saying how to
    convert them; ``split``, ``resolution`` and ``field`` (the config field) fill in that advice.
    """
    where = _manifest_url(str(manifest))
    if is_local(where) and not Path(where).is_file():
        raise _not_a_manifest(where, split, resolution, field) or DataError(
            f"manifest {where} not found; create shards with `flowscale prep ...` (see README, Data) or point "
            f"data.train_manifest/test_manifest at one")
    if _is_tar(where):
        raise _not_a_manifest(where, split, resolution, field)
    try:
        m = Manifest.from_json(read_text(where), where)
    except (UnicodeDecodeError, NotAManifest) as e:  # foreign files: say how to convert shards found beside them
        foreign = _not_a_manifest(where, split, resolution, field)
        if foreign is not None:
            raise foreign from None
        if isinstance(e, UnicodeDecodeError):
            raise DataError(f"{where} is not a text file, so not a manifest.json written by `flowscale prep`") from None
        raise
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
    bad: dict[int, str] = {}
    for k, (url, s) in enumerate(zip(urls, m.shards)):
        if not is_local(url):
            continue  # a URL is checked as it is read (reader.ShardCursor)
        path = url[7:] if url.startswith("file:") else url
        if not os.path.exists(path):
            bad[k] = f"missing (listed in manifest {where} with {s.count} samples)"
            fix = "re-run the conversion (it resumes)"
        elif (size := os.path.getsize(path)) != s.bytes:
            bad[k] = f"{size} bytes but manifest {where} says {s.bytes}: the shard and the manifest do not match"
            fix = f"re-run the conversion or `flowscale prep verify {where}`"
        else:
            continue
        if bad_data == "error":
            raise DataError(f"shard {path} is {bad[k]}; {fix}, or set data.bad_data=skip to leave it out of the run "
                            f"(its samples counted as skipped)")
    return Split(m, urls, where, bad)


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
        src = load_split(loc, getattr(data_cfg, f"{split}_shards"), data_cfg.bad_data, split, data_cfg.image_size,
                         field)
    m = src.manifest
    if m.resolution != data_cfg.image_size:
        raise ConfigError(f"config field 'data.image_size': {data_cfg.image_size}, but {src.where} holds "
                          f"{m.resolution}x{m.resolution} images; set data.image_size={m.resolution} or prep shards "
                          f"at {data_cfg.image_size}")
    if m.channels != data_cfg.channels:
        raise ConfigError(f"config field 'data.channels': {data_cfg.channels}, but {src.where} holds "
                          f"{m.channels}-channel images; set data.channels={m.channels}")
    return src
