"""What ``flowscale plan`` prints: the verdict on the configured micro-batch (and what would
fit), the per-config report, and one summary row per config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ...config import Config

if TYPE_CHECKING:
    from . import Plan

GIB = 2 ** 30


def gib(b: float) -> str:
    return f"{b / GIB:,.2f}" if b >= 0.01 * GIB or b == 0 else f"{b / GIB:.2g}"


def _mb(b: float) -> str:
    return f"{b / 2 ** 20:,.1f}"


def verdict(p: Plan, cfg: Config) -> list[str]:
    """What to do with the configured batch: which modes fit it, and what would."""
    lines = []
    e = cfg.engine
    if not p.micro_batch:
        lines.append(f"data.batch_size={cfg.data.batch_size} does not divide over {p.gpus} GPU(s) x "
                     f"engine.grad_accum={e.grad_accum}; pick a multiple of {p.gpus * e.grad_accum}")
        return lines
    for name, mp in p.modes.items():
        total = mp.total_bytes(p.micro_batch)
        ok = total <= p.gpu_mem
        label = "inverse recompute" if name == "inverse" else "plain autograd"
        line = (f"{label}: micro-batch {p.micro_batch} needs {gib(total)} GiB of {gib(p.gpu_mem)} -> "
                f"{'fits' if ok else 'does NOT fit'}; largest micro-batch {mp.max_micro_batch}")
        if not ok and mp.max_micro_batch > 0:
            per_gpu = p.micro_batch * e.grad_accum  # images per GPU per optimizer step
            accum = math.ceil(per_gpu / mp.max_micro_batch)
            while per_gpu % accum:  # the micro-batch must divide it exactly
                accum += 1
            line += f" (set engine.grad_accum={accum} to keep data.batch_size={cfg.data.batch_size})"
        elif not ok:
            line += " (not even 1 image: more GPUs with engine.zero_stage=3, bf16, or a smaller model)"
        lines.append(line)
    chosen = "inverse" if cfg.memory.inverse_recompute else "plain"
    other = "plain" if chosen == "inverse" else "inverse"
    fits = {k: mp.total_bytes(p.micro_batch) <= p.gpu_mem for k, mp in p.modes.items()}
    if not fits[chosen] and fits[other]:
        lines.append(f"-> the config uses {'inverse recompute' if chosen == 'inverse' else 'plain autograd'}; "
                     f"set memory.inverse_recompute={str(other == 'inverse').lower()} to fit micro-batch {p.micro_batch}")
    return lines


def format_plan(p: Plan, cfg: Config) -> str:
    m, e = cfg.model, cfg.engine
    widths = m.widths or m.width
    out = [f"plan: {p.config or 'config'} on {p.gpus} GPU(s) x {gib(p.gpu_mem)} GiB "
           f"(ZeRO-{e.zero_stage}, {e.precision}, {cfg.optim.name}{', EMA' if cfg.optim.ema_decay > 0 else ''})",
           f"model: {m.preset} L={m.levels} K={m.steps} width={widths}, {p.params / 1e6:,.2f}M parameters, "
           f"input {cfg.data.channels}x{cfg.data.image_size}x{cfg.data.image_size} {cfg.data.n_bits}-bit",
           "", "per level (activation bytes per image):", "",
           "| level | C x H x W | width | params | saved plain MB | saved inverse MB | largest step graph MB |",
           "|---|---|---|---|---|---|---|"]
    for i, lv in enumerate(p.levels):
        c, h, w = lv.shape
        out.append(f"| {i} | {c}x{h}x{w} | {lv.width} | {lv.params / 1e6:,.2f}M | {_mb(lv.saved_plain)} | "
                   f"{_mb(lv.saved_inverse)} | {_mb(lv.step_graph)} |")
    out += ["", "model states per GPU:", "", "| part | GiB |", "|---|---|"]
    out += [f"| {k} | {gib(v)} |" for k, v in p.states.items() if v]
    mp0 = next(iter(p.modes.values()))
    out += [f"| reserve (CUDA context, workspaces) | {gib(mp0.reserve)} |", "",
            f"per GPU at micro-batch b (activations x {1 + mp0.fragmentation:.2f} for allocator fragmentation):", "",
            "| mode | activations GiB/image | total GiB at b=1 | "
            + (f"total GiB at b={p.micro_batch} (configured) | " if p.micro_batch else "") + "largest micro-batch |",
            "|---|---|---|" + ("---|" if p.micro_batch else "") + "---|"]
    for name, mp in p.modes.items():
        row = f"| {name} | {gib(mp.per_image)} | {gib(mp.total_bytes(1))} | "
        if p.micro_batch:
            row += f"{gib(mp.total_bytes(p.micro_batch))} | "
        out.append(row + f"{mp.max_micro_batch} |")
    if p.flops:
        f = p.flops
        g = lambda v: f"{v / 1e9:,.1f}" if v >= 1e10 else f"{v / 1e9:.3g}"
        out += ["", f"FLOPs per image: forward {g(f['forward'])} G; training step {g(f['train_plain'])} G "
                    f"plain, {g(f['train_inverse'])} G with inverse recompute "
                    f"({f['train_inverse'] / f['train_plain']:.2f}x)"]
    out += [""] + verdict(p, cfg)
    return "\n".join(out)


SUMMARY_HEADER = ("| config | model | params | ZeRO, precision | micro-batch | plain GiB | inverse GiB | "
                  "max micro-batch plain / inverse | train GFLOP/image |\n|---|---|---|---|---|---|---|---|---|")


def summary_row(p: Plan, cfg: Config) -> str:
    m = cfg.model
    widths = "/".join(map(str, m.widths)) if m.widths else str(m.width)
    b = p.micro_batch
    at = {k: (gib(mp.total_bytes(b)) + ("" if mp.total_bytes(b) <= p.gpu_mem else " (no)")) if b else "-"
          for k, mp in p.modes.items()}
    g = p.flops["train_plain"] / 1e9 if p.flops else None
    fl = "-" if g is None else f"{g:,.0f}" if g >= 10 else f"{g:.2g}"
    return (f"| {Path(p.config).stem} | {m.preset} L={m.levels} K={m.steps} w={widths} | {p.params / 1e6:,.1f}M | "
            f"{cfg.engine.zero_stage}, {cfg.engine.precision} | {b} | {at['plain']} | {at['inverse']} | "
            f"{p.modes['plain'].max_micro_batch} / {p.modes['inverse'].max_micro_batch} | {fl} |")


OPTIONS_HEADER = ("| ZeRO | precision | model states GiB | plain GiB | inverse GiB | max micro-batch plain / inverse | |\n"
                  "|---|---|---|---|---|---|---|")


def best_option(options: list[tuple[int, str, Plan]], mode: str) -> tuple[int, str] | None:
    """(stage, precision) of the plan whose ``mode`` ("plain" / "inverse") takes the largest
    micro-batch, ties broken by the smaller peak at the configured micro-batch, then the lower
    stage (less communication)."""
    if not options:
        return None

    def key(o):
        stage, _, p = o
        mp = p.modes[mode]
        return (-mp.max_micro_batch, mp.total_bytes(p.micro_batch) if p.micro_batch else 0, stage)

    stage, precision, _ = min(options, key=key)
    return stage, precision


def option_row(stage: int, precision: str, p: Plan | None, refused: str | None, best: bool) -> str:
    if p is None:
        return f"| {stage} | {precision} | refused: {refused} | | | | |"
    b = p.micro_batch
    at = {k: (gib(mp.total_bytes(b)) + ("" if mp.total_bytes(b) <= p.gpu_mem else " (no)")) if b else "-"
          for k, mp in p.modes.items()}
    return (f"| {stage} | {precision} | {gib(sum(p.states.values()))} | {at['plain']} | {at['inverse']} | "
            f"{p.modes['plain'].max_micro_batch} / {p.modes['inverse'].max_micro_batch} | {'<- best' if best else ''} |")
