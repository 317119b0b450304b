"""One sample's tar members: lossless uint8 pixels and an optional label.

Each sample is a group of consecutive tar members that share a key (the webdataset
convention: the name up to the first dot)::

    <key>.png   RGB (or L for channels=1), 8-bit, height = width = resolution
    <key>.npy   the same pixels as a raw uint8 [H, W, C] array (fast to decode at small sizes)
    <key>.cls   optional class label, ASCII decimal, 0-based
    <key>.attr  optional binary attributes, ASCII '0'/'1', one character per name in the manifest's
                ``attributes`` (CelebA's 40: '1' = the image has it); read only by the latent tools

Decoding never converts: a grayscale, CMYK, 16-bit or wrongly sized image in a shard is a
ValueError saying what is wrong (data_prep converts explicitly, before writing).
"""

from __future__ import annotations

import ast
import io

import numpy as np

from .manifest import check_key

IMAGE_EXTS = ("npy", "png")

RAW_UP_TO = 256
"""``prep``'s ``--encoding auto``: raw .npy up to this size, PNG above. Measured on one core
(real photo crops): a 256 px image is 192 KiB raw, ~124 KiB as PNG, and decodes in ~0.05 ms raw
against ~2.5 ms as PNG (PIL or torchvision alike), so raw costs 1.5x the disk for ~50x less
decoding (CelebA-HQ 256: 5.9 GB raw). At 1024 px raw would be 94 GB for CelebA-HQ, and the
~40 ms decode of a PNG is small next to a 1024 px training step; `--encoding npy` when disk
is plentiful."""


def default_encoding(resolution: int) -> str:
    """The encoding ``--encoding auto`` picks for images of ``resolution`` px."""
    return "npy" if resolution <= RAW_UP_TO else "png"


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


def encode_sample(key: str, x_hwc: np.ndarray, encoding: str, label: int | None,
                  attributes: str | None = None) -> list[tuple[str, bytes]]:
    """Tar members of one sample, in their fixed order. ``attributes``: a '0'/'1' string (see above)."""
    check_key(key)
    members = [(f"{key}.{encoding}", encode_image(x_hwc, encoding))]
    if label is not None:
        members.append((f"{key}.cls", str(int(label)).encode()))
    if attributes is not None:
        if not attributes or set(attributes) - {"0", "1"}:
            raise ValueError(f"{key}: attributes must be a non-empty string of '0'/'1', got {attributes!r}")
        members.append((f"{key}.attr", attributes.encode("ascii")))
    return members


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], np.dtype, bool, int]] = {}


def _decode_npy(data: bytes) -> np.ndarray:
    """A read-only view of the pixels in ``data`` (no copy: the caller copies them into its batch)."""
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
        dtype = np.dtype(d["descr"])
        if dtype.hasobject:
            raise ValueError("object arrays are not images")
        shape = tuple(d["shape"])
        parsed = (shape, dtype, d["fortran_order"], int(np.prod(shape)))
        _NPY_HEADERS[header] = parsed
    shape, dtype, fortran, count = parsed
    body = len(data) - start - hlen
    if body != count * dtype.itemsize:
        raise ValueError(f"truncated .npy: {body} bytes of pixels, header says {count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=start + hlen).reshape(shape, order="F" if fortran else "C")


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


def decode_attributes(data: bytes, n: int) -> np.ndarray:
    """A ``.attr`` member -> bool [n], or ValueError saying what is wrong."""
    text = data.decode("ascii", "replace").strip()
    if len(text) != n or set(text) - {"0", "1"}:
        raise ValueError(f"attribute member {data[:50]!r} is not {n} characters of '0'/'1' (one per manifest attribute)")
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) == ord("1")
