"""Resuming with another config or topology: what may change, and moving ZeRO state between layouts.

:func:`resume_changes` holds a run's config against the checkpoint it continues (its
``config.yaml`` and ``COMPLETE``, no pickles), on every rank before anything is written: the
model, the data stream and its order, the precision and (without ``data.streams``) the number
of ranks and workers may not change; what may is returned and printed. ZeRO-1/2/3 optimizer
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


def saved_config(ckpt: Path) -> dict:
    """The config ``ckpt`` was written with (its config.yaml), flattened to dotted fields."""
    import yaml

    return _flat(yaml.safe_load((ckpt / "config.yaml").read_text()))


def written_by(ckpt: Path) -> int:
    """The number of ranks that wrote a complete checkpoint."""
    return int(json.loads((ckpt / "COMPLETE").read_text())["world_size"])


def resume_changes(ckpt: Path, config: dict, world_size: int) -> list[str]:
    """Check that a run configured by ``config`` (the resolved tree, as a dict) on
    ``world_size`` ranks can continue from ``ckpt``; returns the fields that changed, as
    ``"field old -> new"``. Raises ConfigError naming the first field that may not change, and
    the way out. Reads only config.yaml and COMPLETE (no pickles): every rank can call it
    before anything is written."""
    from .config import ConfigError

    saved = saved_config(ckpt)
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
    if (s0 == 0) != (s1 == 0) and now.get("engine.precision") != "fp32":
        raise ConfigError(f"config field 'engine.zero_stage': {ckpt} was written with ZeRO-{s0}, this run has "
                          f"ZeRO-{s1}, and with engine.precision={now.get('engine.precision')!r} optimizer state moves "
                          f"between ZeRO-1/2/3 layouts only, not to or from ZeRO-0 (fp32 runs may cross). Resume with "
                          f"{'ZeRO-0' if s0 == 0 else 'ZeRO-1, 2 or 3'}, or start a new train.run_dir (its weights: "
                          f"{weights}). Nothing was written")
    if s1 == 3 and (by != world_size or s0 != s1) and now.get("optim.name") == "adamax":
        raise ConfigError(f"config field 'engine.zero_stage': DeepSpeed's universal checkpoint restores only Adam's "
                          f"moments into ZeRO-3, and this run uses optim.name='adamax': resume {ckpt} with ZeRO-1 or 2 "
                          f"on {world_size} rank(s), or with ZeRO-{s0} on {by}. Nothing was written")
    return [f"{field} {old!r} -> {new!r}" for field, old, new in diffs if field != "train.run_dir"]


def canonical_streams(data_cfg, ckpt: Path | None, world_size: int) -> tuple[int, str]:
    """data.streams=null resolved, and why (one line): the value ``ckpt`` was written with when
    resuming (0 for a checkpoint from before the field existed: it ran with the per-rank
    order, which it keeps), else the new run's choice by
    :func:`flowscale.data.order.choose_streams` from the global batch, the training shards and
    this topology. The caller writes it into the config, so config.yaml records it."""
    from .data.order import choose_streams
    from .data.splits import resolve_split

    if ckpt is not None:
        recorded = saved_config(ckpt).get("data.streams")
        if not recorded:
            return 0, (f"recorded by {ckpt.name} ({'0' if recorded == 0 else 'not recorded: a run from before it'}): "
                       f"the per-rank order of its ranks x workers, kept")
        return int(recorded), (f"recorded by {ckpt.name} when the run was created; any ranks x workers dividing "
                               f"{recorded} can resume it")
    split = resolve_split(data_cfg, "train")
    S, why = choose_streams(data_cfg.batch_size, split.counts, world_size, data_cfg.num_workers)
    return S, f"chosen for this new run: {why}"


UNIVERSAL = "universal"  # <ckpt>/universal/: DeepSpeed's topology-free copy of a ZeRO-1/2/3 checkpoint


def needs_universal(ckpt: Path, zero_stage: int, world_size: int) -> bool:
    """Whether resuming ``ckpt`` with ``zero_stage`` on ``world_size`` ranks goes through a
    universal checkpoint: optimizer state on another layout, except ZeRO-0 to ZeRO-0 (whole)."""
    saved = saved_stage(ckpt)
    return not saved == zero_stage == 0 and (saved != zero_stage or written_by(ckpt) != world_size)


def saved_stage(ckpt: Path) -> int:
    """The ZeRO stage ``ckpt`` was written with (its config.yaml)."""
    return saved_config(ckpt).get("engine.zero_stage", 0)


def _for_every_stage(folder: Path, from_zero3: bool) -> None:
    """Make a folder that ds_to_universal wrote from one ZeRO layout loadable by every stage.

    DeepSpeed 0.19 reads a universal checkpoint differently per target stage: ZeRO-1/2 want
    ``mp_rank_00_model_states.pt``, a ``step.pt`` beside each parameter's moments and a
    ``ds_version`` in ``zero/optimizer_state.pt``; ZeRO-3 wants
    ``zero_pp_rank_0_mp_rank_00_model_states.pt`` and the step in that file's
    ``optimizer_state_dict``, and ZeRO-1/2 read each moment as a shaped ``{"param": ...}`` where
    the converter of a ZeRO-3 checkpoint writes a flat tensor. The converter writes only what its
    source stage's own loader reads. Adds what is missing; the values are DeepSpeed's, and only
    a ZeRO-3 source's moments (``from_zero3``) are read and written again."""
    import os

    import deepspeed
    import torch

    zero = folder / "zero"
    sd = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    per_param = next(zero.glob("*/step.pt"), None)  # every parameter's step is the same
    step = (torch.load(per_param, map_location="cpu", weights_only=False) if per_param is not None
            else sd["optimizer_state_dict"]["state"][0]["step"])
    sd.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]})
    sd.setdefault("ds_version", deepspeed.__version__)
    torch.save(sd, zero / "optimizer_state.pt")
    # The model-states file holds no weights a universal load reads (those come from zero/), only
    # the engine's counters, the LR schedule and the parameter shapes: one copy serves under both names.
    source = sorted(folder.glob("*model_states.pt"))[0]
    if from_zero3:  # its converter writes no step.pt and flat tensors; ZeRO-1/2's loader reads shaped dicts
        shapes = {name: shape for group in torch.load(source, map_location="cpu", weights_only=False)["param_shapes"]
                  for name, shape in group.items()}
        for d in (d for d in zero.iterdir() if d.is_dir()):
            torch.save(step, d / "step.pt")
            for f in d.glob("*.pt"):
                t = torch.load(f, map_location="cpu", weights_only=False)
                if f.name != "step.pt" and isinstance(t, torch.Tensor):
                    torch.save({"param": t.view(shapes[d.name]), "cat_dim": 0}, f)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if not (folder / name).exists():
            os.link(source, folder / name)


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
        saved = saved_config(ckpt)
        source_stage = saved.get("engine.zero_stage", 0)
        if source_stage == 0:  # whole state: laid out the same way here, no converter needed
            _universal_from_whole(ckpt, tmp)
        else:
            # DeepSpeed's converter knows Adam's moments by name only: Adamax's exp_inf goes in as exp_avg_sq
            # (through a copy of the optimizer files; the checkpoint is not touched) and comes out renamed back.
            renamed = _adamax_as_adam(ckpt) if saved.get("optim.name") == "adamax" else None
            try:
                r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                    str(renamed or ckpt), "--output_folder", str(tmp), "--inject_missing_state"],
                                   capture_output=True, text=True)
            finally:
                if renamed is not None:
                    shutil.rmtree(renamed, ignore_errors=True)
            if r.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RuntimeError(f"DeepSpeed's ds_to_universal could not convert {ckpt}: {r.stderr.strip()[-500:]}")
            if renamed is not None:
                for f in tmp.glob("zero/*/exp_avg_sq.pt"):
                    f.rename(f.with_name("exp_inf.pt"))
        _for_every_stage(tmp, from_zero3=source_stage == 3)
        (tmp / "COMPLETE").write_text("ds_to_universal\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        took = time.time() - t0
    barrier()
    return out, took


def _adamax_as_adam(ckpt: Path) -> Path:
    """A folder inside ``ckpt`` (removed with it) that reads like it to ds_to_universal, its
    optimizer files copied with every ``exp_inf`` (Adamax's infinity norm) named ``exp_avg_sq``."""
    import torch

    def rename(obj):
        if isinstance(obj, dict):
            return {("exp_avg_sq" if k == "exp_inf" else k): rename(v) for k, v in obj.items()}
        return obj

    out = ckpt / ".adamax-input"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for f in ckpt.iterdir():
        if f.name.endswith("optim_states.pt"):
            torch.save(rename(torch.load(f, map_location="cpu", weights_only=False)), out / f.name)
        elif f.is_file():
            (out / f.name).symlink_to(f.resolve())
    return out


def _universal_from_whole(ckpt: Path, out: Path) -> None:
    """A ZeRO-0 checkpoint (one model-states file holding the module and the torch optimizer's
    whole state) in the universal layout: per parameter ``zero/<name>/{fp32,<moment>,step}.pt``,
    and ``zero/optimizer_state.pt``. Parameters are the module's entries that are not buffers, in
    the module's order, which is the optimizer's (flowscale.build passes ``flow.parameters()``)."""
    import collections

    import deepspeed
    import torch

    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    buffers = set(states.get("buffer_names") or ())
    names = [n for n in states["module"] if n not in buffers]
    opt = states["optimizer"]
    group = opt["param_groups"][0]
    if len(opt["param_groups"]) != 1 or len(group["params"]) != len(names):
        raise RuntimeError(f"{ckpt}: the optimizer holds {sum(len(g['params']) for g in opt['param_groups'])} "
                           f"parameters in {len(opt['param_groups'])} group(s) and the module {len(names)}; this "
                           f"checkpoint cannot be resharded. Resume it with ZeRO-0")
    step = None
    for i, name in enumerate(names):
        d = out / "zero" / name
        d.mkdir(parents=True)
        torch.save({"param": states["module"][name].float(), "cat_dim": 0}, d / "fp32.pt")
        for key, value in opt["state"].get(group["params"][i], {}).items():
            if key == "step":
                step = value
            torch.save(value if key == "step" else {"param": value.float(), "cat_dim": 0}, d / f"{key}.pt")
    if step is None:
        raise RuntimeError(f"{ckpt}: the optimizer has taken no step; resume it with ZeRO-0")
    groups = [{**group, "params": [0]}]
    torch.save({"param_groups": groups, "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups},
                "ds_version": deepspeed.__version__}, out / "zero" / "optimizer_state.pt")
    states["param_shapes"] = [collections.OrderedDict((n, states["module"][n].shape) for n in names)]
    torch.save({k: v for k, v in states.items() if k not in ("module", "optimizer")} | {"module": None,
                "optimizer": None}, out / "mp_rank_00_model_states.pt")


def load_whole(engine, folder: Path) -> None:
    """Load a universal checkpoint into a ZeRO-0 engine (DeepSpeed reads those into ZeRO-1/2/3
    only): parameters from the fp32 copies, the torch optimizer's moments and step, the LR
    schedule and the engine's step counters from the model-states file."""
    import torch

    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    zero = folder / "zero"
    module, optimizer = engine.module, engine.flowscale_client_optimizer

    def part(name: str, key: str):
        t = torch.load(zero / name / f"{key}.pt", map_location="cpu", weights_only=False)
        return t["param"] if isinstance(t, dict) else t

    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    state = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(params):
            p.copy_(part(name, "fp32").view_as(p))
            state[i] = {f.stem: part(name, f.stem) if f.stem == "step" else part(name, f.stem).view_as(p)
                        for f in (zero / name).glob("*.pt") if f.stem != "fp32"}
    saved = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)["param_groups"][0]
    optimizer.load_state_dict({"state": state, "param_groups": [{**saved, "params": list(range(len(params)))}]})
    engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    engine.global_steps, engine.global_samples = states["global_steps"], states["global_samples"]
    engine.skipped_steps = states["skipped_steps"]

