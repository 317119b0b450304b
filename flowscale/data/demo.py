"""The demo dataset: real photographs that ship inside scikit-image, cut into small crops.

No download happens: the photos are files in the installed ``skimage.data`` package. Each
photo is downscaled with an area (box) filter to several sizes and random square crops are
taken, deterministically from ``seed``. Train and test come from different photos, so test
bits/dim measure generalisation to unseen images, not memorisation of crops.

Training reads the demo like any dataset: :func:`demo_shards` writes the crops once into
shards with a manifest under ``data.cache_dir`` (deterministic, so every rank and every run
with the same data config gets byte-identical shards) and the streaming loader reads them.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
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


DEMO_VERSION = 1  # bump when the crops or the shard layout change: a new cache directory
DEMO_SHARD_SAMPLES = 1024


def cache_root(data_cfg) -> Path:
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowscale"


def demo_shards(data_cfg) -> Path:
    """The directory holding ``train/`` and ``test/`` demo shards for this data config, built on
    first use. Concurrent callers (ranks, runs) wait on a file lock; the build goes to a
    temporary directory that is renamed into place, so a crash never leaves a partial cache."""
    from .codec import default_encoding
    from .manifest import Manifest
    from .tar import write_shards

    if data_cfg.channels != 3:
        raise ValueError(f"data.channels={data_cfg.channels}, but the demo photos are RGB: set data.channels=3")
    size, seed = data_cfg.image_size, data_cfg.seed
    name = f"demo-v{DEMO_VERSION}-{size}px-train{data_cfg.train_size}-test{data_cfg.test_size}-seed{seed}"
    root = cache_root(data_cfg)
    final = root / name
    if (final / "test" / "manifest.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "test" / "manifest.json").is_file():  # built while we waited
            return final
        tmp = root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        encoding = default_encoding(size)
        for split, n in (("train", data_cfg.train_size), ("test", data_cfg.test_size)):
            x = demo_images(split, n, size, seed).permute(0, 2, 3, 1).numpy()
            photos = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS
            manifest = Manifest(dataset="demo", variant=f"skimage-photos-v{DEMO_VERSION}", split=split, resolution=size,
                                channels=3, encoding=encoding, num_samples=n, labels=False,
                                split_rule=f"{split} photos: {', '.join(photos)}",
                                source={"form": "skimage.data photos", "crops": f"{n} random {size}px crops of "
                                        f"area-downscaled photos, seed {seed}"})
            write_shards(tmp / split, "demo", split, ((f"{split}{i:07d}", x[i], None) for i in range(n)),
                         DEMO_SHARD_SAMPLES, manifest)
        if final.exists():  # an incomplete leftover from an older layout
            shutil.rmtree(final)
        os.replace(tmp, final)
    return final


def build_datasets(data_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) demo crops as in-memory uint8 tensors (for benchmarks that want fixed
    batches; training streams the same crops from shards)."""
    if data_cfg.dataset != "demo":
        raise ValueError(f"build_datasets holds only the demo in memory; data.dataset={data_cfg.dataset!r} "
                         f"is streamed with flowscale.data.build_train_loader")
    if data_cfg.channels != 3:
        raise ValueError(f"data.channels={data_cfg.channels}, but the demo photos are RGB: set data.channels=3")
    train = demo_images("train", data_cfg.train_size, data_cfg.image_size, data_cfg.seed)
    test = demo_images("test", data_cfg.test_size, data_cfg.image_size, data_cfg.seed)
    return train, test
