"""Per-image binary attributes for the shards' ``<key>.attr`` members (see flowscale.data.codec).

Sources:

* CelebA's ``list_attr_celeba.txt``: line 1 the number of images, line 2 the 40 attribute names,
  then one line per image, ``000001.jpg -1 1 1 -1 ...`` (1 = has it, -1 = not). CelebA-HQ images
  map to CelebA files through CelebA-HQ's ``image_list.txt`` (columns ``idx orig_idx orig_file
  proc_md5 final_md5``); without an image list the rows must be named by the CelebA-HQ index
  itself (``0.jpg``, ``1.jpg``, ... as in CelebAMask-HQ's ``CelebAMask-HQ-attribute-anno.txt``).
* Glow's CelebA-HQ tfrecords: an ``attr`` int64 feature of 40 values per record, in CelebA's order.
* A CSV for ``prep folder``: a header ``file,<name>,<name>,...`` and one row per image; ``file``
  is the path relative to the folder, or the file name, or its stem; values 1/0, 1/-1,
  true/false or yes/no.

Every source becomes a string of '0'/'1' per image, one character per attribute name.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young")
"""CelebA's 40 attributes in the order of list_attr_celeba.txt (and of Glow's tfrecord ``attr``)."""

_TRUE, _FALSE = {"1", "true", "yes", "y", "t"}, {"0", "-1", "false", "no", "n", "f"}


def _bit(value: str, where: str) -> str:
    v = value.strip().lower()
    if v in _TRUE:
        return "1"
    if v in _FALSE:
        return "0"
    raise ValueError(f"{where}: attribute value {value!r} is not binary (use 1/0, 1/-1, true/false or yes/no)")


def bits_from_ints(values, where: str) -> str:
    """int attribute values (1 / 0 or 1 / -1) -> '0'/'1' string."""
    out = []
    for v in values:
        if v not in (1, 0, -1):
            raise ValueError(f"{where}: attribute value {v} is not binary (1 / 0 or 1 / -1)")
        out.append("1" if v == 1 else "0")
    return "".join(out)


def read_list_attr(path: Path) -> tuple[list[str], dict[str, str]]:
    """list_attr_celeba.txt -> (names, {file name: '0'/'1' string})."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    if len(lines) < 3 or not lines[0].strip().isdigit():
        raise ValueError(f"{path}: not in list_attr_celeba.txt format (line 1: the number of images, line 2: the "
                         f"attribute names, then 'file v1 v2 ...' rows)")
    names = lines[1].split()
    rows = {}
    for n, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if len(parts) != len(names) + 1:
            raise ValueError(f"{path} line {n}: {len(parts) - 1} values, the header names {len(names)} attributes")
        rows[parts[0]] = "".join(_bit(v, f"{path} line {n}") for v in parts[1:])
    if len(rows) != int(lines[0]):
        raise ValueError(f"{path}: line 1 says {int(lines[0])} images but {len(rows)} rows follow")
    return names, rows


def read_image_list(path: Path) -> dict[int, str]:
    """CelebA-HQ's image_list.txt -> {CelebA-HQ index: CelebA file name}."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0] == "idx":
            continue
        if len(parts) < 3 or not parts[0].isdigit():
            raise ValueError(f"{path} line {n}: expected 'idx orig_idx orig_file ...' (CelebA-HQ's image_list.txt)")
        out[int(parts[0])] = parts[2]
    if not out:
        raise ValueError(f"{path}: no rows (expected CelebA-HQ's image_list.txt)")
    return out


def celebahq_attributes(attr_file: Path, image_list: Path | None,
                        indices: list[int]) -> tuple[list[str], dict[int, str]]:
    """(names, {CelebA-HQ index: '0'/'1' string}) for ``indices``; an index without a row is an error."""
    names, rows = read_list_attr(attr_file)
    if image_list is not None:
        orig = read_image_list(image_list)
        missing = [i for i in indices if i not in orig]
        if missing:
            raise ValueError(f"{image_list}: no row for CelebA-HQ index {missing[0]} ({len(missing)} missing)")
        lookup = {i: orig[i] for i in indices}
    else:
        by_index = {}
        for name in rows:
            m = re.fullmatch(r"(\d+)(\.\w+)?", name)
            if m:
                by_index[int(m.group(1))] = name
        lookup = {i: by_index.get(i, f"{i}.jpg") for i in indices}
    out = {}
    for i in indices:
        if lookup[i] not in rows:
            how = (f"(mapped through {image_list})" if image_list else
                   "(rows named by CelebA-HQ index; pass --image-list image_list.txt for list_attr_celeba.txt)")
            raise ValueError(f"{attr_file}: no row for {lookup[i]!r}, CelebA-HQ image {i} {how}")
        out[i] = rows[lookup[i]]
    return names, out


def read_csv_attributes(path: Path) -> tuple[list[str], dict[str, str]]:
    """A CSV ``file,<name>,...`` -> (names, {file column: '0'/'1' string})."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2 or len(rows[0]) < 2:
        raise ValueError(f"{path}: expected a header 'file,<attribute>,...' and one row per image")
    names = [c.strip() for c in rows[0][1:]]
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_\-]+", n)]
    if bad:
        raise ValueError(f"{path}: attribute name {bad[0]!r} must match [A-Za-z0-9_-]+")
    out = {}
    for n, r in enumerate(rows[1:], start=2):
        if len(r) != len(names) + 1:
            raise ValueError(f"{path} line {n}: {len(r) - 1} values, the header names {len(names)} attributes")
        out[r[0].strip()] = "".join(_bit(v, f"{path} line {n}") for v in r[1:])
    return names, out


def lookup_file(table: dict[str, str], rel: Path, where: Path) -> str:
    """A CSV row for an image at ``rel`` (relative to the folder): by relative path, file name or stem."""
    for k in (rel.as_posix(), rel.name, rel.stem, str(rel.with_suffix("")).replace("\\", "/")):
        if k in table:
            return table[k]
    raise ValueError(f"{where}: no row for image {rel.as_posix()} (the 'file' column holds the path relative to "
                     f"the folder, the file name or its stem)")
