"""``flowscale bench loader``: images/s of the shard loader against a torchvision ImageFolder +
PIL DataLoader over the same images, with the same number of workers and batch size, in one run.

For each size the same real photo crops (the demo photos) are written three ways into a
temporary directory: an ImageFolder tree of PNG files, PNG shards and npy shards. Each reader
then delivers uint8 [B, 3, S, S] batches for one pass over the images (ImageFolder with
PILToTensor, so both sides skip float conversion); the clock starts at the first batch, so
worker start-up is not counted, and every batch is read once (as training would; a batch from a
worker process arrives in shared memory, and its pages are only mapped when touched). Prints a
markdown table with the ratio to ImageFolder.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def _write_inputs(root: Path, size: int, n: int) -> dict[str, Path]:
    from PIL import Image

    from ..data import demo_images
    from ..data.manifest import Manifest
    from ..data.tar import write_shards

    x = demo_images("train", n, size, seed=size).permute(0, 2, 3, 1).numpy()
    folder = root / f"folder{size}" / "photos"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(x[i]).save(folder / f"{i:06d}.png", compress_level=6)
    out = {"folder": folder.parent}
    for enc in ("png", "npy"):
        m = Manifest(dataset="bench", variant="demo", split="train", resolution=size, channels=3, encoding=enc,
                     num_samples=n, labels=False)
        write_shards(root / f"{enc}{size}" / "train", "bench", "train", ((f"{i:06d}", x[i], None) for i in range(n)),
                     max(1, n // 16), m)
        out[enc] = root / f"{enc}{size}"
    return out


def _rate(batches, n_batches: int, batch_size: int) -> float:
    it = iter(batches)
    next(it)  # start-up (worker processes, first reads) is not timed
    t0 = time.perf_counter()
    for _ in range(n_batches - 1):
        x = next(it)
        x = x[0] if isinstance(x, (tuple, list)) else x
        assert x.shape[0] == batch_size
        x.sum()  # read it, as training does: a batch from a worker arrives in shared memory, untouched
    return (n_batches - 1) * batch_size / (time.perf_counter() - t0)


def measure(size: int, n: int, workers: int, batch_size: int, tmp: Path, streams: int = 0) -> dict[str, float]:
    import torch
    import torchvision

    from ..config import DataConfig
    from ..data import build_train_loader

    paths = _write_inputs(tmp, size, n)
    n_batches = n // batch_size
    ds = torchvision.datasets.ImageFolder(str(paths["folder"]), transform=torchvision.transforms.PILToTensor())
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                     persistent_workers=False)
    out = {"folder": _rate(dl, n_batches, batch_size)}
    for enc in ("png", "npy"):
        cfg = DataConfig(dataset="shards", train_manifest=str(paths[enc] / "train"),
                         test_manifest=str(paths[enc] / "train"), image_size=size, batch_size=batch_size,
                         num_workers=workers, shuffle_buffer=1000, streams=streams)
        out[enc] = _rate(build_train_loader(cfg), n_batches, batch_size)
    return out


def run(ns) -> int:
    from ..data.codec import default_encoding

    rows = []
    with tempfile.TemporaryDirectory(dir=ns.dir) as d:
        for size in ns.sizes:
            n = ns.images if size <= 64 else max(ns.batch_size * 4, ns.images // 4)
            r = measure(size, n, ns.workers, ns.batch_size, Path(d), ns.streams)
            rows.append((size, n, r))
            print(f"{size}px done", flush=True)
    print(f"\nloader throughput, images/s ({ns.workers} worker(s), batch {ns.batch_size}, data.streams={ns.streams}; "
          f"{os.cpu_count()} CPU cores, "
          f"{platform.processor() or platform.machine()}):\n")
    print("| size | images | ImageFolder+PIL | shards PNG | shards npy | PNG / ImageFolder | npy / ImageFolder | "
          "prep's default (auto) / ImageFolder |")
    print("|---|---|---|---|---|---|---|---|")
    for size, n, r in rows:
        enc = default_encoding(size)
        print(f"| {size}x{size} | {n} | {r['folder']:.0f} | {r['png']:.0f} | {r['npy']:.0f} | "
              f"{r['png'] / r['folder']:.2f}x | {r['npy'] / r['folder']:.2f}x | {enc}: {r[enc] / r['folder']:.2f}x |")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("loader", help="shard loader vs torchvision ImageFolder images/s (32/64/256 px)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 256], help="image sizes (default: 32 64 256)")
    p.add_argument("--images", type=int, default=4096, help="images per size (a quarter of it above 64px; default 4096)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for every reader (default: 2)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--streams", type=int, default=0,
                   help="data.streams of the shard readers (default: 0, the per-worker order)")
    p.add_argument("--dir", default=None, help="where to write the temporary inputs (default: the system temp dir)")
    p.set_defaults(func=run)
