"""``flowscale bench loader``: images/s of the shard loader against a torchvision ImageFolder +
PIL DataLoader over the same images, with the same number of workers and batch size, in one run.

For each size the same real photo crops (the demo photos) are written three ways into a
temporary directory: an ImageFolder tree of PNG files, PNG shards and npy shards. Each reader
then delivers uint8 [B, 3, S, S] batches (ImageFolder with PILToTensor, so both sides skip
float conversion) for ``--passes`` passes over the images; the clock starts at the first
batch, so worker start-up is not counted, and every batch is read once by a copy into a
buffer, as training copies it to the GPU (a batch from a worker process arrives in shared
memory, and its pages are only mapped when touched). The readers take turns, round after
round, and the table gives each one's median, so they share whatever else loads the machine;
the npy shards are also read with canonical streams in the same rounds: ``data.streams`` as a
new run chooses it (``--streams auto``, the default), or ``--streams S``.
Prints a markdown table with the ratios to ImageFolder and of streams to the default order.
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

    from ...data import demo_images
    from ...data.manifest import Manifest
    from ...data.tar import write_shards

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


def _rate(make, n_batches: int, batch_size: int, seconds: float = 0.0) -> float:
    """Images/s of the reader ``make()`` builds, over ``n_batches`` after its first (more, whole
    multiples of ``n_batches``, until ``seconds`` have passed)."""
    import itertools

    import torch

    reader = make()
    if isinstance(reader, torch.utils.data.DataLoader):  # one epoch per iter(): chain them (persistent workers)
        it = itertools.chain.from_iterable(reader for _ in itertools.count())
    else:
        it = iter(reader)
    threads = torch.get_num_threads()
    # One thread reads the batches here: with the workers busy on every core, a copy split over torch's
    # intra-op threads waits for a descheduled one (measured: 8 ms instead of 0.01 ms per 32 px batch).
    torch.set_num_threads(1)
    try:
        first = next(it)  # start-up (worker processes, first reads) is not timed
        sink = torch.empty_like(first[0] if isinstance(first, (tuple, list)) else first)
        # Let it go, as training does with every batch: a batch kept holds its slot of the shard loader's
        # ring, and every batch due in that slot would come the slower way (its own shared memory, parts joined).
        del first
        t0, done = time.perf_counter(), 0
        while done == 0 or time.perf_counter() - t0 < seconds:
            for _ in range(n_batches):
                x = next(it)
                x = x[0] if isinstance(x, (tuple, list)) else x
                assert x.shape[0] == batch_size
                # Read it once, as training does (a copy to the GPU): a batch from a worker can arrive in shared
                # memory whose pages are mapped only when touched. A copy, not a reduction: torch's uint8 sum
                # runs at ~0.3-0.5 GB/s and would time itself (40 ms per 256 px batch), not the loader.
                sink.copy_(x)
            done += n_batches
        return done * batch_size / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        if hasattr(reader, "close"):
            reader.close()
        del it


def measure(size: int, n: int, workers: int, batch_size: int, tmp: Path, streams: int | None = None, passes: int = 2,
            repeats: int = 3, seconds: float = 2.0) -> dict[str, float]:
    """Median images/s of each reader over ``repeats`` rounds; in a round each reader reads ``passes``
    passes over the images in turn, so the readers share whatever else loads the machine.
    ``streams``: the canonical streams of the "npy_streams" reader (None: a new run's choice,
    :func:`flowscale.data.order.choose_streams`; 0: no such reader); "streams" gives the value."""
    import statistics

    import torch
    import torchvision

    from ...config import DataConfig
    from ...data import build_train_loader

    paths = _write_inputs(tmp, size, n)

    def folder():
        ds = torchvision.datasets.ImageFolder(str(paths["folder"]), transform=torchvision.transforms.PILToTensor())
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                           drop_last=True, persistent_workers=workers > 0)

    def shards(enc: str, s: int):
        cfg = DataConfig(dataset="shards", train_manifest=str(paths[enc] / "train"),
                         test_manifest=str(paths[enc] / "train"), image_size=size, batch_size=batch_size,
                         num_workers=workers, shuffle_buffer=1000, streams=s)
        return lambda: build_train_loader(cfg)

    readers = {"folder": folder, "png": shards("png", 0), "npy": shards("npy", 0)}
    if streams != 0:
        readers["npy_streams"] = shards("npy", streams)
        probe = readers["npy_streams"]()
        streams = probe.S
        probe.close()
    rates: dict[str, list[float]] = {k: [] for k in readers}
    for _ in range(repeats):
        for k, make in readers.items():
            rates[k].append(_rate(make, passes * (n // batch_size), batch_size, seconds))
    return {**{k: statistics.median(v) for k, v in rates.items()}, "streams": streams}


def run(ns) -> int:
    from ...data.codec import default_encoding

    rows = []
    with tempfile.TemporaryDirectory(dir=ns.dir) as d:
        for size in ns.sizes:
            n = ns.images if size <= 64 else max(ns.batch_size * 4, ns.images // 4)
            r = measure(size, n, ns.workers, ns.batch_size, Path(d), ns.streams, ns.passes, ns.repeats, ns.seconds)
            rows.append((size, n, r))
            print(f"{size}px done", flush=True)
    print(f"\nloader throughput, images/s ({ns.workers} worker(s), batch {ns.batch_size}, whole multiples of {ns.passes} "
          f"passes for at least {ns.seconds:g} s after the first batch, median of {ns.repeats} alternating rounds; {os.cpu_count()} CPU cores, "
          f"{platform.processor() or platform.machine()}):\n")
    head = ("| size | images | ImageFolder+PIL | shards PNG | shards npy | PNG / ImageFolder | npy / ImageFolder | "
            "prep's default (auto) / ImageFolder |")
    if ns.streams != 0:
        head += " npy, canonical streams | data.streams | streams / default (npy) |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for size, n, r in rows:
        enc = default_encoding(size)
        line = (f"| {size}x{size} | {n} | {r['folder']:.0f} | {r['png']:.0f} | {r['npy']:.0f} | "
                f"{r['png'] / r['folder']:.2f}x | {r['npy'] / r['folder']:.2f}x | {enc}: {r[enc] / r['folder']:.2f}x |")
        if ns.streams != 0:
            chosen = f"{r['streams']} (auto)" if ns.streams is None else str(r["streams"])
            line += f" {r['npy_streams']:.0f} | {chosen} | {r['npy_streams'] / r['npy']:.2f}x |"
        print(line)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("loader", help="shard loader vs torchvision ImageFolder images/s (32/64/256 px)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 256], help="image sizes (default: 32 64 256)")
    p.add_argument("--images", type=int, default=4096, help="images per size (a quarter of it above 64px; default 4096)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for every reader (default: 2)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--streams", type=lambda s: None if s == "auto" else int(s), default=None,
                   help="also time npy shards with data.streams=S, alternating with the default order (0: skip; "
                        "default auto: the streams a new run chooses, data.streams=null)")
    p.add_argument("--passes", type=int, default=2, help="passes over the images timed per reader and round (default 2)")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="time each reader for at least this long, in whole multiples of --passes (default 2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds, each timing every reader in turn; the table gives medians (default 3)")
    p.add_argument("--dir", default=None, help="where to write the temporary inputs (default: the system temp dir)")
    p.set_defaults(func=run)
