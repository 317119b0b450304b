"""Dataset forms -> per-split lists of items, and the function that turns one item into pixels.

An item is a small picklable tuple ``(key, kind, where, label)``, or ``(key, kind, where, label,
attributes)`` with a '0'/'1' attribute string (:mod:`.attributes`); :func:`load_item` runs in the
converter's worker processes and returns uint8 [H, W, C] pixels at the target resolution, C being
the split's channels (1 grayscale, 3 RGB).
Each ``plan_*`` function returns ``{split: SplitPlan}``: the items in their shard order plus
what the manifest records about the split (variant, split rule, labels, source form).
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import re
import sys
from pathlib import Path

import numpy as np

from .attributes import CELEBA_ATTRIBUTES, bits_from_ints, celebahq_attributes, lookup_file, read_csv_attributes
from .images import IMAGE_SUFFIXES, center_square, file_channels, load_file, match_channels, pad_square, resize_box
from . import classic
from .plans import SplitPlan, sanitize, shuffled  # noqa: F401 - re-exported for the converters
from .tfrecord import parse_example, read_record, record_offsets

OORD_COUNTS = {"train": 1_281_149, "valid": 49_999}
CELEBAHQ_TOTAL, CELEBAHQ_TRAIN = 30_000, 27_000
VARIANT_NOTE = ("bits/dim are comparable only within one variant: oord2016 (van den Oord PNG folders, reported by "
                "Glow, Flow++, DLF) and chrabaszcz2017 (image-net.org batches) are different downsamplings")


def _files(root: Path, recursive: bool = True) -> list[Path]:
    it = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in it if p.is_file() and not p.name.startswith("."))


def _image_files(root: Path, recursive: bool = True) -> list[Path]:
    return [p for p in _files(root, recursive) if p.suffix.lower() in IMAGE_SUFFIXES]


# -- loading one item (worker side) ---------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _batch_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(data [N, 3*r*r] uint8, labels [N] 1-based) of an image-net.org downsampled batch."""
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z["data"]), np.asarray(z["labels"])
    with open(path, "rb") as f:  # the official Python-pickle format of these batches
        d = pickle.load(f)
    return np.asarray(d["data"]), np.asarray(d["labels"])


def load_item(item: tuple, resolution: int, resize: str,
              channels: int = 3) -> tuple[np.ndarray, list[str], str | None]:
    """(uint8 [H, W, channels] pixels, conversion notes, '0'/'1' attributes or None) of one item."""
    key, kind, where, label = item[:4]
    attributes = item[4] if len(item) > 4 else None
    notes: list[str] = []
    if kind == "file":
        x, notes = load_file(where, channels)
    elif kind == "bytes":  # an image held in memory, e.g. a tar member: where = (name, data)
        x, notes = load_file(where[0], channels, where[1])
    elif kind == "tfr":
        path, offset, length = where
        ex = parse_example(read_record(path, offset, length))
        shape = ex.get("shape")
        data = ex.get("data")
        if not shape or not data:
            raise ValueError(f"{path} record at {offset}: no 'shape'/'data' features (not a Glow image tfrecord)")
        x = np.frombuffer(data[0], dtype=np.uint8).reshape([int(v) for v in shape])
        if ex.get("attr"):
            attributes = bits_from_ints(ex["attr"], f"{path} record at {offset}, feature 'attr'")
        if x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"{path} record at {offset}: shape {x.shape} is not [H, W, 3]")
    elif kind == "batch":
        path, index = where
        data, _ = _batch_file(path)
        r = int(round((data.shape[1] // 3) ** 0.5))
        x = data[index].reshape(3, r, r).transpose(1, 2, 0)  # channel-planar rows
    elif kind in ("idx", "cifar"):
        x = classic.load(kind, where)
    else:
        raise ValueError(f"unknown item kind {kind!r}")
    x, more = match_channels(x, channels)
    notes += more
    if resize == "pad":
        return pad_square(x, resolution), notes, attributes
    if resize == "center-crop+box":
        x = center_square(x)
    elif x.shape[0] != x.shape[1]:
        raise ValueError(f"{key}: image is {x.shape[1]}x{x.shape[0]}, not square")
    if resize == "none" and x.shape[0] != resolution:
        raise ValueError(f"{key}: image is {x.shape[0]}px but the split is {resolution}px")
    return np.ascontiguousarray(resize_box(x, resolution)), notes, attributes


# -- CelebA-HQ -------------------------------------------------------------------------------

def plan_celebahq(src: Path, resolution: int | None, train_count: int | None, attr_file: Path | None = None,
                  image_list: Path | None = None) -> dict[str, SplitPlan]:
    """Splits of a CelebA-HQ folder or Glow's tfrecords; attributes from ``attr_file``
    (list_attr_celeba.txt format, mapped through ``image_list``) or the tfrecords' ``attr``."""
    tfr = sorted(p for p in src.rglob("*.tfrecords"))
    if tfr:
        if attr_file is not None or image_list is not None:
            raise ValueError(f"{src} holds Glow tfrecords, which carry their own 'attr' feature; --attributes and "
                             f"--image-list are for the image-folder form")
        return _plan_celebahq_tfr(tfr, src, resolution)
    if image_list is not None and attr_file is None:
        raise ValueError("--image-list maps CelebA-HQ images to rows of --attributes; give --attributes too")
    files = _image_files(src)
    if not files:
        raise FileNotFoundError(f"{src}: no png/jpg/npy images or .tfrecords found")
    indexed = {}
    for p in files:
        m = re.search(r"(\d+)$", p.stem)
        if not m:
            raise ValueError(f"{p}: CelebA-HQ files must be index-named (e.g. 00042.png, imgHQ00042.npy)")
        i = int(m.group(1))
        if i in indexed:
            raise ValueError(f"two files with index {i}: {indexed[i]} and {p}")
        indexed[i] = p
    order = sorted(indexed)
    n = len(order)
    if train_count is None:
        if n != CELEBAHQ_TOTAL:
            raise ValueError(f"{src} holds {n} images, not CelebA-HQ's {CELEBAHQ_TOTAL}; pass --train-count to say "
                             f"how many (in index order) are train")
        train_count = CELEBAHQ_TRAIN
    if not 0 < train_count < n:
        raise ValueError(f"--train-count {train_count} must be in 1..{n - 1}")
    res = resolution or load_file(str(indexed[order[0]]))[0].shape[0]
    names, attrs = celebahq_attributes(attr_file, image_list, order) if attr_file is not None else ([], {})
    plans = {}
    for split, idx in (("train", order[:train_count]), ("test", order[train_count:])):
        items = [(f"celebahq{i:05d}", "file", str(indexed[i]), None) + ((attrs[i],) if names else ()) for i in idx]
        rule = (f"first {train_count} images in index order = train, the remaining {n - train_count} = test "
                f"(the flow papers' 27000/3000 split)" if n == CELEBAHQ_TOTAL else
                f"first {train_count} of {n} images in index order = train, rest = test")
        source = {"form": "image folder (png/jpg/npy)", "path": str(src), "order": "index"}
        if names:
            source["attributes"] = f"{attr_file}" + (f" through {image_list}" if image_list else " by index")
        plans[split] = SplitPlan(items, "celebahq", "celebahq", res, "box", rule, source=source, attributes=names)
    return plans


def _plan_celebahq_tfr(files: list[Path], src: Path, resolution: int | None) -> dict[str, SplitPlan]:
    lods = {}
    for p in files:
        m = re.search(r"-r(\d\d)-", p.name)
        lods.setdefault(int(m.group(1)) if m else -1, []).append(p)
    if resolution and (resolution.bit_length() - 1) in lods and 2 ** (resolution.bit_length() - 1) == resolution:
        lod = resolution.bit_length() - 1
    else:
        lod = max(lods)
    plans: dict[str, list] = {"train": [], "test": []}
    for p in sorted(lods[lod]):
        parts = {q.lower() for q in p.relative_to(src).parts[:-1]} | {p.name.split("-")[0].lower()}
        split = "train" if "train" in parts else "test" if parts & {"validation", "valid", "val", "test"} else None
        if split is None:
            raise ValueError(f"{p}: cannot tell train from validation (expected train/ or validation/ in the path)")
        for k, (off, ln) in enumerate(record_offsets(p)):
            plans[split].append((sanitize(f"{p.stem}-{k:05d}"), "tfr", (str(p), off, ln), None))
    first = (plans["train"] or plans["test"])[0]
    ex = parse_example(read_record(*first[2]))
    native = int(ex["shape"][0])
    res = resolution or native
    n_attr = len(ex.get("attr") or [])  # read per record by load_item; every record must have as many
    names = list(CELEBA_ATTRIBUTES) if n_attr == len(CELEBA_ATTRIBUTES) else [f"attr{k}" for k in range(n_attr)]
    out = {}
    for split, items in plans.items():
        if items:
            out[split] = SplitPlan(items, "celebahq", "celebahq", res, "box",
                                   "Glow tfrecords: train/ = train, validation/ = test",
                                   source={"form": "glow tfrecords", "path": str(src), "lod": lod,
                                           "native_resolution": native}, attributes=names)
    return out


# -- ImageNet --------------------------------------------------------------------------------

def plan_imagenet_oord(src: Path, seed: int) -> dict[str, SplitPlan]:
    dirs = [d for d in sorted(src.iterdir()) if d.is_dir()] + [src]
    found = {}
    for d in dirs:
        m = re.fullmatch(r"(train|valid)_(\d+)x(\d+)", d.name)
        if m and m.group(2) == m.group(3):
            found[m.group(1)] = (d, int(m.group(2)))
    if not found:
        raise FileNotFoundError(f"{src}: no train_NxN/ or valid_NxN/ folders (van den Oord's downsampled ImageNet)")
    out = {}
    for name, (d, res) in sorted(found.items()):
        files = _image_files(d)
        if len(files) != OORD_COUNTS[name]:
            print(f"data_prep: warning: {d} holds {len(files)} images; the oord2016 {name} set has "
                  f"{OORD_COUNTS[name]}", file=sys.stderr)
        items = [(sanitize(p.stem), "file", str(p), None) for p in files]
        split = "train" if name == "train" else "test"
        if split == "train":
            items = shuffled(items, seed)
        out[split] = SplitPlan(items, "imagenet", "oord2016", res, "none",
                               f"{d.name}/ = {split}", source={"form": "van den Oord PNG folder", "path": str(d),
                                                               "order": f"shuffled, seed {seed}" if split == "train"
                                                               else "file name", "note": VARIANT_NOTE})
    return out


def plan_imagenet_batches(src: Path) -> dict[str, SplitPlan]:
    files = sorted(p for p in src.iterdir() if re.fullmatch(r"(train_data_batch_\d+|val_data)(\.npz|\.pkl)?", p.name))
    if not files:
        raise FileNotFoundError(f"{src}: no train_data_batch_N / val_data files (image-net.org downsampled batches)")
    files.sort(key=lambda p: (p.name.startswith("val"), int(re.sub(r"\D", "", p.stem) or 0)))
    out = {}
    for split, pick in (("train", lambda p: p.name.startswith("train")), ("test", lambda p: p.name.startswith("val"))):
        items, res = [], None
        for p in filter(pick, files):
            data, labels = _batch_file(str(p))
            r = int(round((data.shape[1] // 3) ** 0.5))
            if data.ndim != 2 or 3 * r * r != data.shape[1] or data.dtype != np.uint8:
                raise ValueError(f"{p}: data {data.dtype} {data.shape} is not uint8 rows of 3*r*r pixels")
            if res not in (None, r):
                raise ValueError(f"{p}: {r}px rows, other files are {res}px")
            res = r
            lab = labels.astype(np.int64) - 1  # the files use 1..1000
            if lab.min() < 0 or lab.max() > 999:
                raise ValueError(f"{p}: labels outside 1..1000")
            items.extend((sanitize(f"{p.stem}-{i:06d}"), "batch", (str(p), i), int(lab[i])) for i in range(len(data)))
        if items:
            out[split] = SplitPlan(items, "imagenet", "chrabaszcz2017", res, "none",
                                   "train_data_batch_* = train, val_data = test", labels=True,
                                   source={"form": "image-net.org pickled/npz batches", "path": str(src),
                                           "order": "file order", "labels": "original 1..1000 minus 1",
                                           "note": VARIANT_NOTE})
    return out


def _read_val_labels(path: Path) -> dict[str, str]:
    """{image stem: wnid} from LOC_val_solution.csv or a 'file wnid' text file."""
    out = {}
    for line in path.read_text().splitlines():
        parts = re.split(r"[,\s]+", line.strip())
        if len(parts) >= 2 and re.fullmatch(r"n\d{8}", parts[1]):
            out[Path(parts[0]).stem] = parts[1]
    if not out:
        raise ValueError(f"{path}: no 'image,wnid' lines (expected LOC_val_solution.csv or 'file wnid' lines)")
    return out


def plan_ilsvrc(src: Path, resolution: int, seed: int, val_labels: Path | None) -> dict[str, SplitPlan]:
    train = src / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{src}: no train/ folder (expected ILSVRC2012 train/<wnid>/*.JPEG)")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    cls = {c: i for i, c in enumerate(classes)}
    items = [(sanitize(p.stem), "file", str(p), cls[c]) for c in classes for p in _files(train / c)]
    out = {"train": SplitPlan(shuffled(items, seed), "ilsvrc2012", f"ilsvrc2012-{resolution}px-centercrop-box",
                              resolution, "center-crop+box", "train/ = train", labels=True, classes=classes,
                              source={"form": "ILSVRC2012 folder tree", "path": str(train),
                                      "order": f"shuffled, seed {seed}", "decode": "by content, converted to RGB"})}
    val = src / "val"
    if val.is_dir():
        sub = sorted(d.name for d in val.iterdir() if d.is_dir())
        if sub:
            unknown = set(sub) - set(cls)
            if unknown:
                raise ValueError(f"{val}: class folders not in train/: {sorted(unknown)[:3]}")
            vitems = [(sanitize(p.stem), "file", str(p), cls[c]) for c in sub for p in _files(val / c)]
            vitems.sort(key=lambda t: t[0])
            labeled = True
        else:
            files = _files(val, recursive=False)
            wnids = _read_val_labels(val_labels) if val_labels else None
            labeled = wnids is not None
            if wnids is None:
                print("data_prep: warning: val/ is flat and no --val-labels given: the test split has no labels",
                      file=sys.stderr)
            vitems = [(sanitize(p.stem), "file", str(p), cls[wnids[p.stem]] if labeled else None) for p in files]
        out["test"] = SplitPlan(vitems, "ilsvrc2012", out["train"].variant, resolution, "center-crop+box",
                                "val/ = test", labels=labeled, classes=classes if labeled else [],
                                source={"form": "ILSVRC2012 folder tree", "path": str(val), "order": "file name",
                                        "decode": "by content, converted to RGB"})
    return out


# -- any folder ------------------------------------------------------------------------------

FOLDER_CHANNEL_PROBE = 64
"""``prep folder --channels auto``: 1 channel when the first this-many files (in path order) are
all grayscale, else 3 (a few grayscale photos in an RGB set, as ILSVRC has, become RGB)."""


def folder_channels(files: list[Path]) -> int:
    """The channels ``--channels auto`` picks for these files (see FOLDER_CHANNEL_PROBE)."""
    return 1 if all(file_channels(str(p)) == 1 for p in files[:FOLDER_CHANNEL_PROBE]) else 3


def plan_folder(src: Path, split: str, resolution: int | None, seed: int, shuffle: bool,
                attributes_csv: Path | None = None, channels: int | None = None) -> dict[str, SplitPlan]:
    """One split of all images under ``src``; ``channels`` None = :func:`folder_channels`."""
    files = _image_files(src)
    if not files:
        raise FileNotFoundError(f"{src}: no image files")
    probed = channels is None
    channels = folder_channels(files) if probed else channels
    subdirs = sorted({p.relative_to(src).parts[0] for p in files if len(p.relative_to(src).parts) > 1})
    labeled = bool(subdirs) and all(len(p.relative_to(src).parts) > 1 for p in files)
    cls = {c: i for i, c in enumerate(subdirs)} if labeled else {}
    names, table = read_csv_attributes(attributes_csv) if attributes_csv is not None else ([], {})
    items, seen = [], set()
    for p in files:
        rel = str(p.relative_to(src).with_suffix(""))
        key = sanitize(rel)
        if len(key) > 90:
            key = key[:60] + "_" + hashlib.sha1(rel.encode()).hexdigest()[:16]
        if key in seen:
            raise ValueError(f"{p}: two files map to sample key {key!r}; rename one")
        seen.add(key)
        items.append((key, "file", str(p), cls[p.relative_to(src).parts[0]] if labeled else None)
                     + ((lookup_file(table, p.relative_to(src), attributes_csv),) if names else ()))
    if resolution is None:
        resolution = min(load_file(str(files[0]))[0].shape[:2])
        resize = "none"
    else:
        resize = "center-crop+box"
    if shuffle:
        items = shuffled(items, seed)
    source = {"form": "image folder", "path": str(src), "order": f"shuffled, seed {seed}" if shuffle else "path",
              "channels": (f"auto: {channels}, the first {min(len(files), FOLDER_CHANNEL_PROBE)} files being "
                           f"{'all grayscale' if channels == 1 else 'not all grayscale'}") if probed else "--channels"}
    if names:
        source["attributes"] = str(attributes_csv)
    return {split: SplitPlan(items, "folder", sanitize(src.name), resolution, resize, f"all of {src}",
                             labels=labeled, classes=subdirs if labeled else [], source=source, attributes=names,
                             channels=channels)}
