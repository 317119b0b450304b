"""The manifest: what a split holds, written by data_prep and trusted by the loader.

A split is a directory ``<root>/<split>/`` holding ``manifest.json`` and tar shards named
``{prefix}-{split}-{000000..N}.tar`` (the tar and member format: :mod:`.tar`, :mod:`.codec`).
The manifest records, per shard, the sample count, byte size, sha256 and first/last keys, and
for the split the resolution, channels, encoding, dataset variant and how the split was made.

The loader trusts the manifest for counts (that is what makes exact resume possible without
reading skipped data) and checks every shard it opens against it (:mod:`.reader`); a shard
and manifest that disagree are a :class:`DataError`, never a silent change.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "flowscale.shards/v1"


class DataError(ValueError):
    """Bad data: a shard or sample that does not match its manifest. The message names the
    shard and, when known, the sample key."""


class NotAManifest(DataError):
    """The file given as a manifest is not JSON, or not a flowscale manifest at all."""


# -- names ------------------------------------------------------------------------------------

_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


def shard_name(prefix: str, split: str, index: int) -> str:
    return f"{prefix}-{split}-{index:06d}.tar"


def check_key(key: str) -> str:
    """Keys become tar member names ``<key>.<ext>``: no dots, slashes or spaces."""
    if not _KEY_OK.match(key):
        raise ValueError(f"sample key {key!r} must match [A-Za-z0-9_-]+ (it becomes a tar member name)")
    return key


# -- manifest ---------------------------------------------------------------------------------

@dataclass
class ShardEntry:
    name: str
    """File name relative to the manifest's directory."""
    count: int
    """Samples in the shard."""
    bytes: int
    """File size."""
    sha256: str
    """Hex digest of the whole file."""
    first_key: str = ""
    last_key: str = ""


@dataclass
class Manifest:
    dataset: str
    """Source dataset: celebahq, imagenet, ilsvrc2012, folder, demo, ..."""
    variant: str
    """Dataset version; bits/dim are only comparable within one variant (e.g. oord2016 vs chrabaszcz2017)."""
    split: str
    resolution: int
    channels: int
    encoding: str
    """png or npy."""
    num_samples: int
    labels: bool
    num_classes: int = 0
    classes: list[str] = field(default_factory=list)
    split_rule: str = ""
    """How the split was made from the source (e.g. 'index < 27000')."""
    source: dict[str, Any] = field(default_factory=dict)
    """Conversion details: source form, resize filter, order, mode conversions."""
    attributes: list[str] = field(default_factory=list)
    """Names of the binary per-sample attributes stored as ``<key>.attr`` (:mod:`.codec`), in order;
    empty when the split has none. Training ignores them; the latent tools read them."""
    shards: list[ShardEntry] = field(default_factory=list)
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise NotAManifest(f"{where} is not valid JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise NotAManifest(f"{where} is not a flowscale shard manifest (format {FORMAT!r}); create shards with "
                            f"`flowscale prep` / `python -m data_prep`")
        try:
            shards = [ShardEntry(**s) for s in d.pop("shards")]
            m = cls(**d, shards=shards)
        except TypeError as e:
            raise DataError(f"{where}: malformed manifest ({e})") from None
        total = sum(s.count for s in m.shards)
        if total != m.num_samples:
            raise DataError(f"{where}: shard counts sum to {total} but num_samples is {m.num_samples}")
        if not m.shards or min(s.count for s in m.shards) < 1:
            raise DataError(f"{where}: a manifest needs at least one shard and no empty shards")
        return m


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(manifest: Manifest, split_dir: str | Path) -> Path:
    path = Path(split_dir) / "manifest.json"
    tmp = path.with_name(f".manifest.json.tmp-{os.getpid()}")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)
    return path
