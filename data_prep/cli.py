"""``python -m data_prep`` / ``flowscale prep``: convert a dataset into shards, or verify shards."""

from __future__ import annotations

import argparse
import textwrap
import os
import sys
from pathlib import Path

from flowscale.data.codec import RAW_UP_TO

EXAMPLES = """examples:
  flowscale prep fashion-mnist /usr/share/datasets/fashion-mnist /data/shards/fmnist  # Debian dataset-fashion-mnist
  flowscale prep mnist /data/mnist /data/shards/mnist   # train-images-idx3-ubyte.gz ... t10k-labels-idx1-ubyte.gz
  flowscale prep cifar10 /data/cifar-10-python.tar.gz /data/shards/cifar10   # or the extracted cifar-10-batches-py/
  flowscale prep cifar100 /data/cifar-100-python /data/shards/cifar100
  flowscale prep celebahq /data/celeba-hq-1024 /data/shards/celebahq256 --resolution 256
  flowscale prep celebahq /data/celeba-tfr /data/shards/celebahq256-glow --resolution 256
  flowscale prep imagenet-oord /data/imagenet64 /data/shards/in64-oord     # train_64x64/ valid_64x64/
  flowscale prep imagenet-batches /data/Imagenet64 /data/shards/in64-chra  # train_data_batch_N, val_data
  flowscale prep ilsvrc /data/ILSVRC2012 /data/shards/ilsvrc128 --resolution 128 --val-labels LOC_val_solution.csv
  flowscale prep folder /data/my_images /data/shards/mine --resolution 64 --split train
  flowscale prep webdataset '/data/laion/{00000..00127}.tar' /data/shards/laion64 --resolution 64  # img2dataset
  flowscale prep webdataset '/data/in1k-wds/imagenet1k-validation-{00..63}.tar' /data/shards/in64 --split test \
      --resolution 64 --num-classes 1000                                   # HF/timm layout, .cls labels
  flowscale prep webdataset 'pipe:curl -sL https://host/shards/{0000..0009}.tar' /data/shards/x --label-field label
  flowscale prep webdataset '/data/hf/test-{00..03}.tar' /data/shards/x --split test --label-field label \
      --classes /data/shards/x/train                     # class-name labels, indexed as the train split's
  flowscale prep verify /data/shards/celebahq256
"""


ENCODING_RULE = (f"Pixels are stored losslessly: --encoding auto (the default) writes raw .npy for images of at most "
                 f"{RAW_UP_TO} px per side and PNG for larger ones (flowscale.data.codec.RAW_UP_TO); --encoding npy "
                 f"or png forces one.")
"""What ``--encoding auto`` does, stated in ``flowscale prep --help`` and each conversion's help
(flowscale.data.codec.default_encoding decides it)."""

WEBDATASET_HELP = """Convert existing webdataset shards into flowscale shards with a manifest.

SRC: a folder of .tar shards, a .tar path, a brace pattern ('/d/{0000..0099}.tar'), http(s)
URLs or 'pipe:' commands, several joined by '::' (as data.train_shards). Quote patterns.
Each sample's image is its first .jpg/.jpeg/.png/.webp/.npy member (decoded by content;
1 or 3 channels, --channels; conversions counted in the manifest); its label the value in
.cls (used when the first sample has one) or in a .json field (--label-field). Other members
(img2dataset's .txt captions and .json metadata) are left out. Layouts:
  img2dataset   000000000.jpg + .txt + .json, 00000_stats.json beside the tars: no labels, or --label-field
  HF/timm       <key>.jpg + .cls + .json, _info.json: labels from .cls (one folder holds every split:
                give one split's shards as a pattern, with --split)

Labels are class indices (integers >= 0, or digit strings: "3" is 3) or class names ("tench"),
as the first label is; one of the other kind is bad input. Names are stored as indices into
the manifest's classes: --classes FILE (one name per line), or else all the names in the
source's labels, sorted (one extra pass reading only the label members). Convert a test split
with --classes OUT/train so that it shares the train split's indices.

Each source shard is streamed once, front to back, by one worker and becomes one output
shard, samples in the source's order; the output shards are numbered 0, 1, ... with no gap
(a source shard whose every sample is bad gives none). An interrupted conversion resumes;
--bad-input skip leaves out undecodable or missing images and bad labels, counted in the
manifest. Sample counts stated by _info.json or *_stats.json (successes) beside local shards
are checked: a difference is a warning line, not an error.
"""


def _common(p: argparse.ArgumentParser, prefix: str, reshard: bool = True) -> None:
    """The options every conversion has; ``reshard``: the shards are planned here (size, order seed)."""
    p.add_argument("src", help="the dataset as downloaded")
    p.add_argument("out", help="output root; each split goes to OUT/<split>/ with its manifest.json")
    p.add_argument("--prefix", default=prefix, help=f"shard name prefix: PREFIX-<split>-000000.tar (default: {prefix})")
    p.add_argument("--encoding", default="auto", choices=["auto", "png", "npy"],
                   help=f"lossless pixel format; auto = npy (raw, fastest to decode) for images of at most "
                        f"{RAW_UP_TO} px per side, png for larger ones (default: auto)")
    if reshard:
        p.add_argument("--shard-size", default="256MB", help="target shard size (default: 256MB)")
        p.add_argument("--samples-per-shard", type=int, default=None,
                       help="fixed samples per shard (overrides --shard-size)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help=f"encoding processes (default: all cores, {os.cpu_count()})")
    if reshard:
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the stored order of shuffled train splits (default: 0)")
    p.add_argument("--bad-input", default="error", choices=["error", "skip"],
                   help="an input that cannot be decoded: stop (error) or leave it out, counted in the manifest")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="convert only the first N images of each split (a quick trial; said in the manifest, and "
                        "test bits/dim on a part of the test split are not the published measure)")


def add_parsers(sub) -> None:
    """Register the conversion and verify sub-commands on an argparse subparsers object."""
    p = sub.add_parser("celebahq", help="CelebA-HQ: index-named png/jpg/npy folder, or Glow's tfrecords")
    _common(p, "celebahq")
    p.add_argument("--resolution", type=int, default=None,
                   help="downscale with a box filter to 512/256/128/64... (default: keep the source size)")
    p.add_argument("--train-count", type=int, default=None,
                   help="images (in index order) in train; the rest is test (default: 27000 of 30000)")
    p.add_argument("--attributes", default=None, metavar="list_attr_celeba.txt",
                   help="store CelebA's 40 binary attributes per image (as <key>.attr, names in the manifest) from "
                        "this list_attr_celeba.txt-format file; rows named by CelebA file need --image-list "
                        "(Glow's tfrecords carry their 'attr' field, stored without this option)")
    p.add_argument("--image-list", default=None, metavar="image_list.txt",
                   help="CelebA-HQ's image_list.txt: maps each CelebA-HQ index to its CelebA file (orig_file)")
    p.set_defaults(func=_run, source="celebahq")

    p = sub.add_parser("imagenet-oord", help="downsampled ImageNet 32/64, van den Oord PNG folders (variant oord2016)")
    _common(p, "imagenet")
    p.set_defaults(func=_run, source="imagenet-oord")

    p = sub.add_parser("imagenet-batches", help="downsampled ImageNet, image-net.org pickled/npz batches "
                                                "(variant chrabaszcz2017)")
    _common(p, "imagenet")
    p.set_defaults(func=_run, source="imagenet-batches")

    p = sub.add_parser("ilsvrc", help="full ILSVRC2012 train/<wnid>/ and val/ trees, center-cropped and resized")
    _common(p, "ilsvrc")
    p.add_argument("--resolution", type=int, required=True, help="target size (center square crop, box filter)")
    p.add_argument("--val-labels", default=None,
                   help="labels for a flat val/: LOC_val_solution.csv or 'file wnid' lines")
    p.set_defaults(func=_run, source="ilsvrc")

    p = sub.add_parser("folder", help="any folder of images (class subfolders become labels)")
    _common(p, "images")
    p.add_argument("--split", default="train", help="split name for these images (default: train)")
    p.add_argument("--resolution", type=int, default=None,
                   help="center-crop and box-resize to this size (default: all images must be one square size)")
    p.add_argument("--no-shuffle", action="store_true", help="keep path order (default: shuffle with --seed)")
    p.add_argument("--channels", default="auto", choices=["auto", "1", "3"],
                   help="1 = grayscale, 3 = RGB; auto = 1 when the first 64 files (path order) are all grayscale, "
                        "else 3. Images of the other kind are converted, counted in the manifest (default: auto)")
    p.add_argument("--attributes", default=None, metavar="CSV",
                   help="per-image binary attributes: a CSV with header 'file,<name>,...' (file = path relative to "
                        "SRC, file name or stem; values 1/0, 1/-1, true/false, yes/no), stored as <key>.attr")
    p.set_defaults(func=_run, source="folder")

    for name, what in (("mnist", "MNIST"), ("fashion-mnist", "Fashion-MNIST")):
        p = sub.add_parser(name, help=f"{what}: the official IDX files (train-/t10k- images and labels, .gz or raw); "
                                      f"28x28 grayscale, labels kept")
        _common(p, name)
        p.add_argument("--pad-to", type=int, default=None, metavar="PX",
                       help="zero-pad the 28px images to PX (e.g. 32, for model.levels=3+; 28 allows 2 levels). "
                            "Default: keep 28x28, the size of the published bits/dim (D = 784); padded bits/dim "
                            "count the padding and are not comparable with them (variant NAME-padPX)")
        _limit(p)
        p.set_defaults(func=_run, source=name)

    for name, what in (("cifar10", "CIFAR-10: data_batch_1..5 + test_batch"),
                       ("cifar100", "CIFAR-100: train + test, the 100 fine labels")):
        p = sub.add_parser(name, help=f"{what} (the python version: its .tar.gz or extracted folder); 32x32 RGB")
        _common(p, name)
        _limit(p)
        p.set_defaults(func=_run, source=name)

    p = sub.add_parser("webdataset", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="existing webdataset shards (img2dataset, HF/timm, any): jpg/png/webp/npy images, "
                            ".cls or .json labels",
                       description=WEBDATASET_HELP)
    _common(p, "wds", reshard=False)
    p.add_argument("--split", default="train", help="split name: output goes to OUT/<split>/ (default: train)")
    p.add_argument("--resolution", type=int, default=None,
                   help="center-crop and box-resize every image to this size (default: every image must be square, "
                        "of the first image's size; others are bad input)")
    p.add_argument("--label-field", default=None, metavar="FIELD",
                   help="labels from this field of each sample's .json (e.g. label; a.b for nested fields) instead "
                        "of .cls: class indices (integers >= 0, \"3\" included) or class names (strings)")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="class names in index order: a text file, one name per line (line 1 = class 0), or an earlier "
                        "conversion's manifest.json or split folder (e.g. OUT/train, for the test split). Name labels "
                        "are stored as their index here (a name not listed is bad input); index labels are named by "
                        "it. Default: the names in the labels, sorted (an extra pass over the label members), or "
                        "'0'..'N-1' for index labels")
    p.add_argument("--no-labels", action="store_true",
                   help="store no labels (default: .cls when the first sample has one)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="labels lie in [0, N) (a larger one is bad input); default: the largest label + 1, or the "
                        "number of class names")
    p.add_argument("--channels", default="auto", choices=["auto", "1", "3"],
                   help="1 = grayscale, 3 = RGB; auto = 1 when the decodable images among the first shard's first 64 "
                        "samples are all grayscale, else 3. Images of the other kind are converted, counted in the "
                        "manifest (default: auto)")
    p.add_argument("--variant", default=None,
                   help="dataset variant recorded in the manifest (bits/dim compare within one variant; "
                        "default: <source folder>-<resolution>px)")
    p.set_defaults(func=_run_webdataset)

    p = sub.add_parser("verify", help="re-read shards: counts, decodability, sizes, checksums against the manifest")
    p.add_argument("paths", nargs="+", help="manifest.json files, split directories or shard roots")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel shard checks")
    p.add_argument("--quick", action="store_true", help="skip the sha256 of each shard (still decodes every sample)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_verify)


def _clean_errors(fn):
    """Input problems end with one line naming the file, not a traceback (also under `flowscale prep`)."""
    def wrapped(ns) -> int:
        try:
            return fn(ns)
        except (FileNotFoundError, FileExistsError, ValueError) as e:
            print(f"data_prep: error: {e}", file=sys.stderr)
            return 1
    return wrapped


def _path(p: str | None) -> Path | None:
    """An optional input file given on the command line, which must exist."""
    if p is None:
        return None
    if not Path(p).is_file():
        raise FileNotFoundError(f"{p} does not exist")
    return Path(p)


@_clean_errors
def _run(ns) -> int:
    from . import sources
    from .convert import convert_split, parse_size

    src = Path(ns.src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if ns.source == "celebahq":
        plans = sources.plan_celebahq(src, ns.resolution, ns.train_count, _path(ns.attributes), _path(ns.image_list))
    elif ns.source == "imagenet-oord":
        plans = sources.plan_imagenet_oord(src, ns.seed)
    elif ns.source == "imagenet-batches":
        plans = sources.plan_imagenet_batches(src)
    elif ns.source == "ilsvrc":
        plans = sources.plan_ilsvrc(src, ns.resolution, ns.seed, Path(ns.val_labels) if ns.val_labels else None)
    elif ns.source in ("mnist", "fashion-mnist"):
        from .classic import plan_idx

        plans = plan_idx(src, ns.source, ns.seed, ns.pad_to, ns.limit)
    elif ns.source in ("cifar10", "cifar100"):
        from .classic import plan_cifar

        plans = plan_cifar(src, ns.source, ns.seed, ns.limit)
    else:
        plans = sources.plan_folder(src, ns.split, ns.resolution, ns.seed, not ns.no_shuffle, _path(ns.attributes),
                                    None if ns.channels == "auto" else int(ns.channels))
    if ns.source.startswith("imagenet"):
        print(f"data_prep: note: {sources.VARIANT_NOTE}", file=sys.stderr)
    for split, plan in plans.items():
        path = convert_split(plan, ns.out, ns.prefix, split, ns.encoding, parse_size(ns.shard_size),
                             ns.samples_per_shard, ns.workers, ns.bad_input, progress=not ns.no_progress)
        print(f"{split}: {len(plan.items)} inputs -> {path} (variant {plan.variant}, {plan.resolution}px, "
              f"{plan.channels} channel{'s' if plan.channels > 1 else ''}"
              + (f", {len(plan.attributes)} attributes" if plan.attributes else "") + ")")
    return 0


@_clean_errors
def _run_webdataset(ns) -> int:
    from .webdataset_source import convert_webdataset

    if ns.label_field and ns.no_labels:
        raise ValueError("--label-field and --no-labels contradict each other; give one")
    path, m = convert_webdataset(ns.src, ns.out, ns.split, ns.prefix, ns.resolution, ns.encoding, ns.label_field,
                                 ns.no_labels, ns.num_classes, ns.variant, ns.workers, ns.bad_input,
                                 progress=not ns.no_progress,
                                 channels=None if ns.channels == "auto" else int(ns.channels), classes=ns.classes)
    print(f"{ns.split}: {m.source['source_shards']} source shards -> {m.num_samples} samples in {len(m.shards)} "
          f"shards, {path} (variant {m.variant}, {m.resolution}px, {m.channels} "
          f"channel{'s' if m.channels > 1 else ''}, "
          + (f"labels from {m.source['labels']}, {m.num_classes} classes" if m.labels else "no labels")
          + (f", {m.source['skipped_inputs']} bad inputs skipped" if m.source["skipped_inputs"] else "") + ")")
    return 0


@_clean_errors
def _verify(ns) -> int:
    from .verify import verify

    problems, rows = verify(ns.paths, ns.workers, full=not ns.quick, progress=not ns.no_progress)
    print("| manifest | split | variant | px | channels | encoding | shards | samples | labels | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['manifest']} | {r['split']} | {r['variant']} | {r['resolution']} | {r['channels']} | "
              f"{r['encoding']} | {r['shards']} | {r['samples']} | {r['labels']} | {'yes' if r['ok'] else 'NO'} |")
    if len({r["variant"] for r in rows}) > 1:
        print("note: these manifests hold different variants; bits/dim are not comparable across them")
    for p in problems:
        print(f"problem: {p}")
    print(f"{len(problems)} problem(s)" if problems else "all shards match their manifests")
    return 1 if problems else 0


def add_command(sub) -> None:
    """Add ``flowscale prep`` to the ``flowscale`` command's sub-parsers (declared in pyproject's
    flowscale.commands entry points)."""
    pr = sub.add_parser("prep", help="convert a dataset into webdataset shards + manifest; verify shards",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                        description="Convert datasets into shards (parallel, resumable, deterministic) or verify them.\n"
                                    + "\n".join(textwrap.wrap(ENCODING_RULE, width=92)))
    add_parsers(pr.add_subparsers(dest="prep", required=True, metavar="DATASET"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Convert datasets into webdataset shards with a manifest; verify shards. "
                                            + ENCODING_RULE,
                                epilog=EXAMPLES)
    add_parsers(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)
