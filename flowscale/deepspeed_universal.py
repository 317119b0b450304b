"""Every DeepSpeed-version-specific piece of flowscale's checkpoint handling, in one place.

Supported DeepSpeed: **0.19.x** (``>=0.19,<0.20``, pinned in pyproject.toml; :func:`check_version`
refuses any other at the start of training). What is specific to that version:

- :func:`to_universal`: runs DeepSpeed's ``ds_to_universal`` converter, then completes its output
  (:func:`_for_every_stage`) so that every ZeRO stage's loader of 0.19 reads it, renames Adamax's
  ``exp_inf`` around the converter (it knows Adam's moment names only), and writes the universal
  layout itself from a ZeRO-0 checkpoint (:func:`_universal_from_whole`), which the converter does
  not read.
- :func:`load_whole`: loads a universal checkpoint into a ZeRO-0 engine, which 0.19 does not.

The file names and dictionary keys read and written here (``mp_rank_00_model_states.pt``,
``zero/<param>/{fp32,exp_avg,step}.pt``, ``optimizer_state_dict``, ``ds_version``, ...) are
DeepSpeed 0.19's; a new DeepSpeed version is supported by checking them against its loaders
(``deepspeed/checkpoint/universal_checkpoint.py``, ``runtime/engine.py``) and widening
:data:`SUPPORTED`. Which checkpoint needs a conversion is decided in :mod:`flowscale.restore`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .distributed import barrier
from .engine import client_optimizer

SUPPORTED = ">=0.19,<0.20"
"""The DeepSpeed versions whose checkpoint layout this module reads and writes (pyproject.toml pins the same)."""


class UnsupportedDeepSpeed(RuntimeError):
    """The installed DeepSpeed is outside :data:`SUPPORTED`."""


def check_version(version: str | None = None) -> None:
    """Refuse a DeepSpeed outside :data:`SUPPORTED` with one line (``version``: default the installed one)."""
    from importlib.metadata import version as installed

    from packaging.specifiers import SpecifierSet

    version = version or installed("deepspeed")
    if not SpecifierSet(SUPPORTED).contains(version, prereleases=True):
        raise UnsupportedDeepSpeed(
            f"DeepSpeed {version} is installed; flowscale supports deepspeed{SUPPORTED} (the checkpoint layout "
            f"flowscale/deepspeed_universal.py reads and writes): pip install 'deepspeed{SUPPORTED}'")


UNIVERSAL = "universal"  # <ckpt>/universal/: DeepSpeed's topology-free copy of a ZeRO-1/2/3 checkpoint


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


def to_universal(ckpt: Path, rank: int, source_stage: int, adamax: bool) -> tuple[Path, float]:
    """Collective: rank 0 converts ``ckpt`` (written with ZeRO-``source_stage``; ``adamax``: by
    torch's Adamax) with DeepSpeed's ds_to_universal into ``ckpt/universal`` (once; kept for later
    restarts), the others wait. Returns (the folder, seconds the conversion took; 0 when it was there)."""
    import subprocess
    import sys

    out, took = ckpt / UNIVERSAL, 0.0
    if rank == 0 and not (out / "COMPLETE").is_file():
        t0 = time.time()
        tmp = ckpt / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if source_stage == 0:  # whole state: laid out the same way here, no converter needed
            _universal_from_whole(ckpt, tmp)
        else:
            # DeepSpeed's converter knows Adam's moments by name only: Adamax's exp_inf goes in as exp_avg_sq
            # (through a copy of the optimizer files; the checkpoint is not touched) and comes out renamed back.
            renamed = _adamax_as_adam(ckpt) if adamax else None
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
    module, optimizer = engine.module, client_optimizer(engine)

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
