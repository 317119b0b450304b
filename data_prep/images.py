"""Decoding source images into uint8 RGB [H, W, 3], explicitly.

Files are decoded by content, not by extension (ILSVRC2012 has a PNG named .JPEG and CMYK
JPEGs). Every conversion that changes the representation (CMYK, grayscale, palette, 16-bit ->
8-bit RGB) is reported as a note so the converter can count it in the manifest; nothing is
converted silently.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

_EXT_FORMATS = {".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP", ".gif": "GIF",
                ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM"}
IMAGE_SUFFIXES = tuple(_EXT_FORMATS) + (".npy",)


def to_rgb(img: Image.Image) -> tuple[np.ndarray, list[str]]:
    """PIL image -> uint8 RGB array, with notes on each conversion made."""
    notes = []
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.round(arr * (255.0 / hi)).clip(0, 255).astype(np.uint8))
        notes.append(f"{mode}->8bit")
        mode = img.mode
    if mode != "RGB":
        notes.append(f"{mode}->RGB")
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8), notes


def load_file(path: str, data: bytes | None = None) -> tuple[np.ndarray, list[str]]:
    """An image file (any format PIL reads, or .npy of uint8 [3, H, W] / [1, 3, H, W] / [H, W, 3])
    -> (uint8 [H, W, 3], conversion notes). ``data``: the file's bytes when they are not on disk
    (a tar member); ``path`` then only names it (messages, the extension check)."""
    src = path if data is None else io.BytesIO(data)
    if data is None:
        with open(path, "rb") as f:
            head = f.read(6)
    else:
        head = data[:6]
    if head == b"\x93NUMPY":
        arr = np.load(src, allow_pickle=False)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[2] != 3:
            arr = arr.transpose(1, 2, 0)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"{path}: expected uint8 CHW/HWC RGB pixels, got {arr.dtype} {arr.shape}")
        return np.ascontiguousarray(arr), []
    with Image.open(src) as img:
        img.load()
        x, notes = to_rgb(img)
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
    """Square uint8 image -> size x size with a box (area) filter; exact averaging for integer factors."""
    if x.shape[0] == size and x.shape[1] == size:
        return x
    if min(x.shape[:2]) < size:
        raise ValueError(f"image is {x.shape[1]}x{x.shape[0]}, smaller than the target {size}px (no upscaling)")
    return np.asarray(Image.fromarray(x).resize((size, size), Image.BOX))
