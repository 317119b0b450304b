"""``flowscale bench reproduce CONFIG``: train a config on a real dataset for a fixed budget and
put its test bits/dim next to a per-pixel histogram baseline and the published figures.

The model trains on the training path of ``flowscale train`` (:func:`flowscale.build.build_training`,
the objective, DeepSpeed's ``train_step``, EMA when ``optim.ema_decay > 0``; the loop is
:func:`flowscale.tools.bench.converge.train_one`), fed by the shard loader of ``flowscale train``, for
``--steps`` steps or ``--minutes`` of training time, whichever ends first. Every ``--eval-every``
steps and at the end it scores the WHOLE test split (every image of the test manifest, e.g.
the official 10,000 of Fashion-MNIST; fixed dequantisation noise).

Baseline, computed here from the data: every pixel position and channel gets its own
categorical distribution over the 2^n_bits values, estimated from the train split with add-one
(Laplace) smoothing, p_d(v) = (count_d(v) + 1) / (N + 2^n_bits), and scored on the test split
as -log2 p averaged over images and dimensions. It ignores every dependency between pixels, so
a flow that has learned anything must beat it. Its discrete bits/dim compare directly with a
flow's dequantised bits/dim, which bound the flow's discrete bits/dim from above.

Published figures (:data:`PUBLISHED`) are listed for the dataset variant of the test manifest
(the padded ``mnist-pad32`` gets none: its D differs from the papers'), each with its citation.

Writes ``reproduce.md`` (the table), ``reproduce.json`` (curve, baseline, budget, machine) and
``reproduce.png`` (test bits/dim against steps and against training time, with the baseline and
the published figures as horizontal lines) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path


@dataclass(frozen=True)
class Published:
    model: str
    bpd: float
    """Test bits/dim on the official test split, 8-bit data, D = C x H x W of the original images."""
    source: str


PUBLISHED: dict[str, tuple[Published, ...]] = {
    # FFJORD (Grathwohl et al. 2019, ICLR) Table 2 lists MNIST test bits/dim for Real NVP, Glow and
    # FFJORD; Residual Flows (Chen et al. 2019, NeurIPS) Table 1 adds its own.
    "mnist": (
        Published("RealNVP", 1.06, "Dinh et al. 2017, as listed in FFJORD (Grathwohl et al. 2019), Table 2"),
        Published("Glow", 1.05, "Kingma & Dhariwal 2018, as listed in FFJORD (Grathwohl et al. 2019), Table 2"),
        Published("FFJORD", 0.99, "Grathwohl et al. 2019, Table 2"),
        Published("Residual Flows", 0.97, "Chen et al. 2019, Table 1"),
    ),
    "fashion-mnist": (),  # see FASHION_NOTE
    "cifar10": (
        Published("RealNVP", 3.49, "Dinh et al. 2017, Table 1"),
        Published("Glow", 3.35, "Kingma & Dhariwal 2018, Table 2"),
        Published("FFJORD", 3.40, "Grathwohl et al. 2019, Table 2"),
        Published("Residual Flows", 3.28, "Chen et al. 2019, Table 1"),
    ),
}
NOTES = {
    "fashion-mnist": "No published test bits/dim of RealNVP or Glow on Fashion-MNIST was found (the RealNVP, "
                     "Glow, FFJORD and Residual Flows papers report MNIST and CIFAR-10 only); the histogram "
                     "baseline is the reference line.",
}


# -- the per-pixel histogram baseline --------------------------------------------------------------

def _bins(x, n_bits: int):
    """uint8 [B, C, H, W] -> int64 bins [B, D] in [0, 2^n_bits)."""
    from ...data.quantize import reduce_bits

    return reduce_bits(x, n_bits).long().flatten(1)


def histogram_bpd(train_batches, test_batches, n_bits: int) -> dict:
    """Bits/dim of the independent per-pixel categorical model (see the module docstring):
    counts from ``train_batches``, scored on ``test_batches`` (iterables of uint8 [B, C, H, W]).
    Returns {"bpd", "train_images", "test_images", "dims", "values", "smoothing"}."""
    import torch

    k = 2 ** n_bits
    counts, n_train, dims = None, 0, None
    for x in train_batches:
        v = _bins(x, n_bits)
        dims = v.shape[1]
        flat = (torch.arange(dims) * k + v).flatten()  # one histogram per dimension, side by side
        c = torch.bincount(flat, minlength=dims * k)
        counts = c if counts is None else counts + c
        n_train += len(v)
    if counts is None:
        raise ValueError("the train split holds no images: no histogram to estimate")
    log2p = torch.log2((counts.double().view(dims, k) + 1) / (n_train + k))  # add-one smoothing
    bits, n_test = 0.0, 0
    for x in test_batches:
        v = _bins(x, n_bits)
        if v.shape[1] != dims:
            raise ValueError(f"test images have {v.shape[1]} dimensions, train images {dims}")
        bits -= log2p.gather(1, v.t()).sum().item()  # sum first, divide last
        n_test += len(v)
    if n_test == 0:
        raise ValueError("the test split holds no images: nothing to score the histogram on")
    return {"bpd": bits / (n_test * dims), "train_images": n_train, "test_images": n_test, "dims": dims,
            "values": k, "smoothing": "add-one (Laplace): p_d(v) = (count_d(v) + 1) / (N + 2^n_bits)"}


def split_batches(data_cfg, split: str, batch_size: int = 1000):
    """uint8 batches of a whole split, read once in stored order."""
    from ...data import iter_eval_batches

    for x, _ in iter_eval_batches(data_cfg, split, batch_size=batch_size):
        yield x


# -- the run ------------------------------------------------------------------------------------------

def _machine(threads: int) -> str:
    """The device, or the CPU with the intra-op threads the run used (not the process default)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads"


def run(args) -> int:
    import torch

    from ...config import ConfigError, load_config
    from ...data import build_train_loader, eval_split, first_images
    from ...data.splits import resolve_split
    from ...distributed import cleanup, init_distributed
    from ...threads import cpu_threads
    from .converge import train_one

    if args.steps is None and args.minutes is None:
        raise ConfigError("flowscale bench reproduce: give the budget, --steps N and/or --minutes M")
    if (args.steps is not None and args.steps < 1) or (args.minutes is not None and args.minutes <= 0):
        raise ConfigError("flowscale bench reproduce: --steps must be >= 1 and --minutes > 0")
    if args.eval_every < 1:
        raise ConfigError("flowscale bench reproduce: --eval-every must be >= 1")
    overrides = list(args.overrides)
    for flag, name in ((args.train_manifest, "train"), (args.test_manifest, "test")):
        if flag:
            overrides += ["data.dataset=shards", f"data.{name}_manifest={flag}"]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")  # the LR schedule's horizon (decay, if any)
    cfg = load_config(args.config, overrides)
    d = cfg.data
    test_split = resolve_split(d, "test")  # a manifest unlike the config (channels, size) stops here
    resolve_split(d, "train")
    variant = test_split.manifest.variant
    published = PUBLISHED.get(variant, ())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    threads_before = torch.get_num_threads()
    threads, why = cpu_threads(cfg.engine.threads, d.num_workers)
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        base = histogram_bpd(split_batches(d, "train"), split_batches(d, "test"), d.n_bits)
        base["seconds"] = time.perf_counter() - t0
        print(f"per-pixel histogram baseline: {base['bpd']:.4f} bits/dim on {base['test_images']} test images "
              f"({base['train_images']} train images, add-one smoothing, {base['seconds']:.1f} s)", flush=True)

        info = init_distributed(cfg.engine.backend, cfg.train.device)  # one rank: the trainer's engine
        loader = build_train_loader(d, rank=0, world_size=1, seed=d.seed)
        try:
            test_x = eval_split(d, "test")
            m = cfg.model
            print(f"training {m.preset} L={m.levels} K={m.steps} width={m.widths or m.width} on {variant} "
                  f"(batch {d.batch_size}) for " + _budget(args) + f"; test = all {len(test_x)} test images "
                  f"every {args.eval_every} steps; threads {threads} ({why})", flush=True)
            result = train_one(cfg, info, iter(loader), first_images(d, cfg.train.init_batch_size), test_x,
                               args.steps, args.eval_every, cfg.train.seed,
                               seconds=None if args.minutes is None else 60 * args.minutes,
                               eval_batch_size=args.eval_batch_size)
        finally:
            loader.close()
            cleanup()
    finally:
        torch.set_num_threads(threads_before)

    header = (f"{cfg.model.preset} L={cfg.model.levels} K={cfg.model.steps} width={cfg.model.widths or cfg.model.width} "
              f"({result['params']:,} parameters) on {variant} ({d.channels}x{d.image_size}x{d.image_size}, "
              f"{d.n_bits}-bit), batch {d.batch_size}, {cfg.optim.name} lr {cfg.optim.lr:g} warmup "
              f"{cfg.optim.warmup_steps}" + (f" EMA {cfg.optim.ema_decay:g}" if cfg.optim.ema_decay else "") +
              f"; budget {_budget(args)}: ran {result['steps']} steps in {result['train_s'] / 60:.1f} min of "
              f"training ({result['s_per_step']:.3f} s/step); test = all {base['test_images']} test images; "
              f"{_machine(threads)}; torch {torch.__version__}; {date.today().isoformat()}")
    report = {"config": str(args.config), "overrides": list(args.overrides), "variant": variant,
              "budget": {"steps": args.steps, "minutes": args.minutes}, "eval_every": args.eval_every,
              "header": header, "histogram": base, "note": NOTES.get(variant, ""),
              "published": [vars(p) for p in published], **result}
    table = markdown(report)
    print()
    print(table)
    (out_dir / "reproduce.md").write_text(table + "\n")
    (out_dir / "reproduce.json").write_text(json.dumps(report, indent=1))
    png = plot(report, out_dir / "reproduce.png")
    print(f"\nwrote {out_dir / 'reproduce.md'}, {out_dir / 'reproduce.json'}, {png}")
    return 0


def _budget(args) -> str:
    parts = ([f"{args.steps} steps"] if args.steps is not None else []) + \
            ([f"{args.minutes:g} min"] if args.minutes is not None else [])
    return " or ".join(parts) + (" (whichever first)" if len(parts) == 2 else "")


def markdown(report: dict) -> str:
    """The result table (this run, the baseline, the published figures) and the test curve."""
    curve, base = report["curve"], report["histogram"]
    final = curve[-1]
    best = min(curve, key=lambda p: p["test_bpd"])
    lines = [report["header"], "",
             "| model | test bits/dim | source |", "|---|---|---|",
             f"| this run, after {final['step']} steps ({final['wall_s'] / 60:.1f} min of training) | "
             f"{final['test_bpd']:.4f} | flowscale bench reproduce |"]
    if best is not final:
        lines.append(f"| this run, best evaluation (step {best['step']}) | {best['test_bpd']:.4f} | "
                     f"flowscale bench reproduce |")
    lines.append(f"| per-pixel histogram, add-one smoothing | {base['bpd']:.4f} | computed here: "
                 f"{base['train_images']} train / {base['test_images']} test images |")
    lines += [f"| {p['model']} (published) | {p['bpd']:.2f} | {p['source']} |" for p in report["published"]]
    if report["diverged_at"]:
        lines += ["", f"Training stopped at step {report['diverged_at']}: non-finite bits/dim or gradient."]
    if report["note"]:
        lines += ["", report["note"]]
    lines += ["", "| step | training min | train bits/dim (since last eval) | test bits/dim |", "|---|---|---|---|"]
    lines += [f"| {p['step']} | {p['wall_s'] / 60:.1f} | {p['train_bpd']:.4f} | {p['test_bpd']:.4f} |" for p in curve]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Test (solid) and train (dashed) bits/dim against steps and training minutes, with the
    histogram baseline and the published figures as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .converge import save_figure

    c = [p for p in report["curve"][1:] if math.isfinite(p["test_bpd"])] or report["curve"]  # step 0: untrained
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    refs = [("per-pixel histogram", report["histogram"]["bpd"], "black", "-.")]
    refs += [(f"{p['model']} (published)", p["bpd"], f"C{i + 2}", ":") for i, p in enumerate(report["published"])]
    for ax, key, scale, xlabel in zip(axes, ("step", "wall_s"), (1, 1 / 60), ("step", "training time (min)")):
        xs = [p[key] * scale for p in c]
        ax.plot(xs, [p["test_bpd"] for p in c], "o-", color="C0", ms=3, label="test (this run)")
        ax.plot(xs, [p["train_bpd"] for p in c], "--", color="C1", alpha=0.6, label="train (mean since last eval)")
        for name, bpd, color, ls in refs:
            ax.axhline(bpd, color=color, lw=0.9, ls=ls, label=f"{name} {bpd:.2f}")
        ys = [p["test_bpd"] for p in c] + [b for _, b, _, _ in refs]
        ax.set_ylim(min(ys) - 0.15, max(ys) + 0.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("bits/dim")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    return save_figure(fig, report["header"], path, rect=(0, 0.1, 1, 0.95), title_chars=180)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reproduce", help="train a config on a real dataset for a fixed budget; test bits/dim "
                                                "vs a per-pixel histogram baseline and published figures",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config or bundled name (e.g. glow_fashion_mnist)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--steps", type=int, default=None, help="training steps (also the LR schedule's horizon)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training minutes, evaluation excluded (with --steps: whichever ends first)")
    p.add_argument("--eval-every", type=int, default=500, help="test bits/dim every this many steps (default: 500)")
    p.add_argument("--eval-batch-size", type=int, default=500, help="images per evaluation batch (default: 500)")
    p.add_argument("--train-manifest", default=None, help="train split (manifest.json or its folder); "
                                                          "default: the config's data.train_manifest")
    p.add_argument("--test-manifest", default=None, help="test split, scored whole; default: data.test_manifest")
    p.add_argument("--out", default="runs/bench_reproduce", help="output directory (default: runs/bench_reproduce)")
    p.set_defaults(func=run)
