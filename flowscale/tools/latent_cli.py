"""``flowscale encode | interpolate | manipulate | sweep``: the latent tools (:mod:`flowscale.analysis.latent`) on a
trained run, with images read from files, labelled PNG grids, attribute directions cached in the run.

Image files of another size than the model's are center-cropped to a square and resized (said
once, in one line), or refused with ``--no-resize``. Grids have one row per image (or per pair of
images for interpolation) and one column per step or scale, labelled. Attribute directions are
cached in ``<run_dir>/directions.safetensors``: one tensor per attribute and level
(``<attribute>/<level>``) and, in the metadata, from how many images with and without the
attribute each came, which checkpoint and which split; a cached direction is reused only for the
same checkpoint, split, image limit and ``--per-level`` choice.

Expected failures raise the exceptions :mod:`flowscale.cli` prints as one line (a missing file:
FileNotFoundError; an unreadable or wrongly sized image, an attribute the shards do not carry:
DataError; a bad option: ConfigError naming it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..analysis import latent
from ..config import ConfigError
from ..data import DataError

DIRECTIONS_FILE = "directions.safetensors"
_META_KEY = "flowscale.directions"


# -- images in, grids out ------------------------------------------------------------------------

def load_images(paths: list[str], size: int, channels: int, resize: bool = True,
                echo=lambda msg: print(msg, file=sys.stderr)) -> torch.Tensor:
    """Image files -> uint8 [N, C, size, size]. Another size is center-cropped and resized (box
    filter down, bicubic up), said once through ``echo``; with ``resize=False`` it is a DataError."""
    from PIL import Image, UnidentifiedImageError

    out, resized = [], []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p} does not exist")
        try:
            with Image.open(p) as im:
                im.load()
                img = im.convert("RGB" if channels == 3 else "L")
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{p}: not a readable image ({type(e).__name__}); give PNG or JPEG files") from None
        if img.size != (size, size):
            if not resize:
                raise DataError(f"{p}: image is {img.size[0]}x{img.size[1]}, the model takes {size}x{size}; resize "
                                f"it, or drop --no-resize to center-crop and resize automatically")
            resized.append(f"{Path(p).name} {img.size[0]}x{img.size[1]}")
            w, h = img.size
            s = min(w, h)
            img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            img = img.resize((size, size), Image.BOX if s >= size else Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        out.append(x[None] if x.dim() == 2 else x.permute(2, 0, 1))
    if resized:
        echo(f"flowscale: note: {len(resized)} of {len(paths)} image(s) are not {size}x{size} "
             f"({', '.join(resized[:3])}{', ...' if len(resized) > 3 else ''}): center-cropped to a square and "
             f"resized to {size}x{size}")
    return torch.stack(out)


def save_labelled_grid(images_uint8: torch.Tensor, rows: int, path: str | Path, col_labels: list[str],
                       row_labels: list[str], zoom: int = 0) -> Path:
    """[rows * cols, C, H, W] uint8 (row-major) -> one PNG with a label above each column and
    left of each row. ``zoom``: integer upscaling of each image (0 = enough for legible labels)."""
    from PIL import Image, ImageDraw, ImageFont

    n, c, h, w = images_uint8.shape
    cols = n // rows
    zoom = zoom or max(1, -(-64 // max(h, w)))
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(t):
        box = measure.textbbox((0, 0), t, font=font)
        return box[2] - box[0], box[3] - box[1]

    pad = 2
    cw, ch = w * zoom, h * zoom
    left = max([text_size(t)[0] for t in row_labels] + [0]) + 2 * pad
    top = max([text_size(t)[1] for t in col_labels] + [0]) + 2 * pad
    mode = "L" if c == 1 else "RGB"  # grayscale models give grayscale grids
    canvas = Image.new(mode, (left + cols * (cw + pad) + pad, top + rows * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, t in enumerate(col_labels):
        tw, _ = text_size(t)
        draw.text((left + pad + j * (cw + pad) + (cw - tw) // 2, pad), t, fill="black", font=font)
    for i, t in enumerate(row_labels):
        _, th = text_size(t)
        draw.text((pad, top + pad + i * (ch + pad) + (ch - th) // 2), t, fill="black", font=font)
    for k in range(n):
        i, j = divmod(k, cols)
        arr = images_uint8[k].permute(1, 2, 0).numpy()
        tile = Image.fromarray(arr[:, :, 0] if c == 1 else arr).resize((cw, ch), Image.NEAREST)
        canvas.paste(tile, (left + pad + j * (cw + pad), top + pad + i * (ch + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# -- a run --------------------------------------------------------------------------------------

def _load(ns):
    """(flow, cfg, checkpoint dir, run dir) for ``ns.run`` on ``ns.device`` in ``ns.dtype``."""
    from ..build import pick_device
    from ..checkpoint import load_trained, resolve

    if ns.chunk < 1:
        raise ConfigError(f"--chunk: at least 1, got {ns.chunk}")
    device = pick_device(ns.device, field="--device")
    ckpt = resolve(ns.run)
    flow, cfg = load_trained(ckpt, device)
    if ns.dtype == "bf16":
        flow = flow.to(torch.bfloat16)
    return flow, cfg, ckpt, ckpt.parent.parent


def _label(ns, cfg) -> int | None:
    k = cfg.model.num_classes
    if k > 0 and ns.label is None:
        raise ConfigError(f"--label: this model is class-conditional (model.num_classes={k}); "
                          f"give a class in 0..{k - 1}")
    if k == 0 and ns.label is not None:
        raise ConfigError("--label: this model is not class-conditional (model.num_classes=0); leave it out")
    if ns.label is not None and not 0 <= ns.label < k:
        raise ConfigError(f"--label: {ns.label} is outside 0..{k - 1} (model.num_classes={k})")
    return ns.label


def _log_wandb(run_dir: Path, cfg, images: dict[str, Path]) -> None:
    """Log PNGs into the run's W&B run (its id in <run_dir>/wandb_id.txt; offline when the run had W&B disabled)."""
    import dataclasses

    from ..logging import _init_wandb

    wcfg = cfg.wandb if cfg.wandb.mode != "disabled" else dataclasses.replace(cfg.wandb, mode="offline")
    run = _init_wandb(run_dir, wcfg, {})
    try:
        import wandb

        run.log({k: wandb.Image(str(v)) for k, v in images.items()})
    finally:
        run.finish()
    print(f"logged {', '.join(images)} to W&B run {(run_dir / 'wandb_id.txt').read_text().strip()} "
          f"({wcfg.mode}, under {run_dir / 'wandb'})")


def _default_out(run_dir: Path, name: str) -> str:
    return str(run_dir / "latent" / name)


# -- commands ----------------------------------------------------------------------------------

def cmd_encode(ns) -> int:
    flow, cfg, ckpt, _ = _load(ns)
    y = _label(ns, cfg)
    x = load_images(ns.images, cfg.data.image_size, cfg.data.channels, resize=not ns.no_resize)
    z, back, err = latent.reconstruct(flow, x, cfg.data.n_bits, y, ns.chunk)
    latent.finite_or_raise(z, f"encoding with {ckpt}")
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"latents": z, "files": list(ns.images), "label": y, "n_bits": cfg.data.n_bits,
                "image_size": cfg.data.image_size, "checkpoint": str(ckpt), "reconstruction_error_levels": err}, out)
    shapes = ", ".join("x".join(map(str, e.shape[1:])) for e in z)
    print(f"encoded {len(x)} image(s) with {ckpt} -> {out} (eps per level, finest first: {shapes})")
    print(f"reconstruction error: max {int(err.max())} level(s) of {2 ** cfg.data.n_bits} "
          f"({cfg.data.n_bits}-bit; 0 = exact)")
    return 0


def cmd_interpolate(ns) -> int:
    if len(ns.images) < 2:
        raise ConfigError("IMAGES: interpolation needs at least two images")
    if ns.steps < 2:
        raise ConfigError(f"--steps: at least 2 (both endpoints), got {ns.steps}")
    flow, cfg, ckpt, run_dir = _load(ns)
    if not 0 <= ns.fix_coarse <= len(flow.latent_shapes(cfg.data.channels, cfg.data.image_size)):
        raise ConfigError(f"--fix-coarse: {ns.fix_coarse} is more than the model's "
                          f"{len(flow.latent_shapes(cfg.data.channels, cfg.data.image_size))} levels")
    y = _label(ns, cfg)
    x = load_images(ns.images, cfg.data.image_size, cfg.data.channels, resize=not ns.no_resize)
    z = latent.finite_or_raise(latent.encode(flow, x, cfg.data.n_bits, y, ns.chunk), f"encoding with {ckpt}")
    path_z = latent.interpolate(z, ns.steps, ns.mode, ns.fix_coarse)
    images = latent.decode(flow, path_z, cfg.data.n_bits, y, ns.chunk)
    rows = len(x) - 1
    names = [Path(p).name for p in ns.images]
    out = save_labelled_grid(images, rows, ns.out or _default_out(run_dir, "interpolation.png"),
                             [f"t={t:.2f}" for t in torch.linspace(0, 1, ns.steps).tolist()],
                             [f"{names[r]} -> {names[r + 1]}" for r in range(rows)], ns.zoom)
    ends = images.view(rows, ns.steps, *images.shape[1:])
    err = latent.reconstruction_error(x[:-1], ends[:, 0], cfg.data.n_bits)
    if ns.fix_coarse:  # the last column keeps the first image's coarse levels: not the second image
        which = f"the {ns.fix_coarse} coarsest level(s) fixed); the first column differs from its input"
    else:
        err = torch.maximum(err, latent.reconstruction_error(x[1:], ends[:, -1], cfg.data.n_bits))
        which = "); endpoints differ from the inputs"
    print(f"wrote {out} ({rows} row(s), {ns.steps} steps, {ns.mode}"
          f"{', ' if ns.fix_coarse else ''}{which} by at most {int(err.max())} level(s)")
    if ns.wandb:
        _log_wandb(run_dir, cfg, {"latent/interpolation": out})
    return 0


def load_directions(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, {attribute: info}) of ``<run_dir>/directions.safetensors``, empty when absent."""
    from safetensors import safe_open

    path = Path(run_dir) / DIRECTIONS_FILE
    if not path.is_file():
        return {}, {}
    with safe_open(str(path), "pt") as f:
        info = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, info


def save_direction(run_dir: Path, attribute: str, direction: list[torch.Tensor], info: dict) -> Path:
    """Add or replace ``attribute`` in ``<run_dir>/directions.safetensors`` (a temporary file, renamed)."""
    import os

    from safetensors.torch import save_file

    tensors, meta = load_directions(run_dir)
    tensors = {k: v for k, v in tensors.items() if k.split("/", 1)[0] != attribute}
    tensors.update({f"{attribute}/{level}": d.contiguous() for level, d in enumerate(direction)})
    meta[attribute] = info
    path = Path(run_dir) / DIRECTIONS_FILE
    tmp = path.with_name(f".{DIRECTIONS_FILE}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)
    return path


def direction_for(flow, cfg, ckpt: Path, run_dir: Path, attribute: str, data: str | None, max_images: int | None,
                  per_level: bool, batch_size: int, chunk: int, recompute: bool = False, y=None):
    """(direction per level, info) of ``attribute``: from the cache when it matches, else computed
    from the split ``data`` (default: the run's train split) and cached."""
    from ..data import load_split
    from ..data.attributes import attribute_batches, require_attribute
    from ..data.splits import resolve_split

    if data and Path(data).exists():
        data = str(Path(data).resolve())  # one cache key however the path is written
    split = load_split(data) if data else resolve_split(cfg.data, "train")
    require_attribute(split, attribute)
    if split.image_shape != (cfg.data.channels, cfg.data.image_size, cfg.data.image_size):
        raise DataError(f"{split.where} holds {split.image_shape[1]}px images with {split.image_shape[0]} channel(s); "
                        f"the model takes {cfg.data.image_size}px with {cfg.data.channels}: give --data shards of the "
                        f"model's size")
    key = {"checkpoint": ckpt.name, "data": split.where, "max_images": max_images, "per_level": per_level}
    tensors, meta = load_directions(run_dir)
    cached = meta.get(attribute)
    if not recompute and cached and all(cached.get(k) == v for k, v in key.items()):
        levels = len(flow.latent_shapes(cfg.data.channels, cfg.data.image_size))
        return [tensors[f"{attribute}/{level}"] for level in range(levels)], dict(cached, cached=True)
    batches = attribute_batches(split, attribute, batch_size, max_images)
    if not cfg.model.num_classes:  # labels only matter to a class-conditional model (each image under its own)
        batches = ((x, has) for x, has, _ in batches)
    try:
        direction, n_with, n_without = latent.attribute_direction(flow, batches, cfg.data.n_bits, per_level, y, chunk)
    except ValueError as e:  # all images with, or all without, the attribute
        raise DataError(f"{split.where}, attribute {attribute!r}: {e} (use more images: --max-images, or another "
                        f"split: --data)") from None
    info = dict(key, n_with=n_with, n_without=n_without)
    save_direction(run_dir, attribute, direction, info)
    return direction, dict(info, cached=False)


def cmd_manipulate(ns) -> int:
    flow, cfg, ckpt, run_dir = _load(ns)
    y = _label(ns, cfg)
    if ns.max_images is not None and ns.max_images < 2:
        raise ConfigError(f"--max-images: at least 2 (images with and without the attribute), got {ns.max_images}")
    direction, info = direction_for(flow, cfg, ckpt, run_dir, ns.attribute, ns.data, ns.max_images, ns.per_level,
                                    ns.batch_size, ns.chunk, ns.recompute, y)
    how = "cached in" if info["cached"] else "computed, saved to"
    print(f"direction {ns.attribute!r} {how} {run_dir / DIRECTIONS_FILE}: {info['n_with']} images with, "
          f"{info['n_without']} without ({'every level' if ns.per_level else 'top level'}; {info['data']})")
    x = load_images(ns.images, cfg.data.image_size, cfg.data.channels, resize=not ns.no_resize)
    z = latent.finite_or_raise(latent.encode(flow, x, cfg.data.n_bits, y, ns.chunk), f"encoding with {ckpt}")
    images = latent.decode(flow, latent.manipulate(z, direction, ns.scales), cfg.data.n_bits, y, ns.chunk)
    out = save_labelled_grid(images, len(x), ns.out or _default_out(run_dir, f"manipulate_{ns.attribute}.png"),
                             [f"{s:+g}" for s in ns.scales], [Path(p).name for p in ns.images], ns.zoom)
    print(f"wrote {out} ({len(x)} row(s), scales {' '.join(f'{s:g}' for s in ns.scales)} along {ns.attribute!r})")
    if ns.wandb:
        _log_wandb(run_dir, cfg, {f"latent/manipulate_{ns.attribute}": out})
    return 0


def cmd_sweep(ns) -> int:
    flow, cfg, _, run_dir = _load(ns)
    y = _label(ns, cfg)
    shapes = flow.latent_shapes(cfg.data.channels, cfg.data.image_size)
    if ns.level is not None and not -len(shapes) <= ns.level < len(shapes):
        raise ConfigError(f"--level: the model has {len(shapes)} levels (0 = finest .. {len(shapes) - 1} = top, "
                          f"or -1 = top), got {ns.level}")
    images = latent.temperature_sweep(flow, shapes, cfg.data.n_bits, ns.temperatures, ns.n, ns.level, ns.base,
                                      y, ns.seed, ns.chunk)
    which = "every level" if ns.level is None else f"level {ns.level % len(shapes)} only, the others at T={ns.base:g}"
    out = save_labelled_grid(images, len(ns.temperatures), ns.out or _default_out(run_dir, "sweep.png"),
                             [str(k) for k in range(ns.n)], [f"T={t:g}" for t in ns.temperatures], ns.zoom)
    print(f"wrote {out} (rows: temperatures {' '.join(f'{t:g}' for t in ns.temperatures)} on {which}; "
          f"the same draws in every row)")
    if ns.wandb:
        _log_wandb(run_dir, cfg, {"latent/sweep": out})
    return 0


# -- parsers -----------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, run_help: str, images: bool = True) -> None:
    p.add_argument("run", metavar="RUN", help=run_help)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="precision of the flow (default: fp32)")
    p.add_argument("--chunk", type=int, default=16,
                   help="images per forward/inverse pass; lower it for large images (default: 16)")
    p.add_argument("--label", type=int, default=None,
                   help="class label, for class-conditional models (an attribute direction encodes each image of a "
                        "labelled split under its own class)")
    if images:
        p.add_argument("--no-resize", action="store_true",
                       help="refuse images of another size instead of center-cropping and resizing them")


def _grid_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", default=None, help=f"PNG path (default: RUN_DIR/latent/{default})")
    p.add_argument("--zoom", type=int, default=0, help="integer upscaling of each image in the grid (default: auto)")
    p.add_argument("--wandb", action="store_true",
                   help="also log the grid to the run's W&B run (offline if the run had W&B disabled)")


def add_parsers(sub) -> None:
    """Register encode, interpolate, manipulate and sweep on the ``flowscale`` subparsers."""
    run_help = "a run directory (its newest checkpoint; EMA weights when kept) or a checkpoint directory"
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("encode", help="images -> the latents of every level (and the reconstruction error)",
                       formatter_class=fmt,
                       description="Encode images into the flow's latents eps_1..eps_L (finest first; each N(0, I) "
                                   "under the model)\nand save them with torch.save; reports by how many pixel levels "
                                   "decode(encode(x)) differs from x.\n\nexample:\n"
                                   "  flowscale encode runs/demo a.png b.png --out latents.pt")
    _common(p, run_help)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--out", default="latents.pt",
                   help="output file (default: latents.pt): {'latents': [eps_l [N, C, H, W]], "
                   "'files', 'label', 'n_bits', 'image_size', 'checkpoint', 'reconstruction_error_levels'}")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("interpolate", help="a PNG grid of latent-space paths between images",
                       formatter_class=fmt,
                       description="Encode images and decode evenly spaced points between consecutive ones: one row "
                                   "per pair,\none column per step; the first and last columns are the inputs.\n\n"
                                   "examples:\n  flowscale interpolate runs/demo a.png b.png --steps 8 --out grid.png\n"
                                   "  flowscale interpolate runs/demo a.png b.png c.png --mode spherical "
                                   "--fix-coarse 1")
    _common(p, run_help)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="two or more image files; rows go A->B, B->C, ...")
    p.add_argument("--steps", type=int, default=8, help="points per row, endpoints included (default: 8)")
    p.add_argument("--mode", default="linear", choices=["linear", "spherical"],
                   help="linear in eps, or spherical per level (great circle for the direction, linear norm)")
    p.add_argument("--fix-coarse", type=int, default=0, metavar="N",
                   help="keep the N coarsest levels at the first image's value: only the finer levels change")
    _grid_args(p, "interpolation.png")
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("manipulate", help="move images along an attribute direction (Glow); a PNG grid",
                       formatter_class=fmt,
                       description="Compute an attribute's direction as Glow does (mean top-level eps of training "
                                   "images with\nthe attribute minus the mean of those without; --per-level: every "
                                   "level) from shards made with\nattributes (`flowscale prep celebahq --attributes`, "
                                   "`prep folder --attributes CSV`), cache it in\nRUN_DIR/directions.safetensors, and "
                                   "decode eps + scale * direction for each image and scale:\none row per image, one "
                                   "column per scale.\n\nexample:\n"
                                   "  flowscale manipulate runs/celeba256 --attribute Smiling --images a.png b.png "
                                   "--scales -1 -0.5 0 0.5 1")
    _common(p, run_help)
    p.add_argument("--attribute", required=True, help="attribute name, as in the shards' manifest (e.g. Smiling)")
    p.add_argument("--images", nargs="+", required=True, metavar="IMAGE", help="image files to manipulate")
    p.add_argument("--scales", type=float, nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0],
                   help="multiples of the direction, one column each (default: -1 -0.5 0 0.5 1)")
    p.add_argument("--data", default=None, metavar="SPLIT",
                   help="split directory or manifest.json with attributes (default: the run's training split)")
    p.add_argument("--max-images", type=int, default=None,
                   help="use at most this many images of the split (default: all)")
    p.add_argument("--per-level", action="store_true", help="a direction on every level, not only the top")
    p.add_argument("--recompute", action="store_true", help="recompute the direction even if it is cached")
    p.add_argument("--batch-size", type=int, default=64, help="images read per batch for the direction (default: 64)")
    _grid_args(p, "manipulate_ATTRIBUTE.png")
    p.set_defaults(func=cmd_manipulate)

    p = sub.add_parser("sweep", help="samples from the same draws at several temperatures, on all levels or one",
                       formatter_class=fmt,
                       description="Draw eps once and decode it scaled by each temperature: one row per temperature. "
                                   "With --level L\nonly level L is scaled (0 = finest, -1 = top) and the others stay "
                                   "at --base: what each scale of\nthe model controls.\n\nexamples:\n"
                                   "  flowscale sweep runs/demo --temperatures 0 0.5 0.7 1\n"
                                   "  flowscale sweep runs/demo --level 0 --temperatures 0 0.5 1 --base 0.7")
    _common(p, run_help, images=False)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.8, 1.0],
                   help="one row per temperature (default: 0 0.5 0.7 0.8 1)")
    p.add_argument("--level", type=int, default=None, help="scale only this level (default: every level)")
    p.add_argument("--base", type=float, default=1.0, help="temperature of the other levels with --level (default: 1)")
    p.add_argument("--n", type=int, default=8, help="samples per row (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    _grid_args(p, "sweep.png")
    p.set_defaults(func=cmd_sweep)
