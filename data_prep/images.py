"""Decoding source images into uint8 [H, W, C] (C = 1 grayscale or 3 RGB), explicitly.

Files are decoded by content, not by extension (ILSVRC2012 has a PNG named .JPEG and CMYK
JPEGs). A grayscale image stays one channel and an RGB image three; every conversion that
changes the representation (CMYK, palette, alpha, 16-bit -> 8-bit, and grayscale <-> RGB when a
split's channel count asks for it) is reported as a note so the converter can count it in the
manifest; nothing is converted silently.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

_EXT_FORMATS = {".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP", ".gif": "GIF",
                ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM"}
IMAGE_SUFFIXES = tuple(_EXT_FORMATS) + (".npy",)

GRAY_MODES = ("L", "LA", "1", "I;16", "I;16B", "I;16L", "I", "F")
"""PIL modes whose pixels are one intensity: they decode to one channel."""


def native_channels(img: Image.Image) -> int:
    """1 for a grayscale PIL image (any bit depth, with or without alpha), 3 otherwise."""
    return 1 if img.mode in GRAY_MODES else 3


def to_pixels(img: Image.Image, channels: int | None = None) -> tuple[np.ndarray, list[str]]:
    """PIL image -> uint8 [H, W, C], with notes on each conversion made. ``channels``: 1 or 3, or
    None for the image's own (:func:`native_channels`)."""
    notes = []
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.round(arr * (255.0 / hi)).clip(0, 255).astype(np.uint8))
        notes.append(f"{mode}->8bit")
        mode = img.mode
    want = "L" if (channels or native_channels(img)) == 1 else "RGB"
    if mode != want:
        notes.append(f"{mode}->{want}")
        img = img.convert(want)
    x = np.asarray(img, dtype=np.uint8)
    return (x[:, :, None] if x.ndim == 2 else x), notes


def match_channels(x: np.ndarray, channels: int | None) -> tuple[np.ndarray, list[str]]:
    """uint8 [H, W, 1|3] -> [H, W, channels] (grayscale replicated, or RGB -> luma by PIL's
    ITU-R 601 weights), with a note when converted; None keeps the array's own."""
    if channels is None or x.shape[2] == channels:
        return x, []
    if channels == 3:
        return np.repeat(x, 3, axis=2), ["L->RGB"]
    return np.asarray(Image.fromarray(x).convert("L"))[:, :, None], ["RGB->L"]


def _npy_pixels(path: str, data: bytes | None = None) -> np.ndarray:
    """A .npy image: uint8 [H, W] / [H, W, C] / [C, H, W] / [1, C, H, W] with C in 1, 3 -> [H, W, C]
    (``data``: its bytes, when not read from ``path``)."""
    arr = np.load(path if data is None else io.BytesIO(data), allow_pickle=False)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"{path}: expected uint8 pixels HW, HWC or CHW with 1 or 3 channels, got {arr.dtype} "
                         f"{arr.shape}")
    return np.ascontiguousarray(arr)


def file_channels(path: str) -> int:
    """The channels :func:`load_file` gives ``path`` by default (reads the header only for images)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        return _npy_pixels(path).shape[2]
    with Image.open(path) as img:
        return native_channels(img)


def load_file(path: str, channels: int | None = None, data: bytes | None = None) -> tuple[np.ndarray, list[str]]:
    """An image file (any format PIL reads, or a .npy as :func:`_npy_pixels` takes) -> (uint8
    [H, W, C], conversion notes); ``channels`` as in :func:`to_pixels`. ``data``: the file's bytes
    when they are not on disk (a tar member); ``path`` then only names it (messages, the extension check)."""
    if data is None:
        with open(path, "rb") as f:
            head = f.read(6)
    else:
        head = data[:6]
    if head == b"\x93NUMPY":
        return match_channels(_npy_pixels(path, data), channels)
    with Image.open(path if data is None else io.BytesIO(data)) as img:
        img.load()
        x, notes = to_pixels(img, channels)
        suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""
        if suffix in _EXT_FORMATS and img.format and img.format != _EXT_FORMATS[suffix]:
            notes.append(f"{img.format} named {suffix}")
    return x, notes


def center_square(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[top:top + s, left:left + s]


def resize_box(x: np.ndarray, size: int) -> np.ndarray:
    """Square uint8 [H, W, C] -> size x size with a box (area) filter; exact averaging for integer factors."""
    if x.shape[0] == size and x.shape[1] == size:
        return x
    if min(x.shape[:2]) < size:
        raise ValueError(f"image is {x.shape[1]}x{x.shape[0]}, smaller than the target {size}px (no upscaling)")
    out = np.asarray(Image.fromarray(x[:, :, 0] if x.shape[2] == 1 else x).resize((size, size), Image.BOX))
    return out[:, :, None] if out.ndim == 2 else out


def pad_square(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, h, C] -> [size, size, C], centred in zeros (MNIST 28 -> 32: 2 px each side)."""
    h = x.shape[0]
    if size < h:
        raise ValueError(f"image is {h}px, larger than --pad-to {size}")
    a = (size - h) // 2
    return np.pad(x, ((a, size - h - a), (a, size - h - a), (0, 0)))
