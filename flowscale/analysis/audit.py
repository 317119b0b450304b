"""Which images each step saw (``train.record_batches``).

Every rank appends one line per step to ``run_dir/batches/rank_XXXXX.jsonl``:
``{"step": s, "rank": r, "rows": [fingerprint, ...]}``, a fingerprint being the 64-bit BLAKE2b of
an image's uint8 pixels as the step received them (after the flip). A run that continues from
an earlier step (a crash after the last checkpoint, a chosen older checkpoint) first moves the
records past that step to ``batches/superseded.jsonl``, so each step keeps the batch of the run
that went on from it. :func:`batch_keys` turns the records into sample keys by fingerprinting
the training shards (each image as stored and flipped).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

BATCHES = "batches"


def fingerprint(image: torch.Tensor | np.ndarray) -> str:
    """64-bit BLAKE2b of one uint8 image's bytes (C-contiguous [C, H, W])."""
    a = image.contiguous().numpy() if isinstance(image, torch.Tensor) else np.ascontiguousarray(image)
    return hashlib.blake2b(a.tobytes(), digest_size=8).hexdigest()


def record_batch(run_dir: str | Path, rank: int, step: int, x: torch.Tensor) -> None:
    """Append this rank's fingerprints of the images of ``step`` (x: uint8 [B, C, H, W])."""
    folder = Path(run_dir) / BATCHES
    folder.mkdir(exist_ok=True)
    with open(folder / f"rank_{rank:05d}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "rank": rank, "rows": [fingerprint(r) for r in x]}) + "\n")


def rewind_batches(run_dir: str | Path, step: int) -> int:
    """Move the records of steps after ``step`` (and lines torn by a crash) from every rank's file,
    including ranks the run no longer has, to ``batches/superseded.jsonl``; returns how many moved.
    Called on the main rank before the first step of a (re)start."""
    folder, moved = Path(run_dir) / BATCHES, []
    for path in sorted(folder.glob("rank_*.jsonl")):
        keep = []
        for line in path.read_text().splitlines():
            try:
                (keep if json.loads(line)["step"] <= step else moved).append(line)
            except (json.JSONDecodeError, KeyError):
                moved.append(line)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, path)
    if moved:
        with open(folder / "superseded.jsonl", "a") as f:
            f.write("".join(m + "\n" for m in moved))
    return len(moved)


def read_batches(run_dir: str | Path) -> dict[int, list[str]]:
    """step -> the fingerprints of its global batch, ranks in order."""
    parts: dict[int, dict[int, list[str]]] = {}
    for path in sorted((Path(run_dir) / BATCHES).glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["rank"] in parts.setdefault(r["step"], {}):
                raise ValueError(f"{path}: step {r['step']} of rank {r['rank']} is recorded twice")
            parts[r["step"]][r["rank"]] = r["rows"]
    return {s: [row for rank in sorted(p) for row in p[rank]] for s, p in sorted(parts.items())}


def batch_keys(run_dir: str | Path, data_cfg) -> dict[int, list[str]]:
    """step -> the sample keys of its global batch: :func:`read_batches` matched against every image
    of the training split, as stored and flipped. A fingerprint that matches no image raises."""
    from ..data.reader import BadDataPolicy, SampleDecoder, ShardCursor
    from ..data.splits import resolve_split

    split = resolve_split(data_cfg, "train")
    decode, policy, known = SampleDecoder(split.manifest), BadDataPolicy("error", 0, split.where), {}
    for s, count in enumerate(split.counts):
        cursor = ShardCursor(split, s, policy)
        try:
            for idx in range(count):
                key, members = cursor.read(idx, want=True)
                x = torch.from_numpy(np.array(decode(members)[0])).permute(2, 0, 1)  # [C, H, W], as the loader stacks it
                known[fingerprint(x)] = known[fingerprint(x.flip(2))] = f"{split.manifest.shards[s].name}/{key}"
        finally:
            cursor.close()
    out = {}
    for step, rows in read_batches(run_dir).items():
        missing = [r for r in rows if r not in known]
        if missing:
            raise ValueError(f"step {step}: {len(missing)} image(s) of {run_dir}'s batch match no image of {split.where}")
        out[step] = [known[r] for r in rows]
    return out
