"""Existing webdataset shards -> flowscale shards + manifest (``flowscale prep webdataset``).

A source is any set of webdataset tars: local paths, a folder of them, brace patterns, http(s)
URLs or ``pipe:`` commands, several joined by '::' (expanded as data.train_shards is). Each
sample is the group of members sharing a key; its image is the first of .jpg, .jpeg, .png,
.webp, .npy it has (decoded by content through :func:`.images.load_file`, conversions noted),
its label the integer in ``.cls`` or a field of ``.json`` (``--label-field``); everything else
(img2dataset's .txt captions and .json metadata, HF's .json) is left out. The img2dataset layout
(``000000000.jpg`` + ``.txt`` + ``.json``, ``*_stats.json`` beside the tars) and the HF/timm
ImageNet layout (``.jpg`` + ``.cls`` + ``.json``, ``_info.json``) are both such sets.

Design: **one output shard per source shard**, converted by one worker process that streams the
source shard once, front to back. A remote shard is therefore read exactly once and never needs
random access (there is no planning pass over the data, unlike the other sources, whose items
are known before any pixel is converted); the shards convert in parallel, in order of the
source list, and keep the source's sample order (webdataset shards are written shuffled or in
the order their author chose; nothing is reshuffled). Output shard k is
``PREFIX-SPLIT-{k:06d}.tar`` for source shard k, so ``--shard-size`` does not apply: the
samples per shard are the source's. As in :mod:`.convert`, a shard is written through a
temporary file plus a ``.<shard>.json`` record, a re-run skips shards already recorded (an
interrupted conversion resumes), options are fingerprinted in ``.plan.json``, and the manifest
is written last. A source shard whose every sample is bad under ``--bad-input skip`` gives no
output shard (the manifest lists the others; its samples are counted as skipped).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from flowscale.data.codec import encode_sample
from flowscale.data.manifest import Manifest, ShardEntry, shard_name, write_manifest
from flowscale.data.splits import compact_urls
from flowscale.data.tar import SampleReader, TarWriter, is_local, open_shard

from .convert import choose_encoding
from .images import load_file
from .sources import load_item, sanitize

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "npy")
"""Member extensions read as the image, in this order of preference."""
PEEK = 64
"""Samples of the first shard read to find the resolution, whether there are .cls labels, and (with
``--channels auto``) whether the images are grayscale: 1 channel when all those that decode are."""


@dataclass(frozen=True)
class Options:
    resolution: int
    resize: str
    """none (every image must be resolution px square) | center-crop+box"""
    channels: int
    """1 or 3: images of the other kind are converted (L->RGB, RGB->L), counted in the manifest"""
    encoding: str
    labels: str
    """'' (none) | 'cls' | 'json' (the field label_field of the .json member)"""
    label_field: str
    num_classes: int | None
    bad_input: str


def source_urls(src: str) -> list[str]:
    """The shard URLs of ``src``: a folder (its .tar files, which must share one naming pattern),
    or what data.train_shards accepts (paths, brace patterns, URLs, pipe:, joined by '::')."""
    from webdataset.shardlists import expand_urls

    if is_local(src) and Path(src).is_dir():
        tars = sorted(p for p in Path(src).iterdir() if p.suffix == ".tar" and p.is_file() and p.name[0] != ".")
        if not tars:
            raise FileNotFoundError(f"{src}: no .tar shards in this folder")
        groups: dict[str, list[str]] = {}
        for p in tars:  # HF/timm put every split in one folder: imagenet1k-train-0000.tar, imagenet1k-validation-00.tar
            groups.setdefault("".join(c if not c.isdigit() else "#" for c in p.name), []).append(str(p))
        if len(groups) > 1:
            pats = [compact_urls(g) for g in groups.values()]
            raise ValueError(f"{src} holds shards named {len(groups)} ways, likely several splits; convert one at a "
                             f"time with SRC one of: " + ", ".join(repr(p) for p in pats[:4]))
        return [str(p) for p in tars]
    urls = expand_urls(src)
    for u in urls:
        if is_local(u) and not Path(u[7:] if u.startswith("file:") else u).is_file():
            raise FileNotFoundError(f"{u} does not exist")
    return urls


def layout_of(urls: list[str]) -> str:
    """What the files beside local shards say about who wrote them (for the manifest)."""
    if not is_local(urls[0]):
        return "remote shards"
    folder = Path(urls[0]).parent
    if (folder / "_info.json").is_file():
        return "HF/timm (_info.json)"
    if any(folder.glob("*_stats.json")):
        return "img2dataset (*_stats.json)"
    return "webdataset"


def _class_index(value, what: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} is {value!r}, not a class index (an integer >= 0)")
    return value


def sample_label(members: dict[str, bytes], opts: Options) -> int | None:
    """The sample's class index per ``opts.labels``, or ValueError saying what is wrong."""
    if not opts.labels:
        return None
    if opts.labels == "cls":
        if "cls" not in members:
            raise ValueError("no .cls label member (the first sample has one, so every sample needs one)")
        label = _class_index(members["cls"].decode("ascii", "replace"), ".cls label")
    else:
        if "json" not in members:
            raise ValueError(f"no .json member to read the label field {opts.label_field!r} from")
        try:
            value = json.loads(members["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f".json member is not JSON ({e})") from None
        for part in opts.label_field.split("."):  # 'a.b' reads {"a": {"b": ...}}
            if not isinstance(value, dict) or part not in value:
                raise ValueError(f".json member has no field {opts.label_field!r}")
            value = value[part]
        label = _class_index(value, f".json field {opts.label_field!r}")
    if opts.num_classes and label >= opts.num_classes:
        raise ValueError(f"label {label} is not below --num-classes {opts.num_classes}")
    return label


def image_member(key: str, members: dict[str, bytes]) -> tuple[str, bytes]:
    """(member name, bytes) of the sample's image, or ValueError listing what it has."""
    for ext in IMAGE_MEMBERS:
        if ext in members:
            return f"{key}.{ext}", members[ext]
    got = ", ".join("." + e for e in members) or "no members"
    raise ValueError(f"no image member ({', '.join('.' + e for e in IMAGE_MEMBERS)}); found {got}")


def output_key(key: str) -> str:
    """A flowscale sample key ([A-Za-z0-9_-], at most 90 characters) for a source key."""
    out = sanitize(key)
    return out if len(out) <= 90 else out[:60] + "_" + hashlib.sha1(key.encode()).hexdigest()[:16]


def _lower(members: dict[str, bytes]) -> dict[str, bytes]:
    return {ext.lower(): data for ext, data in members.items()}


def convert_shard(task: tuple[str, str, Options]) -> dict:
    """Worker: stream source shard ``url`` once and write its good samples to ``path``. Returns the
    shard's record: the manifest entry fields plus notes, skipped inputs, the largest label, the
    members left out, and ``error`` (the first bad input under --bad-input error, else None)."""
    url, path, opts = task
    rec = {"name": Path(path).name, "count": 0, "bytes": 0, "sha256": "", "first_key": "", "last_key": "",
           "notes": Counter(), "skipped": [], "max_label": -1, "unused": Counter(), "error": None}

    def bad(what: str) -> bool:
        """Record bad input; True when the shard must stop (--bad-input error)."""
        if opts.bad_input == "error":
            rec["error"] = what
            return True
        rec["skipped"].append(what)
        return False

    try:
        f, seekable = open_shard(url)
    except OSError as e:
        bad(f"{url}: cannot open ({type(e).__name__}: {e}) (the whole shard)")
        return _done(rec)
    writer, n = TarWriter(path), 0
    try:
        reader = None
        while True:
            try:
                reader = reader or SampleReader(f, seekable)
                got = reader.next(want=True)
            except (EOFError, ValueError, OSError) as e:  # OSError: a pipe: command or a download that failed
                bad(f"{url}: not a readable tar after {n} samples ({e}) (the rest of the shard)")
                break
            if got is None:
                break
            n += 1
            key, members = got[0], _lower(got[1])
            try:
                name, data = image_member(key, members)
                label = sample_label(members, opts)
                x, notes, _ = load_item((key, "bytes", (name, data), label), opts.resolution, opts.resize,
                                        opts.channels)
            except Exception as e:  # undecodable or missing image, bad label: per --bad-input, with its name
                if bad(f"{url}, sample {key!r}: {_reason(e)}"):
                    break
                continue
            out = output_key(key)
            for member, payload in encode_sample(out, x, opts.encoding, label):
                writer.add(member, payload)
            rec["notes"].update(notes)
            rec["unused"].update(e for e in members if e != name.rsplit(".", 1)[1] and e != opts.labels)
            rec["count"] += 1
            rec["first_key"] = rec["first_key"] or out
            rec["last_key"] = out
            rec["max_label"] = max(rec["max_label"], -1 if label is None else label)
    except BaseException:
        writer.abort()
        raise
    finally:
        try:
            f.close()
        except OSError:  # a pipe's exit status: what it gave has been checked sample by sample
            pass
    if rec["error"] is not None or not rec["count"]:
        writer.abort()
    else:
        rec["bytes"], rec["sha256"] = writer.close()
    return _done(rec)


def _reason(e: Exception) -> str:
    """Why a sample failed, in words that do not depend on the run (PIL names a BytesIO by its address)."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image in a format PIL reads (UnidentifiedImageError)"
    return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"


def _done(rec: dict) -> dict:
    rec["notes"], rec["unused"] = dict(sorted(rec["notes"].items())), dict(sorted(rec["unused"].items()))
    return rec


def peek(url: str) -> tuple[str, dict[str, bytes], np.ndarray, int, int]:
    """What the options left to the data follow from, read from the first PEEK samples of ``url``:
    (key, members, uint8 [H, W, C] pixels) of the first whose image decodes, 1 if every image that
    decodes there is grayscale else 3, and how many decoded."""
    f, seekable = open_shard(url)
    first, gray, n, why = None, True, 0, "it holds no samples"
    try:
        reader = SampleReader(f, seekable)
        for _ in range(PEEK):
            got = reader.next(want=True)
            if got is None:
                break
            key, members = got[0], _lower(got[1])
            try:
                x = load_file(f"{url}#{key}", None, image_member(key, members)[1])[0]
            except Exception as e:  # the next sample may do; the conversion handles this one per --bad-input
                why = f"sample {key!r}: {_reason(e)}"
                continue
            first, gray, n = first or (key, members, x), gray and x.shape[2] == 1, n + 1
    except (EOFError, ValueError, OSError) as e:
        if first is None:
            raise ValueError(f"{url}: not a readable tar ({e})") from None
    finally:
        try:
            f.close()
        except OSError:
            pass
    if first is None:
        raise ValueError(f"{url}: no decodable image in its first samples, so no size or labels to go by ({why})")
    return *first, 1 if gray else 3, n


def convert_webdataset(src: str, out: str | Path, split: str = "train", prefix: str = "wds",
                       resolution: int | None = None, encoding: str = "auto", label_field: str | None = None,
                       no_labels: bool = False, num_classes: int | None = None, variant: str | None = None,
                       workers: int | None = None, bad_input: str = "error", progress: bool = True,
                       channels: int | None = None) -> tuple[Path, Manifest]:
    """Convert the webdataset shards ``src`` into ``out/split/``; returns (manifest path, manifest).

    ``resolution``: center-crop and box-resize every image to it (default: every image must be
    square, of the first image's size). Labels: ``label_field`` names a .json field (dots for
    nesting); otherwise .cls when the first sample has one (``no_labels``: none). ``num_classes``:
    the label range [0, num_classes) (default: the largest label + 1). ``channels``: 1 or 3, None =
    1 when the images among the first shard's first PEEK samples are all grayscale."""
    from tqdm import tqdm

    urls = source_urls(src)
    key, members, first, native, probed = peek(urls[0])
    channels_rule = "--channels" if channels else (f"auto: {native}, the first {probed} images of {urls[0]} being "
                                                   f"{'all grayscale' if native == 1 else 'not all grayscale'}")
    channels = channels or native
    labels = "" if no_labels else "json" if label_field else "cls" if "cls" in members else ""
    if resolution is None:
        if first.shape[0] != first.shape[1]:
            raise ValueError(f"{urls[0]}, sample {key!r}: the first image is {first.shape[1]}x{first.shape[0]}; give "
                             f"--resolution to center-crop and resize every image to one square size")
        resolution, resize = first.shape[0], "none"
    else:
        resize = "center-crop+box"
    opts = Options(resolution, resize, channels, choose_encoding(encoding, resolution), labels,
                   label_field or "", num_classes, bad_input)

    split_dir = Path(out) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    names = [shard_name(prefix, split, k) for k in range(len(urls))]
    fp = hashlib.sha256(json.dumps([prefix, split, urls, asdict(opts)]).encode()).hexdigest()
    plan_file = split_dir / ".plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()).get("fingerprint") != fp:
        raise FileExistsError(f"{split_dir} holds shards from a different conversion (other inputs or options); "
                              f"use a new output directory or delete {split_dir}")
    plan_file.write_text(json.dumps({"fingerprint": fp, "source_shards": len(urls)}) + "\n")

    def record(k: int) -> Path:
        return split_dir / f".{names[k]}.json"

    def complete(k: int) -> bool:
        if not record(k).is_file():
            return False
        r, shard = json.loads(record(k).read_text()), split_dir / names[k]
        return r["count"] == 0 or (shard.is_file() and shard.stat().st_size == r["bytes"])

    todo = [k for k in range(len(urls)) if not complete(k)]
    tasks = [(urls[k], str(split_dir / names[k]), opts) for k in todo]
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    bar = tqdm(total=len(urls), initial=len(urls) - len(todo), unit="shard", desc=f"{prefix}-{split}",
               disable=not progress, dynamic_ncols=True)
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for k, rec in zip(todo, pool.imap(convert_shard, tasks) if pool else map(convert_shard, tasks)):
            bar.update(1)
            if rec["error"] is not None:
                raise ValueError(f"cannot convert {rec['error']} (use --bad-input skip to leave such inputs out, "
                                 f"counted in the manifest)")
            for what in rec["skipped"]:
                print(f"data_prep: skipped {what}", file=sys.stderr, flush=True)
            record(k).write_text(json.dumps(rec, sort_keys=True) + "\n")
    finally:
        bar.close()
        if pool is not None:  # after an error, shards still in flight are abandoned (their temporary files removed)
            pool.terminate()
            pool.join()
            for tmp in split_dir.glob(".*.tar.tmp-*"):
                tmp.unlink(missing_ok=True)

    entries, notes, skipped, unused, max_label = [], Counter(), [], Counter(), -1
    for k in range(len(urls)):
        rec = json.loads(record(k).read_text())
        notes.update(rec["notes"])
        unused.update(rec["unused"])
        skipped.extend(rec["skipped"])
        max_label = max(max_label, rec["max_label"])
        if rec["count"]:
            entries.append(ShardEntry(**{f: rec[f] for f in ("name", "count", "bytes", "sha256", "first_key",
                                                             "last_key")}))
    if not entries:
        raise ValueError(f"every sample of {src} was bad input; nothing to write")
    folder = Path(urls[0]).parent.name if is_local(urls[0]) else urls[0].rsplit("/", 2)[-2] if "/" in urls[0] else src
    source = {"form": "webdataset shards", "layout": layout_of(urls), "path": src, "source_shards": len(urls),
              "order": "as in the source shards, one output shard per source shard",
              "labels": {"cls": ".cls", "json": f".json field {label_field!r}"}.get(labels, "none"),
              "members_left_out": dict(sorted(unused.items())), "resize": resize, "channels": channels_rule,
              "conversions": dict(sorted(notes.items())), "skipped_inputs": len(skipped)}
    if skipped:
        source["skipped_examples"] = skipped[:20]
    n_classes = (num_classes or max_label + 1) if labels else 0
    m = Manifest(dataset="webdataset", variant=variant or f"{sanitize(folder)}-{resolution}px", split=split,
                 resolution=resolution, channels=channels, encoding=opts.encoding,
                 num_samples=sum(e.count for e in entries), labels=bool(labels), num_classes=n_classes, split_rule=f"all of {src}", source=source, shards=entries)
    return write_manifest(m, split_dir), m
