"""``flowscale bench converge``: how fast Glow, DLF, RealNVP, Jet and TarFlow reach a given bits/dim.

Every model trains on the demo data with the same optimizer, learning-rate schedule, batch
order, dequantisation noise and step budget, with hidden widths chosen so that the parameter
counts match the first model's (Glow's by default) as closely as a whole width allows. Test
bits/dim (a fixed subset of the held-out photos, fixed noise) are measured every
``--eval-every`` steps. Reported per model: parameters, final/best test bits/dim, the steps
and training wall time (evaluation excluded) each needs to first reach a common target
bits/dim, and the ratio to the first model's steps. The target defaults to the first model's
(Glow's) final test bits/dim: "x glow steps" = 4 then means a model got there in a quarter of
the steps Glow needed. A model can carry its own overrides (``dlf:model.dlt_beta_init=0``), e.g. to
compare initialisations or the reference optimizer.

The DLF paper (Liao, He & Shu 2019) states that DLF converges 10x faster than Glow; this
measures it on a small problem with whatever settings are given. Writes ``converge.json``,
``converge.md`` and ``converge.png`` (bits/dim against steps and against wall time) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

MODELS = ("glow", "dlf", "realnvp", "jet", "tarflow")


def count_params(model_cfg, channels: int, size: int) -> int:
    from ...flows.models import build_flow

    return sum(p.numel() for p in build_flow(model_cfg, channels, size).parameters())


def match_width(model_cfg, target: int, channels: int, size: int) -> int:
    """The hidden width whose parameter count is closest to ``target`` (counts grow with width).
    Transformer widths (net=vit, jet, tarflow) step by lcm(4, vit_heads): divisible by the heads
    and by 4 (2-D sin-cos positions)."""
    vit = model_cfg.preset in ("jet", "tarflow") or model_cfg.net == "vit"
    unit = math.lcm(4, model_cfg.vit_heads) if vit else 1

    def params(k: int) -> int:
        return count_params(replace(model_cfg, width=k * unit), channels, size)

    lo, hi = 1, max(4 * max(model_cfg.width, 8) // unit, 2)
    while lo < hi:
        mid = (lo + hi) // 2
        if params(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    cands = [k for k in (lo - 1, lo) if k >= 1]
    return unit * min(cands, key=lambda k: abs(params(k) - target))


def shuffled_batches(train_x, batch_size: int, seed: int):
    """Endless ``(x, None)`` batches of the in-memory ``train_x``: a fresh permutation from the
    ``bench`` stream every pass (the same batches for every model of a comparison)."""
    import torch

    from ... import seeds

    g = seeds.generator(seed, "bench")
    while True:
        order = torch.randperm(len(train_x), generator=g)
        for pos in range(0, len(order) - batch_size + 1, batch_size):
            yield train_x[order[pos:pos + batch_size]], None


def train_one(cfg, info, batches, init_images, test_x, steps: int | None, eval_every: int, seed: int, log=print,
              seconds: float | None = None, eval_batch_size: int = 128) -> dict:
    """Train one model on the training path of ``flowscale train`` (build_training, the
    objective, train_step on a one-rank DeepSpeed engine, EMA when optim.ema_decay > 0) on
    ``batches`` (an iterator of uint8 ``(x, y)``), ActNorm initialised from ``init_images``;
    returns its curve and timings. Stops after ``steps`` steps or once ``seconds`` of training
    (evaluation excluded) have passed, whichever comes first; test bits/dim of ``test_x`` (a
    tensor or a split streamed from shards, with the EMA weights when there are some) every
    ``eval_every`` steps and at the end."""
    import contextlib

    from ...build import build_training, pick_device
    from ...engine import train_step
    from ...evaluate import evaluate_bpd
    from ...loss import training_loss

    d = cfg.data
    run = build_training(cfg, info, init_images, pick_device(cfg.train.device))
    loss_fn = training_loss(cfg, run.device, run.dtype)
    curve, window, train_s = [], [], 0.0
    wall0 = time.perf_counter()

    def evaluate(step: int) -> None:
        with run.ema.swapped_in(run.module) if run.ema is not None else contextlib.nullcontext():
            test = evaluate_bpd(run.module, test_x, d.n_bits, batch_size=eval_batch_size, device=run.device,
                                seed=seed, dtype=run.dtype)
        train = sum(window) / len(window) if window else float("nan")
        curve.append({"step": step, "wall_s": train_s, "elapsed_s": time.perf_counter() - wall0, "test_bpd": test,
                      "train_bpd": train})
        window.clear()
        log(f"    step {step:5d}  {train_s:7.1f}s  train {train:.4f}  test {test:.4f}")

    evaluate(0)
    diverged, step = None, 0
    while steps is None or step < steps:
        batch = next(batches)
        t0 = time.perf_counter()
        metrics = train_step(run.engine, batch, loss_fn)
        train_s += time.perf_counter() - t0
        step += 1
        if metrics["skipped"]:
            diverged = step
            log(f"    non-finite bits/dim or gradient at step {step}: stopped")
            break
        if run.ema is not None:
            run.ema.update(run.module)
        window.append(metrics["bpd"])
        out_of_time = seconds is not None and train_s >= seconds
        if step % eval_every == 0 or step == steps or out_of_time:
            evaluate(step)
        if out_of_time:
            break
    return {"curve": curve, "diverged_at": diverged, "s_per_step": train_s / max(1, step - (diverged is not None)),
            "params": run.n_params, "steps": step, "train_s": train_s}


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """"dlf:model.dlt_beta_init=0,optim.lr=5e-3" -> ("dlf", ["model.dlt_beta_init=0", "optim.lr=5e-3"])."""
    name, _, rest = spec.partition(":")
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r} in --models {spec!r}; choose from {', '.join(MODELS)}")
    extras = [kv for kv in rest.split(",") if kv]
    bad = [kv for kv in extras if "=" not in kv or "." not in kv.split("=")[0]]
    if bad:
        raise SystemExit(f"--models {spec!r}: overrides must look like section.field=value, got {bad}")
    return name, extras


def first_reach(curve: list[dict], target: float, key: str) -> float | None:
    """The first ``key`` (step or wall_s) at which test bits/dim <= target, linearly
    interpolated between evaluations; None if never."""
    prev = None
    for point in curve:
        if point["test_bpd"] <= target:
            if prev is None or not math.isfinite(prev["test_bpd"]):
                return point[key]
            f = (prev["test_bpd"] - target) / (prev["test_bpd"] - point["test_bpd"])
            return prev[key] + f * (point[key] - prev[key])
        prev = point
    return None


def _fmt_steps(s: float | None) -> str:
    return "not reached" if s is None else f"{s:.0f}"


def run(args) -> int:
    import torch

    from ...config import load_config
    from ...data import build_datasets
    from ...distributed import cleanup, init_distributed

    if args.config and "=" in args.config:  # only overrides were given
        args.overrides, args.config = [args.config, *args.overrides], None
    common = [*args.overrides, f"train.steps={args.steps}"]
    base = load_config(args.config, common)
    d = base.data
    if d.dataset != "demo":
        raise SystemExit("flowscale bench converge runs on the demo data (data.dataset=demo)")
    train_x, test_x = build_datasets(d)
    test_x = test_x[:args.test_images]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    configs = {}
    ref = None
    for spec in args.models:
        name, extras = parse_spec(spec)
        cfg = load_config(args.config, [*common, f"model.preset={name}", *extras])
        m = cfg.model
        for field in ("coupling", "mask", "permutation", "scale_fn", "actnorm", "split_prior", "learn_top", "net"):
            if not any(kv.startswith(f"model.{field}=") for kv in extras):
                m = replace(m, **{field: None})  # every preset fills its own choices
        if ref is None:
            ref = count_params(m, d.channels, d.image_size)
        elif not args.same_width and not any(kv.startswith("model.width=") for kv in extras):
            m = replace(m, width=match_width(m, ref, d.channels, d.image_size))
        configs[spec] = replace(cfg, model=m)

    bound = None
    if not args.no_bound:
        from ...analysis.bound import dataset_bound

        bound = dataset_bound(d, "train")
        print(f"linear-flow bound (demo train covariance): in-sample {bound['bpd']:.4f}, "
              f"population {bound['bpd_population']:.4f} bits/dim", flush=True)

    results = {}
    info = init_distributed(base.engine.backend, base.train.device)  # one rank: the trainer's engine
    try:
        for name, cfg in configs.items():
            print(f"  {name}: width {cfg.model.width}, {count_params(cfg.model, d.channels, d.image_size):,} "
                  f"parameters", flush=True)
            batches = shuffled_batches(train_x, d.batch_size, args.seed)
            results[name] = train_one(cfg, info, batches, train_x[:cfg.train.init_batch_size], test_x, args.steps,
                                      args.eval_every, args.seed)
            results[name]["width"] = cfg.model.width
    finally:
        cleanup()

    first = args.models[0]
    target = args.target if args.target is not None else results[first]["curve"][-1]["test_bpd"]
    for r in results.values():
        r["steps_to_target"] = first_reach(r["curve"], target, "step")
        r["wall_to_target"] = first_reach(r["curve"], target, "wall_s")
        if bound is not None:  # when the model first beats every linear flow on held-out data
            r["steps_to_bound"] = first_reach(r["curve"], bound["bpd_population"], "step")

    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    m0 = base.model
    header = (f"bits/dim convergence on the demo data ({d.image_size}x{d.image_size}, {d.n_bits}-bit, batch {d.batch_size}, "
              f"{args.steps} steps, {base.optim.name} lr {base.optim.lr:g} warmup {base.optim.warmup_steps} "
              f"unless a model says otherwise); "
              f"L={m0.levels} K={m0.steps}; test = {len(test_x)} held-out crops; target {target:.4f} bits/dim; "
              f"{machine}; torch {torch.__version__}; {date.today().isoformat()}")
    lines = [header, "",
             "| model | width | params | final train bpd | final test bpd | best test bpd | steps to target | "
             f"x {first} steps | train s to target | s/step |" + (" steps to linear bound |" if bound else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if bound else "")]
    s0 = results[first]["steps_to_target"]
    for name, r in results.items():
        c = r["curve"]
        best = min(p["test_bpd"] for p in c)
        st, wt = r["steps_to_target"], r["wall_to_target"]
        ratio = f"{s0 / st:.2f}" if (st and s0) else "-"
        final = "diverged" if r["diverged_at"] else f"{c[-1]['test_bpd']:.4f}"
        lines.append(f"| {name} | {r['width']} | {r['params']:,} | {c[-1]['train_bpd']:.4f} | {final} | {best:.4f} | "
                     f"{_fmt_steps(st)} | {ratio} | "
                     f"{'%.1f' % wt if wt is not None else '-'} | {r['s_per_step']:.4f} |" +
                     (f" {_fmt_steps(r['steps_to_bound'])} |" if bound else ""))
    if bound is not None:
        lines += ["", f"Linear-flow bound of the demo train split: {bound['bpd']:.4f} bits/dim in-sample, "
                      f"{bound['bpd_population']:.4f} population estimate (flowscale bound)."]
    lines += ["", f"'x {first} steps' = {first}'s steps to the target / this model's (> 1: faster than {first})."
                  + (" 'steps to linear bound': first step whose test bits/dim beat the population estimate."
                     if bound else "")]
    table = "\n".join(lines)
    print()
    print(table)
    (out_dir / "converge.md").write_text(table + "\n")
    (out_dir / "converge.json").write_text(json.dumps({"header": header, "target": target, "bound": bound,
                                                       "results": results}, indent=1))
    png = plot(results, target, bound, out_dir / "converge.png", header)
    print(f"\nwrote {out_dir / 'converge.md'}, {out_dir / 'converge.json'}" + (f", {png}" if png else ""))
    return 0


def plot(results: dict, target: float, bound: dict | None, path: Path, title: str) -> Path | None:
    """Test (solid) and train (dashed) bits/dim against steps and training wall time, log scale
    so that slowly starting models stay on the chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    handles = []
    for name, r in results.items():
        c = [p for p in r["curve"][1:] if math.isfinite(p["test_bpd"])]  # step 0 is the untrained model
        for i, (ax, key) in enumerate(zip(axes, ("step", "wall_s"))):
            line, = ax.plot([p[key] for p in c], [p["test_bpd"] for p in c], label=name)
            ax.plot([p[key] for p in c], [p["train_bpd"] for p in c], "--", color=line.get_color(), alpha=0.5)
            if i == 0:
                handles.append(line)
    for ax, xlabel in zip(axes, ("step", "training wall time (s)")):
        if math.isfinite(target):
            h = ax.axhline(target, color="gray", lw=0.8, ls=":", label=f"target {target:.3f}")
        if bound is not None:
            hb = ax.axhline(bound["bpd_population"], color="black", lw=0.8, ls="-.",
                            label=f"linear-flow bound {bound['bpd_population']:.3f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("bits/dim (solid: test, dashed: train)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
        ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.grid(alpha=0.3, which="both")
    handles += [h] if math.isfinite(target) else []
    handles += [hb] if bound is not None else []
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=7, frameon=False)
    return save_figure(fig, title, path, rect=(0, 0.12, 1, 0.96), title_chars=170)


def save_figure(fig, title: str, path: Path, rect: tuple, title_chars: int) -> Path:
    """A bench figure's last steps: the header as a small title (cut to ``title_chars``), the
    layout inside ``rect`` (room below for the legend), a 120 dpi PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig.suptitle(title[:title_chars] + ("..." if len(title) > title_chars else ""), fontsize=7)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("converge", help="bits/dim vs steps and wall time: Glow vs DLF vs RealNVP (demo data)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: the demo defaults)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides (shared by every model)")
    p.add_argument("--models", nargs="+", default=list(MODELS), metavar="PRESET[:section.field=value,...]",
                   help="presets to compare, each optionally with its own overrides (e.g. "
                        "dlf:model.dlt_beta_init=0,optim.lr=5e-3); the first sets the parameter budget and the "
                        "default target (default: glow dlf realnvp)")
    p.add_argument("--steps", type=int, default=500, help="optimisation steps per model (default: 500)")
    p.add_argument("--eval-every", type=int, default=25, help="test bits/dim every this many steps (default: 25)")
    p.add_argument("--test-images", type=int, default=256, help="held-out crops scored at each eval (default: 256)")
    p.add_argument("--target", type=float, default=None,
                   help="test bits/dim to reach (default: the first model's final test bits/dim)")
    p.add_argument("--same-width", action="store_true", help="use model.width for every model (no parameter matching)")
    p.add_argument("--no-bound", action="store_true", help="skip the linear-flow bound line")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, batch order and noise (default: 0)")
    p.add_argument("--out", default="runs/bench_converge", help="output directory (default: runs/bench_converge)")
    p.set_defaults(func=run)
