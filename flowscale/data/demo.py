"""The demo dataset: real photographs that ship inside scikit-image, cut into small crops.

No download happens: the photos are files in the installed ``skimage.data`` package. Each
photo is downscaled with an area (box) filter to several sizes and random square crops are
taken, deterministically from ``seed``. Train and test come from different photos, so test
bits/dim measure generalisation to unseen images, not memorisation of crops.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TRAIN_PHOTOS = ("astronaut.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png", "retina.jpg")
TEST_PHOTOS = ("chelsea.png", "rocket.jpg")
SHORT_SIDES = (64, 96, 128, 192, 256)


@functools.lru_cache(maxsize=None)
def _pyramid(name: str, size: int) -> tuple[np.ndarray, ...]:
    import skimage.data

    path = Path(skimage.data.__file__).parent / name
    if not path.is_file():
        raise FileNotFoundError(f"demo photo {path} is missing: reinstall scikit-image (pip install --force-reinstall scikit-image)")
    with Image.open(path) as im:
        photo = im.convert("RGB")
    out = []
    for short in SHORT_SIDES:
        if short < size:
            continue
        w, h = photo.size
        f = short / min(w, h)
        out.append(np.asarray(photo.resize((max(size, round(w * f)), max(size, round(h * f))), Image.BOX)))
    return tuple(out)


def demo_images(split: str, n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 crops [n, 3, size, size] of the train or test photos."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size > max(SHORT_SIDES):
        raise ValueError(f"demo crops are at most {max(SHORT_SIDES)} px; got image_size={size}")
    photos = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS
    images = [img for name in photos for img in _pyramid(name, size)]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, size])
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    which = rng.integers(len(images), size=n)
    for i, k in enumerate(which):
        img = images[k]
        top = rng.integers(img.shape[0] - size + 1)
        left = rng.integers(img.shape[1] - size + 1)
        out[i] = img[top:top + size, left:left + size]
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
