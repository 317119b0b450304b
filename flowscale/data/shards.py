"""The shard format, in one place: webdataset tars of lossless uint8 images plus a manifest.

A split is a directory ``<root>/<split>/`` holding ``manifest.json`` and tar shards named
``{prefix}-{split}-{000000..N}.tar``. Each sample is a group of consecutive tar members that
share a key (the webdataset convention: the name up to the first dot)::

    <key>.png   RGB (or L for channels=1), 8-bit, height = width = resolution
    <key>.npy   the same pixels as a raw uint8 [H, W, C] array (fast to decode at small sizes)
    <key>.cls   optional class label, ASCII decimal, 0-based

Tars are written deterministically (sorted member order, mtime 0, uid/gid 0, no user names,
USTAR headers), so the same samples give byte-identical shards. The manifest records, per
shard, the sample count, byte size and sha256, and for the split the resolution, channels,
encoding, dataset variant and how the split was made. The loader trusts the manifest for
counts (that is what makes exact resume possible without reading skipped data) and checks
every shard it opens against it.

Reading uses a small USTAR parser instead of :mod:`tarfile`: it verifies each header's
checksum, detects truncation, and can skip a member's bytes with a seek (local files) so a
resumed loader does not read, let alone decode, the samples it has already delivered.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

FORMAT = "flowscale.shards/v1"
IMAGE_EXTS = ("npy", "png")
BLOCK = 512


class DataError(ValueError):
    """Bad data: a shard or sample that does not match its manifest. The message names the
    shard and, when known, the sample key."""


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
    shards: list[ShardEntry] = field(default_factory=list)
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise DataError(f"{where} is not a flowscale shard manifest (format {FORMAT!r}); create shards with "
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


# -- encoding ---------------------------------------------------------------------------------

def encode_image(x_hwc: np.ndarray, encoding: str) -> bytes:
    """uint8 [H, W, C] -> PNG or .npy bytes (deterministic for a given zlib / numpy)."""
    if x_hwc.dtype != np.uint8 or x_hwc.ndim != 3 or x_hwc.shape[2] not in (1, 3):
        raise ValueError(f"expected uint8 [H, W, 1|3], got {x_hwc.dtype} {x_hwc.shape}")
    buf = io.BytesIO()
    if encoding == "npy":
        np.save(buf, np.ascontiguousarray(x_hwc), allow_pickle=False)
    elif encoding == "png":
        from PIL import Image

        img = Image.fromarray(x_hwc[:, :, 0] if x_hwc.shape[2] == 1 else x_hwc)
        img.save(buf, format="PNG", compress_level=6)
    else:
        raise ValueError(f"encoding must be 'png' or 'npy', got {encoding!r}")
    return buf.getvalue()


def encode_sample(key: str, x_hwc: np.ndarray, encoding: str, label: int | None) -> list[tuple[str, bytes]]:
    """Tar members of one sample, in their fixed order."""
    check_key(key)
    members = [(f"{key}.{encoding}", encode_image(x_hwc, encoding))]
    if label is not None:
        members.append((f"{key}.cls", str(int(label)).encode()))
    return members


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], str, bool]] = {}


def _decode_npy(data: bytes) -> np.ndarray:
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file (bad magic)")
    major = data[6]
    if major == 1:
        hlen, start = int.from_bytes(data[8:10], "little"), 10
    else:
        hlen, start = int.from_bytes(data[8:12], "little"), 12
    header = data[start:start + hlen]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:  # parse each distinct header once: they repeat for every sample
        d = ast.literal_eval(header.decode("latin1"))
        parsed = (tuple(d["shape"]), d["descr"], d["fortran_order"])
        _NPY_HEADERS[header] = parsed
    shape, descr, fortran = parsed
    dtype = np.dtype(descr)
    if dtype.hasobject:
        raise ValueError("object arrays are not images")
    body = data[start + hlen:]
    n = int(np.prod(shape)) * dtype.itemsize
    if len(body) != n:
        raise ValueError(f"truncated .npy: {len(body)} bytes of pixels, header says {n}")
    arr = np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return arr


_PIL_MODES = {"RGB": 3, "L": 1}
_MODE_WORDS = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit integer", "F": "float",
               "CMYK": "CMYK", "L": "grayscale", "LA": "grayscale+alpha", "P": "palette", "RGBA": "RGBA",
               "1": "1-bit", "YCbCr": "YCbCr", "RGB": "RGB"}


def decode_image(data: bytes, ext: str, resolution: int, channels: int) -> np.ndarray:
    """Image bytes -> uint8 [H, W, C], or ValueError saying what is wrong. Never converts:
    a grayscale, CMYK, 16-bit or wrongly sized image in a shard is an error, not silently fixed."""
    if ext == "npy":
        x = _decode_npy(data)
        if x.dtype != np.uint8:
            raise ValueError(f"pixels are {x.dtype}, expected uint8 (re-run data_prep to convert to 8-bit)")
        if x.ndim == 2:
            x = x[:, :, None]
        if x.ndim != 3:
            raise ValueError(f"array of shape {x.shape} is not an [H, W, C] image")
    elif ext == "png":
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"not a decodable image ({type(e).__name__}: {e})") from None
        want = "RGB" if channels == 3 else "L"
        if img.mode != want:
            raise ValueError(f"image mode {img.mode} ({_MODE_WORDS.get(img.mode, img.mode)}), expected {want} "
                             f"(8-bit, {channels} channel(s)); re-run data_prep, which converts explicitly")
        x = np.asarray(img)
        if x.ndim == 2:
            x = x[:, :, None]
    else:
        raise ValueError(f"member '.{ext}' is not an image member (expected one of {IMAGE_EXTS})")
    if x.shape != (resolution, resolution, channels):
        raise ValueError(f"image is {x.shape[1]}x{x.shape[0]} with {x.shape[2]} channel(s), the manifest says "
                         f"{resolution}x{resolution} with {channels}")
    return x


def decode_label(data: bytes) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"label member is not an ASCII integer: {data[:20]!r}") from None


# -- writing ----------------------------------------------------------------------------------

def _ustar_header(name: str, size: int) -> bytes:
    import tarfile

    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid = size, 0, 0o444, 0, 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


class TarWriter:
    """Deterministic tar writing to ``path`` via a temporary file renamed on close (a shard
    either exists complete or not at all; that is what makes conversion resumable)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.f = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.size = 0

    def _write(self, b: bytes) -> None:
        self.f.write(b)
        self.hash.update(b)
        self.size += len(b)

    def add(self, name: str, data: bytes) -> None:
        self._write(_ustar_header(name, len(data)))
        self._write(data)
        pad = -len(data) % BLOCK
        if pad:
            self._write(b"\0" * pad)

    def close(self) -> tuple[int, str]:
        """Finish the archive; returns (bytes, sha256)."""
        self._write(b"\0" * (2 * BLOCK))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.size, self.hash.hexdigest()

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def write_manifest(manifest: Manifest, split_dir: str | Path) -> Path:
    path = Path(split_dir) / "manifest.json"
    tmp = path.with_name(f".manifest.json.tmp-{os.getpid()}")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)
    return path


# -- reading ----------------------------------------------------------------------------------

def _octal(field_bytes: bytes) -> int:
    s = field_bytes.rstrip(b"\0 ").lstrip(b" ")
    return int(s, 8) if s else 0


class TarReader:
    """Sequential USTAR member reader over a binary stream.

    ``next()`` returns (member name, size) or None at the end-of-archive marker; then either
    ``read()`` or ``skip()`` the member's data. Raises :class:`EOFError` on truncation and
    ValueError on a corrupt header (bad checksum), so a broken shard can never hang or yield
    garbage silently.
    """

    def __init__(self, f: BinaryIO, seekable: bool):
        self.f, self.seekable = f, seekable
        self.offset = 0
        self._pending = 0  # data + padding of the current member not yet consumed

    def _read_exact(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise EOFError(f"truncated at byte {self.offset + len(b)} (wanted {n} more bytes)")
        self.offset += n
        return b

    def next(self) -> tuple[str, int] | None:
        if self._pending:
            self.skip()
        while True:
            h = self.f.read(BLOCK)
            if len(h) == 0:
                raise EOFError(f"ends at byte {self.offset} without the end-of-archive marker")
            if len(h) != BLOCK:
                raise EOFError(f"truncated inside a header at byte {self.offset}")
            self.offset += BLOCK
            if h == b"\0" * BLOCK:
                return None
            chk = _octal(h[148:156])
            if chk != sum(h[:148]) + 256 + sum(h[156:]):
                raise ValueError(f"corrupt tar header at byte {self.offset - BLOCK} (checksum mismatch)")
            size = _octal(h[124:136])
            kind = h[156:157]
            name = h[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if h[257:262] == b"ustar":
                prefix = h[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
                if prefix:
                    name = f"{prefix}/{name}"
            self._pending = size + (-size % BLOCK)
            if kind in (b"0", b"\0"):
                self._size = size
                return name, size
            self.skip()  # directories, links, pax headers: not samples

    def read(self) -> bytes:
        data = self._read_exact(self._size)
        pad = self._pending - self._size
        self._pending = 0
        if pad:
            self._read_exact(pad)
        return data

    def skip(self) -> None:
        n, self._pending = self._pending, 0
        if not n:
            return
        if self.seekable:
            self.f.seek(n, io.SEEK_CUR)
            self.offset += n
        else:
            while n:
                k = len(self._read_exact(min(n, 1 << 20)))
                n -= k


def member_key(name: str) -> tuple[str, str]:
    """'dir/abc.x.png' -> ('dir/abc', 'x.png'): webdataset splits at the first dot of the basename."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


class SampleReader:
    """Samples (key -> {ext: bytes}) of one shard, in order; ``next(want)`` reads the sample's
    bytes only when ``want`` is true (otherwise its members are skipped unread)."""

    def __init__(self, f: BinaryIO, seekable: bool):
        self.tar = TarReader(f, seekable)
        self._head = self.tar.next()
        self.index = 0  # samples passed so far

    def next(self, want: bool) -> tuple[str, dict[str, bytes]] | None:
        if self._head is None:
            return None
        key = member_key(self._head[0])[0]
        members: dict[str, bytes] = {}
        while self._head is not None and member_key(self._head[0])[0] == key:
            ext = member_key(self._head[0])[1]
            if want:
                members[ext] = self.tar.read()
            else:
                self.tar.skip()
            self._head = self.tar.next()
        self.index += 1
        return key, members


def open_shard(url: str) -> tuple[BinaryIO, bool]:
    """A binary stream for a local path or a URL (http(s), pipe:, ... via webdataset's gopen);
    returns (stream, seekable)."""
    if "://" not in url and not url.startswith("pipe:"):
        path = url[7:] if url.startswith("file:") else url
        return open(path, "rb", buffering=1 << 20), True
    import webdataset as wds

    return wds.gopen(url, "rb"), False


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def read_text(url: str) -> str:
    """A small text file (the manifest) from a local path or URL."""
    f, _ = open_shard(url)
    with f:
        return f.read().decode("utf-8")


def write_shards(split_dir: str | Path, prefix: str, split: str, samples, samples_per_shard: int,
                 manifest: Manifest) -> Manifest:
    """Sequentially write ``samples`` (an iterable of (key, uint8 [H, W, C], label | None)) into
    shards of ``samples_per_shard`` under ``split_dir`` and save the completed ``manifest``
    (its shards and num_samples are filled in here). For small datasets such as the demo;
    data_prep's converters do the same in parallel and resumably."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    entries: list[ShardEntry] = []
    writer, count, first, last = None, 0, "", ""

    def finish():
        size, digest = writer.close()
        entries.append(ShardEntry(shard_name(prefix, split, len(entries)), count, size, digest, first, last))

    for key, x, label in samples:
        if writer is None:
            writer, count, first = TarWriter(split_dir / shard_name(prefix, split, len(entries))), 0, key
        for name, data in encode_sample(key, x, manifest.encoding, label):
            writer.add(name, data)
        count, last = count + 1, key
        if count == samples_per_shard:
            finish()
            writer = None
    if writer is not None:
        finish()
    manifest.shards = entries
    manifest.num_samples = sum(e.count for e in entries)
    write_manifest(manifest, split_dir)
    return manifest
