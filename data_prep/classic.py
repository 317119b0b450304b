"""The classic small-image benchmarks in their official download formats.

- MNIST and Fashion-MNIST: IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped
  or raw (told apart by content). An IDX file is two zero bytes, a type code (0x08 = uint8), the
  number of dimensions, each dimension as a big-endian uint32, then the values: images have magic
  0x00000803 and dims [N, 28, 28], labels 0x00000801 and [N]. 28x28 grayscale, one channel.
- CIFAR-10 / CIFAR-100: the "python version" pickled batches (``data_batch_1..5`` + ``test_batch``
  with ``labels``; ``train`` + ``test`` with ``fine_labels``), from the extracted folder or the
  .tar.gz itself: dicts whose ``data`` is uint8 [N, 3072], each row the 32x32 red plane, then
  green, then blue. They are pickles: read with an unpickler that builds numpy arrays and
  nothing else, so a file that is not a CIFAR batch cannot run code.

Items (see :mod:`.sources`) are ``(key, "idx", (images_file, row), label)`` and
``(key, "cifar", (file, tar_member, row), label)``; the arrays are read once per process and
cached (the converter's workers fork after the plan has read them, so they share them).

Resolution: flow papers report MNIST bits/dim on the 28x28 images with D = 784 (RealNVP, Glow
and FFJORD as FFJORD's Table 2 lists them; Residual Flows). 28 = 4 x 7 allows model.levels up to 2;
``--pad-to 32`` zero-pads for deeper multi-scale models, but then D counts 1024 dimensions of
which 240 are always zero, and the bits/dim are not comparable with the published 28x28 figures
(the manifest's variant says ``-pad32`` so that no comparison mixes them).
"""

from __future__ import annotations

import functools
import gzip
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np

from .plans import SplitPlan, shuffled

KINDS = ("idx", "cifar")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
IDX_SPLITS = {"train": "train", "t10k": "test"}
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801


# -- IDX (MNIST family) ------------------------------------------------------------------------

def _file_bytes(path: str | Path) -> bytes:
    """The file's content, gunzipped when it is gzip (by its magic bytes, not its name)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: damaged gzip file ({e}); download it again") from None
    return raw


def parse_idx(data: bytes, where: str) -> np.ndarray:
    """IDX bytes of unsigned bytes -> uint8 array of the dims in its header."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{where}: not an IDX file of unsigned bytes (magic {data[:4].hex()}, expected 0000080N)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    start, count = 4 + 4 * ndim, int(np.prod(dims))
    if len(data) - start != count:
        raise ValueError(f"{where}: {len(data) - start} bytes of values, the header's dims {dims} need {count} "
                         f"(truncated download?)")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


@functools.lru_cache(maxsize=4)
def idx_array(path: str) -> np.ndarray:
    """The array in an IDX file (cached: items read rows of it)."""
    return parse_idx(_file_bytes(path), path)


def _idx_files(src: Path) -> dict[tuple[str, str], Path]:
    """{(train|t10k, images|labels): file} under ``src``; the raw file when both it and its .gz exist."""
    pat = re.compile(r"(train|t10k)-(images|labels)[-.]idx([13])-ubyte(\.gz)?")
    found: dict[tuple[str, str], list[Path]] = {}
    for p in sorted(src.rglob("*") if src.is_dir() else [src]):
        m = pat.fullmatch(p.name)
        if m and p.is_file():
            found.setdefault((m.group(1), m.group(2)), []).append(p)
    out = {}
    for k, paths in found.items():
        raw = [p for p in paths if p.suffix != ".gz"]
        by_dir = {p.parent for p in paths}
        if len(by_dir) > 1:
            raise ValueError(f"{src}: {k[0]} {k[1]} found in several folders ({', '.join(map(str, paths))}); "
                             f"give the folder of one")
        out[k] = (raw or paths)[0]
    return out


def plan_idx(src: Path, dataset: str, seed: int = 0, pad_to: int | None = None,
             limit: int | None = None) -> dict[str, SplitPlan]:
    """MNIST / Fashion-MNIST (any IDX dataset of square uint8 images with labels): train from
    train-*, test from t10k-*; train shuffled with ``seed``, test in the official order.
    ``pad_to``: zero-pad to this size (see the module docstring); ``limit``: the first N images
    of each split only (a quick trial)."""
    files = _idx_files(src)
    if not files:
        raise FileNotFoundError(f"{src}: no train-images-idx3-ubyte[.gz] / t10k-images-idx3-ubyte[.gz] files "
                                f"(the official MNIST / Fashion-MNIST downloads)")
    out = {}
    for prefix, split in IDX_SPLITS.items():
        if (prefix, "images") not in files:
            continue
        img_path, lab_path = files[(prefix, "images")], files.get((prefix, "labels"))
        if lab_path is None:
            raise FileNotFoundError(f"{img_path} has no {prefix}-labels-idx1-ubyte[.gz] beside it")
        images, labels = idx_array(str(img_path)), idx_array(str(lab_path))
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"{img_path}: IDX dims {list(images.shape)}, expected [N, H, H] square images "
                             f"(magic {IDX_IMAGES:08x})")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{lab_path}: IDX dims {list(labels.shape)}, expected [{len(images)}] labels, one per "
                             f"image of {img_path.name} (magic {IDX_LABELS:08x})")
        n = len(images) if limit is None else min(limit, len(images))
        items = [(f"{split}_{i:05d}", "idx", (str(img_path), i), int(labels[i])) for i in range(n)]
        if split == "train":
            items = shuffled(items, seed)
        size = images.shape[1]
        res = pad_to or size
        if res < size:
            raise ValueError(f"--pad-to {pad_to} is smaller than the {size}px images")
        n_classes = int(labels.max()) + 1
        classes = (FASHION_MNIST_CLASSES if dataset == "fashion-mnist" and n_classes <= 10 else
                   [str(c) for c in range(n_classes)])
        variant = dataset + (f"-pad{res}" if res != size else "")
        rule = f"{img_path.name} = {split}" + (f", its first {n} of {len(images)} images (--limit)"
                                                if n < len(images) else "")
        source = {"form": "IDX files", "images": str(img_path), "labels": str(lab_path),
                  "order": f"shuffled, seed {seed}" if split == "train" else "official"}
        if res != size:
            source["pad"] = (f"zero-padded {size}->{res} ({(res - size) // 2} px each side); bits/dim count all "
                             f"{res * res} dims and are not comparable with {size}x{size} figures")
        if n < len(images):
            source["limit"] = n
        out[split] = SplitPlan(items, dataset, variant, res, "pad" if res != size else "none", rule, labels=True,
                               classes=classes, source=source, channels=1)
    if "train" not in out and "test" not in out:
        raise FileNotFoundError(f"{src}: no IDX image files")
    return out


# -- CIFAR python batches ------------------------------------------------------------------------

CIFAR_FILES = {"cifar10": {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"],
                           "meta": "batches.meta", "labels": "labels", "names": "label_names"},
               "cifar100": {"train": ["train"], "test": ["test"], "meta": "meta", "labels": "fine_labels",
                            "names": "fine_label_names"}}


class _ArraysOnly(pickle.Unpickler):
    """Builds the numpy arrays, lists, dicts and strings of a CIFAR batch, and refuses any other class."""

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "_frombuffer", "scalar"):
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):  # bytes in a protocol-2 pickle written by Python 3
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")


def _unpickle(data: bytes, where: str) -> dict:
    """A CIFAR batch (Python 2 pickles as distributed: encoding='bytes') -> dict with str keys."""
    import io

    try:
        d = _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means: not a CIFAR batch
        raise ValueError(f"{where}: not a CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{where}: not a CIFAR python batch (a pickled {type(d).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


@functools.lru_cache(maxsize=8)
def cifar_file(path: str, member: str = "") -> dict:
    """One CIFAR batch file, or the ``member`` of the .tar.gz at ``path`` (cached)."""
    if member:
        with tarfile.open(path, "r:*") as tf:
            f = tf.extractfile(member)
            if f is None:
                raise ValueError(f"{path}: {member} is not a file")
            return _unpickle(f.read(), f"{path}:{member}")
    return _unpickle(Path(path).read_bytes(), path)


def _cifar_sources(src: Path, names: set[str]) -> dict[str, tuple[str, str]]:
    """{file name: (path, tar member or '')} of the wanted CIFAR files in a folder or a tar."""
    found: dict[str, list[tuple[str, str]]] = {}
    if src.is_file():
        try:
            with tarfile.open(src, "r:*") as tf:
                for m in tf.getmembers():
                    if m.isfile() and Path(m.name).name in names:
                        found.setdefault(Path(m.name).name, []).append((str(src), m.name))
        except tarfile.TarError as e:
            raise ValueError(f"{src}: not a folder or a readable tar(.gz) ({e})") from None
    else:
        for p in sorted(src.rglob("*")):
            if p.is_file() and p.name in names:
                found.setdefault(p.name, []).append((str(p), ""))
    for name, where in found.items():
        if len(where) > 1:
            raise ValueError(f"{src}: {name} found more than once ({', '.join(w[1] or w[0] for w in where)}); "
                             f"give the folder of one copy")
    return {name: where[0] for name, where in found.items()}


def plan_cifar(src: Path, dataset: str, seed: int = 0, limit: int | None = None) -> dict[str, SplitPlan]:
    """CIFAR-10 or CIFAR-100 (``dataset``), each split's batches in order; train shuffled with
    ``seed``, test in the official order; ``limit`` as in :func:`plan_idx`. CIFAR-100 keeps the
    100 fine labels (the coarse superclasses are not stored)."""
    spec = CIFAR_FILES[dataset]
    found = _cifar_sources(src, set(spec["train"]) | set(spec["test"]) | {spec["meta"]})
    form = "python batches in " + ("a tar" if src.is_file() else "a folder")
    classes = None
    if spec["meta"] in found:
        meta = cifar_file(*found[spec["meta"]])
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(spec["names"], [])] or None
    out = {}
    for split in ("train", "test"):
        names = spec[split]
        missing = [n for n in names if n not in found]
        if len(missing) == len(names):
            continue
        if missing:
            raise FileNotFoundError(f"{src}: {dataset} {split} is {', '.join(names)}; missing {', '.join(missing)}")
        items, total, n_classes = [], 0, 0
        for name in names:
            path, member = found[name]
            where = f"{path}:{member}" if member else path
            d = cifar_file(path, member)
            data, labels = d.get("data"), d.get(spec["labels"])
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError(f"{where}: 'data' is not uint8 [N, 3072] (32x32x3 planar rows): "
                                 f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
            if labels is None or len(labels) != len(data):
                raise ValueError(f"{where}: needs {spec['labels']!r}, one per row of 'data' ({len(data)}); "
                                 f"{'missing' if labels is None else f'{len(labels)} given'} (is it {dataset}?)")
            n_classes = max(n_classes, int(max(labels)) + 1)
            for row in range(len(data)):
                if limit is None or len(items) < limit:
                    items.append((f"{split}_{total + row:05d}", "cifar", (path, member, row), int(labels[row])))
            total += len(data)
        if split == "train":
            items = shuffled(items, seed)
        cls = classes if classes and len(classes) >= n_classes else [str(c) for c in range(n_classes)]
        rule = f"{' + '.join(names)} = {split}" + (f", the first {len(items)} of {total} images (--limit)"
                                                    if len(items) < total else "")
        source = {"form": form, "path": str(src), "order": f"shuffled, seed {seed}" if split == "train" else "official"}
        if len(items) < total:
            source["limit"] = len(items)
        out[split] = SplitPlan(items, dataset, dataset, 32, "none", rule, labels=True, classes=cls, source=source,
                               channels=3)
    if not out:
        raise FileNotFoundError(f"{src}: no {dataset} python batches ({', '.join(spec['train'] + spec['test'])})")
    return out


# -- one item (worker side) --------------------------------------------------------------------

def load(kind: str, where: tuple) -> np.ndarray:
    """uint8 [H, W, C] pixels of an ``idx`` or ``cifar`` item."""
    if kind == "idx":
        path, row = where
        return idx_array(path)[row][:, :, None]
    path, member, row = where
    return cifar_file(path, member)["data"][row].reshape(3, 32, 32).transpose(1, 2, 0)
