"""Existing webdataset shards -> flowscale shards + manifest (``flowscale prep webdataset``).

A source is any set of webdataset tars: local paths, a folder of them, brace patterns, http(s)
URLs or ``pipe:`` commands, several joined by '::' (expanded as data.train_shards is). Each
sample is the group of members sharing a key; its image is the first of .jpg, .jpeg, .png,
.webp, .npy it has (decoded by content through :func:`.images.load_file`, conversions noted),
its label the value in ``.cls`` or in a field of ``.json`` (``--label-field``); everything else
(img2dataset's .txt captions and .json metadata, HF's .json) is left out. The img2dataset layout
(``000000000.jpg`` + ``.txt`` + ``.json``, ``*_stats.json`` beside the tars) and the HF/timm
ImageNet layout (``.jpg`` + ``.cls`` + ``.json``, ``_info.json``) are both such sets.

Labels are of one kind per split, the kind of the first label met: class indices (integers >= 0,
or strings of digits such as "3") or class names (any other string, e.g. HF's "tench"); a label
of the other kind is bad input. Names become indices by a list fixed before any shard is
converted, so every worker and every re-run assigns the same index: ``--classes`` (a file, one
name per line, or an earlier conversion's manifest, so that a test split shares its train
split's indices), else the names found in the label members of the whole source, sorted (as
``prep folder`` sorts its class folders). Finding them is one extra pass that reads only the
label members (a local shard's images are seeked over; a remote shard is downloaded once more).
The list is the manifest's ``classes``; with index labels, ``classes`` is ``--classes`` or
"0".."N-1".

Design: **one output shard per non-empty source shard**, converted by one worker process that
streams the source shard once, front to back. A remote shard is therefore read once for the
pixels and never needs random access (no planning pass over the images, unlike the other
sources, whose items are known before any pixel is converted); the shards convert in parallel,
in order of the source list, and keep the source's sample order (webdataset shards are written
shuffled or in the order their author chose; nothing is reshuffled). ``--shard-size`` does not
apply: the samples per shard are the source's. Source shard k is converted into a staging file
``.PREFIX-SPLIT-source{k:06d}.tar`` with a ``.source-{k:06d}.json`` record; a re-run skips
shards already recorded (an interrupted conversion resumes), and options are fingerprinted in
``.plan.json``. Once every source shard is recorded, the non-empty ones are renamed, in source
order, to ``PREFIX-SPLIT-{j:06d}.tar``, j = 0, 1, ...: a source shard whose every sample is bad
(``--bad-input skip``) leaves no gap in the numbering, so one brace pattern names the output
(``data.train_shards``); the manifest lists such source shards (``empty_source_shards``) and is
written last. The sample counts that ``_info.json`` (HF/timm) or ``*_stats.json`` (img2dataset:
its successes) state for local source shards are checked against the samples converted: a
difference is one warning line with both numbers (and in the manifest), never an error.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import multiprocessing as mp
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from flowscale.data.codec import encode_sample
from flowscale.data.manifest import DataError, Manifest, ShardEntry, shard_name, write_manifest
from flowscale.data.splits import compact_urls
from flowscale.data.tar import SampleReader, TarWriter, is_local, open_shard

from .convert import choose_encoding
from .images import load_file
from .sources import load_item, sanitize

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "npy")
"""Member extensions read as the image, in this order of preference."""
PEEK = 64
"""Samples of the first shard read to find the resolution, whether there are .cls labels and of
which kind (indices or names), and (with ``--channels auto``) whether the images are grayscale:
1 channel when all those that decode are."""


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
    named: bool
    """the labels are class names, stored as their index in ``classes``"""
    classes: tuple[str, ...]
    """class names in index order: --classes, or (named, once found) the sorted names; () = none"""
    classes_from: str
    """where ``classes`` come from, for messages: '--classes <file>' or 'the labels'"""
    num_classes: int | None
    bad_input: str

    @functools.cached_property
    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


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


def raw_label(members: dict[str, bytes], opts: Options) -> tuple[int | str, str]:
    """(the sample's label as stored: an int or a string, what it is called in messages), or
    ValueError saying what is wrong."""
    if opts.labels == "cls":
        if "cls" not in members:
            raise ValueError("no .cls label member (the first sample has one, so every sample needs one)")
        return members["cls"].decode("utf-8", "replace").strip(), ".cls label"
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
    what = f".json field {opts.label_field!r}"
    if isinstance(value, str):
        return value.strip(), what
    if isinstance(value, int) and not isinstance(value, bool):
        return value, what
    raise ValueError(f"{what} is {value!r}, neither a class index (an integer >= 0) nor a class name (a string)")


def as_index(value: int | str, what: str) -> int | None:
    """A label's class index (an int, or a string of digits: "3" is 3), or None for a class name."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{what} is empty")
        if not re.fullmatch(r"[+-]?[0-9]+", value):
            return None
        value = int(value)
    if value < 0:
        raise ValueError(f"{what} is {value}, not a class index (an integer >= 0)")
    return value


def sample_label(members: dict[str, bytes], opts: Options) -> int | None:
    """The sample's class index per ``opts``, or ValueError saying what is wrong."""
    if not opts.labels:
        return None
    value, what = raw_label(members, opts)
    label = as_index(value, what)
    if opts.named:
        if label is not None:
            raise ValueError(f"{what} is {value!r}, a class index where the labels are class names (the first "
                             f"label is a name)")
        if value not in opts.class_index:
            raise ValueError(f"{what} is {value!r}, not one of the {len(opts.classes)} class names of "
                             f"{opts.classes_from}")
        return opts.class_index[value]
    if label is None:
        raise ValueError(f"{what} is {value!r}, not a class index (an integer >= 0; the first label is an index, "
                         f"so every label must be)")
    limit = len(opts.classes) or opts.num_classes
    if limit and label >= limit:
        raise ValueError(f"label {label} is not below " + (f"the {limit} names of {opts.classes_from}"
                                                           if opts.classes else f"--num-classes {limit}"))
    return label


def class_names_in(task: tuple[str, Options]) -> list[str]:
    """Worker: the class names among the labels of source shard ``url``, sorted, reading only the
    label members. A missing, unreadable or bad label is left to the conversion to report."""
    url, opts = task
    names = set()
    try:
        f, seekable = open_shard(url)
    except OSError:
        return []
    try:
        reader = SampleReader(f, seekable)
        while (got := reader.next(want=frozenset({opts.labels}))) is not None:
            try:
                value, what = raw_label(_lower(got[1]), opts)
                if as_index(value, what) is None:
                    names.add(value)
            except ValueError:
                pass
    except (EOFError, ValueError, OSError):
        pass
    finally:
        try:
            f.close()
        except OSError:
            pass
    return sorted(names)


def find_class_names(urls: list[str], opts: Options, workers: int | None, progress: bool) -> list[str]:
    """The class names among the labels of every source shard, sorted: one pass over the label
    members, shards in parallel."""
    from tqdm import tqdm

    tasks = [(u, opts) for u in urls]
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    names: set[str] = set()
    try:
        for found in tqdm(pool.imap_unordered(class_names_in, tasks) if pool else map(class_names_in, tasks),
                          total=len(urls), unit="shard", desc="class names", disable=not progress, dynamic_ncols=True):
            names.update(found)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return sorted(names)


def read_classes(path: str) -> tuple[str, ...]:
    """--classes: a text file with one class name per line (line 1 names class 0), or a flowscale
    manifest.json or split folder (its ``classes``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"--classes {path} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        m = Manifest.from_json(text, str(p))
        if not m.classes:
            raise ValueError(f"--classes {p}: this manifest lists no class names")
        return tuple(m.classes)
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    seen: dict[str, int] = {}
    for i, name in enumerate(names, 1):
        if not name:
            raise ValueError(f"--classes {p}, line {i}: empty (one class name per line, line i naming class i - 1)")
        if name in seen:
            raise ValueError(f"--classes {p}, line {i}: {name!r} is also on line {seen[name]}")
        seen[name] = i
    if not names:
        raise ValueError(f"--classes {p} is empty (one class name per line)")
    return tuple(names)


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
    """Worker: stream source shard ``url`` once and write its good samples to ``path`` (none: no
    file). Returns the shard's record: the manifest entry fields (``name`` is given when the shards
    are numbered) plus notes, skipped inputs, the largest label, the members left out, and
    ``error`` (the first bad input under --bad-input error, else None)."""
    url, path, opts = task
    rec = {"name": "", "count": 0, "bytes": 0, "sha256": "", "first_key": "", "last_key": "",
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


def peek(url: str, label_of) -> tuple[str, dict[str, bytes], np.ndarray, int, int, str | None]:
    """What the options left to the data follow from, read from the first PEEK samples of ``url``:
    (key, members, uint8 [H, W, C] pixels) of the first whose image decodes, 1 if every image that
    decodes there is grayscale else 3, how many decoded, and the first value ``label_of(members)``
    returns without ValueError among those samples (None: none did)."""
    f, seekable = open_shard(url)
    first, gray, n, why, label = None, True, 0, "it holds no samples", None
    try:
        reader = SampleReader(f, seekable)
        for _ in range(PEEK):
            got = reader.next(want=True)
            if got is None:
                break
            key, members = got[0], _lower(got[1])
            if label is None:
                try:
                    label = label_of(members)
                except ValueError:  # reported per --bad-input by the conversion
                    pass
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
    return *first, 1 if gray else 3, n, label


def stated_counts(urls: list[str]) -> tuple[str, list[int], int, dict[int, int]] | None:
    """What the files beside local source shards say the shards hold: (who says it, the indices
    of the source shards it covers, their samples, per covered shard its samples when stated
    per shard), or None. HF/timm's ``_info.json``: the split whose ``filenames`` /
    ``shard_lengths`` list these shards, else the ``num_samples`` of the split named in the shard
    names (``imagenet1k-validation-0003.tar``: validation); img2dataset's ``<shard>_stats.json``:
    its ``successes`` (failed downloads are not in the tar). Unreadable files are ignored: they
    are hints, not inputs."""
    if not all(is_local(u) for u in urls):
        return None
    paths = [Path(u[7:] if u.startswith("file:") else u) for u in urls]

    def load(p: Path) -> dict | None:
        try:
            d = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return d if isinstance(d, dict) else None

    info = load(paths[0].parent / "_info.json")
    splits = info.get("splits") if info else None
    if isinstance(splits, dict):
        lengths = {}
        for sp in splits.values():
            names, counts = (sp.get("filenames"), sp.get("shard_lengths")) if isinstance(sp, dict) else (0, 0)
            if isinstance(names, list) and isinstance(counts, list) and len(names) == len(counts):
                lengths.update((Path(str(a)).name, b) for a, b in zip(names, counts) if isinstance(b, int))
        per = {k: lengths[p.name] for k, p in enumerate(paths) if p.name in lengths}
        if per:
            return "_info.json's shard_lengths", sorted(per), sum(per.values()), per
        for name, sp in splits.items():
            total = sp.get("num_samples") if isinstance(sp, dict) else None
            token = re.compile(rf"(^|[-_.]){re.escape(str(name))}([-_.]|$)")
            if isinstance(total, int) and all(token.search(p.name) for p in paths):
                return f"_info.json's num_samples of split {name!r}", list(range(len(paths))), total, {}
    per = {}
    for k, p in enumerate(paths):
        stats = load(p.with_name(p.name.split(".")[0] + "_stats.json"))
        if stats is not None and isinstance(stats.get("successes"), int):
            per[k] = stats["successes"]
    if per:
        return "img2dataset's *_stats.json successes", sorted(per), sum(per.values()), per
    return None


def check_counts(stated, recs: list[dict], urls: list[str]) -> str | None:
    """One line when the samples converted differ from what ``stated`` (:func:`stated_counts`) says."""
    who, covered, total, per = stated
    got = sum(recs[k]["count"] for k in covered)
    if got == total:
        return None
    skipped = sum(len(recs[k]["skipped"]) for k in covered)
    differ = [f"{urls[k].rsplit('/', 1)[-1]} {per[k]} vs {recs[k]['count']}" for k in covered
              if k in per and per[k] != recs[k]["count"]]
    return (f"{who} give {total} samples for {'these' if len(covered) == len(urls) else f'{len(covered)} of these'} "
            f"{len(urls)} source shard{'s' if len(urls) > 1 else ''}, {got} were converted"
            + (f" ({skipped} skipped as bad input)" if skipped else "")
            + (f"; shards that differ (stated vs converted): {', '.join(differ[:4])}"
               + (f" and {len(differ) - 4} more" if len(differ) > 4 else "") if differ else ""))


def convert_webdataset(src: str, out: str | Path, split: str = "train", prefix: str = "wds",
                       resolution: int | None = None, encoding: str = "auto", label_field: str | None = None,
                       no_labels: bool = False, num_classes: int | None = None, variant: str | None = None,
                       workers: int | None = None, bad_input: str = "error", progress: bool = True,
                       channels: int | None = None, classes: str | None = None) -> tuple[Path, Manifest]:
    """Convert the webdataset shards ``src`` into ``out/split/``; returns (manifest path, manifest).

    ``resolution``: center-crop and box-resize every image to it (default: every image must be
    square, of the first image's size). Labels: ``label_field`` names a .json field (dots for
    nesting); otherwise .cls when the first sample has one (``no_labels``: none); indices or
    names, as the first label is (module docstring). ``classes``: a file of class names, one per
    line, or a manifest / split folder whose classes to use (names: their index; indices: their
    names). ``num_classes``: the label range [0, num_classes) (default: the largest label + 1, or
    the number of class names). ``channels``: 1 or 3, None = 1 when the images among the first
    shard's first PEEK samples are all grayscale."""
    from tqdm import tqdm

    urls = source_urls(src)
    given = read_classes(classes) if classes else ()
    labels = "" if no_labels else "json" if label_field else None  # None: .cls if the first sample has one
    probe = Options(0, "", 0, "", labels or "cls", label_field or "", False, (), "", None, bad_input)
    key, members, first, native, probed, kind = peek(
        urls[0], lambda ms: "index" if as_index(*raw_label(ms, probe)) is not None else "name")
    labels = "cls" if labels is None and "cls" in members else labels or ""
    if classes and not labels:
        raise ValueError(f"--classes {classes}: these shards give no labels to name" + (
            " (--no-labels)" if no_labels else " (no .cls in the first sample; --label-field FIELD reads a .json "
                                               "field)"))
    named = bool(labels) and kind == "name"
    if given and num_classes and num_classes != len(given):
        raise ValueError(f"--num-classes {num_classes} and the {len(given)} names of --classes {classes} disagree")
    channels_rule = "--channels" if channels else (f"auto: {native}, the first {probed} images of {urls[0]} being "
                                                   f"{'all grayscale' if native == 1 else 'not all grayscale'}")
    channels = channels or native
    if resolution is None:
        if first.shape[0] != first.shape[1]:
            raise ValueError(f"{urls[0]}, sample {key!r}: the first image is {first.shape[1]}x{first.shape[0]}; give "
                             f"--resolution to center-crop and resize every image to one square size")
        resolution, resize = first.shape[0], "none"
    else:
        resize = "center-crop+box"
    opts = Options(resolution, resize, channels, choose_encoding(encoding, resolution), labels, label_field or "",
                   named, given, f"--classes {classes}" if given else "the labels", num_classes, bad_input)

    split_dir = Path(out) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    # --bad-input is left out: a shard converted under `error` had no bad input, so after the error
    # the advised re-run with `skip` keeps it (the way back is checked below).
    fp = hashlib.sha256(json.dumps([prefix, split, urls, asdict(replace(opts, bad_input=""))]).encode()).hexdigest()
    plan_file = split_dir / ".plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {"fingerprint": fp}
    if plan["fingerprint"] != fp:
        raise FileExistsError(f"{split_dir} holds shards from a different conversion (other inputs or options); "
                              f"use a new output directory or delete {split_dir}")
    plan["source_shards"] = len(urls)
    if named and not given:  # every index fixed before any shard is converted: the same in every worker and re-run
        if "classes" not in plan:  # found once; a resumed conversion reuses them
            remote = sum(not is_local(u) for u in urls)
            print(f"data_prep: note: the labels are class names; reading the labels of all {len(urls)} source shards "
                  f"to index them in sorted order" + (f" (the {remote} remote ones are downloaded once more for it; "
                                                      f"--classes FILE avoids that)" if remote else "")
                  + f"; give the other splits --classes {split_dir} so that they share these indices",
                  file=sys.stderr, flush=True)
            plan["classes"] = find_class_names(urls, opts, workers, progress)
        opts = replace(opts, classes=tuple(plan["classes"]))
        if num_classes and num_classes != len(opts.classes):
            raise ValueError(f"--num-classes {num_classes}, but the labels name {len(opts.classes)} classes (to fix "
                             f"the list, give it with --classes FILE, one name per line)")
    plan_file.write_text(json.dumps(plan) + "\n")

    def record(k: int) -> Path:
        return split_dir / f".source-{k:06d}.json"

    def staged(k: int) -> Path:  # source shard k's output until the shards are numbered
        return split_dir / f".{prefix}-{split}-source{k:06d}.tar"

    def complete(k: int) -> bool:
        if not record(k).is_file():
            return False
        r = json.loads(record(k).read_text())
        return r["count"] == 0 or any(p.is_file() and p.stat().st_size == r["bytes"]
                                      for p in [staged(k)] + ([split_dir / r["name"]] if r["name"] else []))

    todo = [k for k in range(len(urls)) if not complete(k)]
    for k in sorted(set(range(len(urls))) - set(todo)) if bad_input == "error" else ():
        if what := json.loads(record(k).read_text())["skipped"]:  # recorded by an earlier run under `skip`
            raise ValueError(f"cannot convert {what[0]} (use --bad-input skip to leave such inputs out, counted in "
                             f"the manifest)")
    tasks = [(urls[k], str(staged(k)), opts) for k in todo]
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

    # Number the non-empty shards 0, 1, ... in source order (no gap where a source shard was all bad input).
    recs = [json.loads(record(k).read_text()) for k in range(len(urls))]
    entries, notes, skipped, unused, max_label = [], Counter(), [], Counter(), -1
    for k, rec in enumerate(recs):
        notes.update(rec["notes"])
        unused.update(rec["unused"])
        skipped.extend(rec["skipped"])
        max_label = max(max_label, rec["max_label"])
        if not rec["count"]:
            continue
        name = shard_name(prefix, split, len(entries))
        if staged(k).is_file():
            os.replace(staged(k), split_dir / name)
        elif rec["name"] != name:  # numbered by an earlier run, when an earlier source shard had another count
            raise DataError(f"{split_dir}: source shard {urls[k]} was numbered {rec['name']} by an earlier run and "
                            f"would now be {name} (a source shard changed in between); delete {split_dir} and convert "
                            f"again")
        if rec["name"] != name:
            rec["name"] = name
            record(k).write_text(json.dumps(rec, sort_keys=True) + "\n")
        entries.append(ShardEntry(**{f: rec[f] for f in ("name", "count", "bytes", "sha256", "first_key",
                                                         "last_key")}))
    if not entries:
        raise ValueError(f"every sample of {src} was bad input; nothing to write")
    folder = Path(urls[0]).parent.name if is_local(urls[0]) else urls[0].rsplit("/", 2)[-2] if "/" in urls[0] else src
    how = {"cls": ".cls", "json": f".json field {label_field!r}"}.get(labels, "none")
    if named:
        how += (f" (class names, indexed by {opts.classes_from})" if given else
                " (class names, indexed in sorted order of the names found)")
    source = {"form": "webdataset shards", "layout": layout_of(urls), "path": src, "source_shards": len(urls),
              "order": "as in the source shards, one output shard per non-empty source shard",
              "labels": how, "members_left_out": dict(sorted(unused.items())), "resize": resize,
              "channels": channels_rule, "conversions": dict(sorted(notes.items())), "skipped_inputs": len(skipped)}
    empty = [urls[k] for k, rec in enumerate(recs) if not rec["count"]]
    if empty:
        source["empty_source_shards"] = empty
    if skipped:
        source["skipped_examples"] = skipped[:20]
    stated = stated_counts(urls)
    if stated is not None:
        source["stated_samples"] = {"by": stated[0], "source_shards": len(stated[1]), "samples": stated[2]}
        warning = check_counts(stated, recs, urls)
        if warning:
            print(f"data_prep: warning: {warning}", file=sys.stderr, flush=True)
            source["stated_samples"]["differs"] = warning
    n_classes = (len(opts.classes) or num_classes or max_label + 1) if labels else 0
    class_names = list(opts.classes) or [str(c) for c in range(n_classes)]
    m = Manifest(dataset="webdataset", variant=variant or f"{sanitize(folder)}-{resolution}px", split=split,
                 resolution=resolution, channels=channels, encoding=opts.encoding,
                 num_samples=sum(e.count for e in entries), labels=bool(labels), num_classes=n_classes,
                 classes=class_names, split_rule=f"all of {src}", source=source, shards=entries)
    return write_manifest(m, split_dir), m

