"""Resuming with another config or topology: what may change, and moving ZeRO state between layouts.

:func:`resume_changes` holds a run's config against the checkpoint it continues (its
``config.yaml`` and ``COMPLETE``, no pickles), on every rank before anything is written: the
model, the data stream and its order, the precision and (without ``data.streams``) the number
of ranks and workers may not change; what may is returned and printed. ZeRO-1/2 optimizer
state on another layout (ranks or stage) goes through DeepSpeed's universal checkpoint
(:func:`to_universal`, made once per checkpoint), loaded by :func:`flowscale.checkpoint.load`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .distributed import barrier


# What a resumed run may not change: the model, what the data stream and its order are made
# of, and what DeepSpeed's files are laid out for. Everything else (optimizer, schedule,
# memory mode, logging, steps, eval data) may change, and the change is printed.
FIXED_ON_RESUME = ("model.", "data.dataset", "data.train_manifest", "data.train_shards", "data.image_size",
                   "data.channels", "data.n_bits", "data.batch_size", "data.train_size", "data.seed",
                   "data.random_flip", "data.shuffle_buffer", "data.streams", "train.seed",
                   "engine.precision")
# Without data.streams the order also follows the loader workers and the ranks.
FIXED_WITHOUT_STREAMS = ("data.num_workers",)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def written_by(ckpt: Path) -> int:
    """The number of ranks that wrote a complete checkpoint."""
    return int(json.loads((ckpt / "COMPLETE").read_text())["world_size"])


def resume_changes(ckpt: Path, config: dict, world_size: int) -> list[str]:
    """Check that a run configured by ``config`` (the resolved tree, as a dict) on
    ``world_size`` ranks can continue from ``ckpt``; returns the fields that changed, as
    ``"field old -> new"``. Raises ConfigError naming the first field that may not change, and
    the way out. Reads only config.yaml and COMPLETE (no pickles): every rank can call it
    before anything is written."""
    import yaml

    from .config import ConfigError

    saved = _flat(yaml.safe_load((ckpt / "config.yaml").read_text()))
    now = _flat(config)

    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    # Fields added to flowscale after the checkpoint was written are not in its config: skipped.
    diffs = [(f, saved[f], now[f]) for f in sorted(set(saved) & set(now)) if norm(saved[f]) != norm(now[f])]
    weights = ckpt / "model.safetensors"
    fixed = FIXED_ON_RESUME + (() if now.get("data.streams") else FIXED_WITHOUT_STREAMS)
    for field, old, new in diffs:
        if field.startswith(fixed):
            raise ConfigError(f"config field '{field}': {ckpt} was written with {old!r}, this run has {new!r}, and it "
                              f"cannot change on resume: resume with {old!r}, or start a new train.run_dir (its "
                              f"weights: {weights}). Nothing was written")
    by = written_by(ckpt)
    if by != world_size and not now.get("data.streams"):
        raise ConfigError(f"{ckpt} was written by {by} ranks and this run has {world_size}; without "
                          f"data.streams the data position is per rank: resume on {by} ranks, or start a new "
                          f"train.run_dir (its weights: {weights}). Nothing was written")
    (s0, s1) = (saved.get("engine.zero_stage", 0), now.get("engine.zero_stage", 0))
    if (by != world_size or s0 != s1) and not (s0 == s1 == 0 or (s0 in (1, 2) and s1 in (1, 2))):
        raise ConfigError(f"config field 'engine.zero_stage': {ckpt} was written with ZeRO-{s0} on {by} rank(s), this "
                          f"run has ZeRO-{s1} on {world_size}, and that cannot change on resume: optimizer state moves "
                          f"between ZeRO-0 layouts and between ZeRO-1/2 layouts (DeepSpeed's universal checkpoint), "
                          f"ZeRO-3 stays on its own. Resume with ZeRO-{s0} on {by} rank(s), or start a new "
                          f"train.run_dir (its weights: {weights}). Nothing was written")
    return [f"{field} {old!r} -> {new!r}" for field, old, new in diffs if field != "train.run_dir"]


UNIVERSAL = "universal"  # <ckpt>/universal/: DeepSpeed's topology-free copy of a ZeRO-1/2 checkpoint


def needs_universal(ckpt: Path, zero_stage: int, world_size: int) -> bool:
    """Whether resuming ``ckpt`` with ``zero_stage`` on ``world_size`` ranks goes through
    DeepSpeed's universal checkpoint (sharded optimizer state on another layout)."""
    import yaml

    saved = yaml.safe_load((ckpt / "config.yaml").read_text()).get("engine", {}).get("zero_stage", 0)
    return saved in (1, 2) and zero_stage in (1, 2) and (saved != zero_stage or written_by(ckpt) != world_size)


def to_universal(ckpt: Path, rank: int) -> tuple[Path, float]:
    """Collective: rank 0 converts ``ckpt`` with DeepSpeed's ds_to_universal into
    ``ckpt/universal`` (once; kept for later restarts), the others wait. Returns (the folder,
    seconds the conversion took; 0 when it was there)."""
    import subprocess
    import sys

    out, took = ckpt / UNIVERSAL, 0.0
    if rank == 0 and not (out / "COMPLETE").is_file():
        t0 = time.time()
        tmp = ckpt / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
                            "--output_folder", str(tmp), "--inject_missing_state"], capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"DeepSpeed's ds_to_universal could not convert {ckpt}: {r.stderr.strip()[-500:]}")
        (tmp / "COMPLETE").write_text("ds_to_universal\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        took = time.time() - t0
    barrier()
    return out, took
