"""What a converter produces before it writes anything: a split's items and how they are stored
(:class:`SplitPlan`), shared by every source reader (:mod:`.sources`, :mod:`.classic`,
:mod:`.webdataset_source`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SplitPlan:
    items: list[tuple]
    dataset: str
    variant: str
    resolution: int
    resize: str
    """none | box | center-crop+box | pad (zero padding up to the resolution)"""
    split_rule: str
    labels: bool = False
    classes: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    attributes: list[str] = field(default_factory=list)
    """Names of the per-sample binary attributes (stored as <key>.attr); empty = none."""
    channels: int = 3
    """1 (grayscale) or 3 (RGB): every item is stored with this many; an item with the other
    count is converted with a note (L->RGB, RGB->L) counted in the manifest."""


def sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", s)


def shuffled(items: list, seed: int) -> list:
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(items))
    return [items[i] for i in order]
