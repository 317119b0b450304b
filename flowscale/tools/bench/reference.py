"""``flowscale bench reference --ref PATH``: flowscale's Glow against an external reference Glow,
side by side in one process.

The reference is code you fetch yourself (the project contains no peer code), e.g.
rosinality/glow-pytorch's ``model.py``; ``--ref`` is that file or its folder. Its ``Glow(in_channel,
n_flow, n_block, affine, conv_lu)`` is built at the same architecture as flowscale's ``glow``
preset with LU 1x1 convs (32x32x3, L levels, K steps, hidden width), the parameter counts are
printed and must agree to 1% (else the command refuses: the two would not be the same model).

Every step is ``zero_grad -> loss -> backward -> Adam step`` at fp32 on the same uint8 batch
(each side's own Adam: flowscale's training optimizer, torch's fused Adam; the reference's
train.py's ``torch.optim.Adam``),
dequantised with the same noise stream and scored with flowscale's bits/dim
(:func:`flowscale.loss.bits_per_dim`). flowscale's two models come from the one setup
function every run uses (:func:`flowscale.build.build_initialized_flow`, same seed, with and
without ``memory.inverse_recompute``) and are scored by :func:`flowscale.loss.objective`.
After warm-up, the three cases alternate single steps, rotating the order each round, so a
shared machine's load hits them alike; the table gives medians as ratios to the reference.

``--per-level`` (default on) times each level's chain of steps alone, forward + backward
with plain autograd and with inverse recompute, and its forward alone without a graph (F).
The floor of inverse recompute is one extra forward pass: overhead (inverse - plain) / plain
>= F / (F + B) = F / plain, printed beside the measured overhead.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import platform
import statistics
import sys
import time
from pathlib import Path

MIB = 2 ** 20
CASES = ("reference", "plain", "inverse", "plain_folded", "inverse_folded")


class ReferenceMismatch(ValueError):
    """The reference and flowscale's model are not the same size: timing them side by side is meaningless."""


def load_reference(path: str | Path):
    """Import the reference ``model.py`` (a file, or a folder holding it) as a module."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.py"
    if not path.is_file():
        raise FileNotFoundError(f"--ref: no reference model file at {path} (give model.py or its folder)")
    spec = importlib.util.spec_from_file_location("flowscale_bench_reference_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "Glow"):
        raise ReferenceMismatch(f"--ref: {path} defines no Glow class (expected rosinality/glow-pytorch's model.py)")
    return mod


def build_reference(mod, k: int, levels: int, width: int, seed: int = 0):
    """The reference Glow (affine coupling, LU 1x1 conv) with K steps per level, L levels and
    hidden width ``width``. Its coupling takes the width as the default of ``filter_size``,
    which is set on the loaded module (the reference's Glow does not pass it through)."""
    import torch

    coupling = getattr(mod, "AffineCoupling", None)
    if coupling is not None and "filter_size" in inspect.signature(coupling.__init__).parameters:
        sig = inspect.signature(coupling.__init__)
        defaults = [width if name == "filter_size" else p.default
                    for name, p in sig.parameters.items() if p.default is not inspect.Parameter.empty]
        coupling.__init__.__defaults__ = tuple(defaults)
    elif width != 512:
        raise ReferenceMismatch(f"--width {width}: the reference's coupling has no filter_size to set")
    torch.manual_seed(seed)
    import numpy as np

    np.random.seed(seed)  # its LU 1x1 convs draw their rotations from numpy
    return mod.Glow(3, k, levels, affine=True, conv_lu=True)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_param_counts(n_reference: int, n_flowscale: int, tolerance: float = 0.01) -> float:
    """Relative difference of the counts; raises :class:`ReferenceMismatch` above ``tolerance``."""
    diff = abs(n_flowscale - n_reference) / max(n_reference, 1)
    if diff > tolerance:
        raise ReferenceMismatch(
            f"parameter counts differ by {100 * diff:.2f}% (reference {n_reference:,}, flowscale {n_flowscale:,}), "
            f"more than {100 * tolerance:.0f}%: not the same architecture, so no timing is reported. "
            f"Check --K/--levels/--width against the reference's constructor.")
    return diff


def flowscale_config(k: int, levels: int, width: int, batch: int, inverse: bool):
    """The config of flowscale's side: the glow preset with LU 1x1 convs, 32x32x3, fp32."""
    from ...config import load_config

    return load_config(None, ["model.preset=glow", "model.permutation=invconv_lu", f"model.levels={levels}",
                              f"model.steps={k}", f"model.width={width}", "data.image_size=32", "data.channels=3",
                              f"data.batch_size={batch}", "engine.precision=fp32", "optim.name=adam", "optim.lr=1e-7",
                              f"memory.inverse_recompute={str(inverse).lower()}", "wandb.mode=disabled"])


def build_cases(k: int, levels: int, width: int, batch: int, ref_module=None, seed: int = 0,
                fold: bool = False) -> dict:
    """{case: (model, optimizer, step function)} for the reference (when given) and flowscale's
    plain and inverse-recompute models, ActNorm initialised on the same uint8 images. ``fold``:
    also both with their coupling networks' ActNorms folded into the convs
    (:func:`flowscale.flows.nets.fold_norms`), as "plain_folded" and "inverse_folded"."""
    import torch

    from ... import seeds
    from ...build import build_initialized_flow, build_optimizer
    from ...data.quantize import preprocess
    from ...flows.nets import fold_norms
    from ...loss import bits_per_dim, objective

    g = torch.Generator().manual_seed(seed)
    init = torch.randint(0, 256, (4 * batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    x_uint8 = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    cases = {}
    for case in ("plain", "inverse", "plain_folded", "inverse_folded")[:4 if fold else 2]:
        cfg = flowscale_config(k, levels, width, batch, case.startswith("inverse"))
        flow, _ = build_initialized_flow(cfg, init)
        fold_norms(flow, case.endswith("_folded"))
        opt, _ = build_optimizer(cfg, flow.parameters())  # Adam at a constant tiny LR: only the cost is measured
        noise = seeds.generator(seed, "bench")

        def loss_fn(flow=flow, noise=noise, n_bits=cfg.data.n_bits):
            return objective(flow, x_uint8, n_bits, noise=noise).loss

        cases[case] = (flow, opt, loss_fn)
    if ref_module is not None:
        ref = build_reference(ref_module, k, levels, width, seed)
        with torch.no_grad():  # the reference initialises its ActNorms lazily, on its first forward
            ref(preprocess(init, 8, generator=seeds.generator(seed, "actnorm_init", 0)))
        noise = seeds.generator(seed, "bench")

        def ref_loss(ref=ref, noise=noise):
            x = preprocess(x_uint8, 8, generator=noise)
            log_p, logdet, _ = ref(x)
            return bits_per_dim(log_p, logdet, x[0].numel(), 8).mean()

        cases["reference"] = (ref, torch.optim.Adam(ref.parameters(), lr=1e-7), ref_loss)  # its train.py's optimizer
    return {c: cases[c] for c in CASES if c in cases}


def time_alternating(cases: dict, repeats: int, warmup: int) -> dict:
    """Seconds of every timed training step, per case, the cases alternating single steps in
    this process (order rotated every round)."""
    import torch

    def step(case):
        _, opt, loss_fn = cases[case]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        for case in cases:
            step(case)
    order, times = list(cases), {c: [] for c in cases}
    for r in range(repeats):
        for case in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            loss = step(case)
            times[case].append(time.perf_counter() - t0)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{case}: non-finite loss {loss.item()} in a timed step")
    return times


def saved_mib(cases: dict) -> dict:
    """MiB of activations each case saves for backward in one forward (parameters excluded)."""
    from ...inverse_checkpoint import saved_activation_bytes

    out = {}
    for case, (model, opt, loss_fn) in cases.items():
        nbytes, loss = saved_activation_bytes(loss_fn, exclude=list(model.parameters()))
        loss.backward()
        opt.zero_grad(set_to_none=True)
        out[case] = nbytes / MIB
    return out


def level_inputs(flow, x):
    """The input of each level's chain of steps for data x, as the chain sees it (:meth:`Flow.walk`)."""
    import torch

    with torch.no_grad():
        return [p.h_in for p in flow.walk(x)]


def time_levels(flow, x, repeats: int, warmup: int = 1) -> list[dict]:
    """Per level of a plain (not wrapped) flow: median ms of its chain's forward without a graph
    (F), forward + backward with plain autograd, and with inverse recompute, alternating."""
    import torch

    from ...inverse_checkpoint import InvertibleSequence

    rows = []
    for i, (level, h) in enumerate(zip(flow.step_chains(), level_inputs(flow, x))):
        chains = {"plain": level.steps, "inverse": InvertibleSequence(level.steps)}
        g = torch.Generator().manual_seed(i)
        grad_z = torch.randn(h.shape, generator=g) * 1e-3
        grad_ld = torch.full((h.shape[0],), 1e-3)

        def run(mode):
            if mode == "forward":
                with torch.no_grad():
                    level.steps(h)
                return
            x_in = h.clone().requires_grad_(True)
            z, ld = chains[mode](x_in)
            torch.autograd.backward([z, ld], [grad_z, grad_ld])

        modes = ("forward", "plain", "inverse")
        for _ in range(warmup):
            for m in modes:
                run(m)
        times = {m: [] for m in modes}
        for r in range(repeats):
            for m in modes[r % 3:] + modes[:r % 3]:
                t0 = time.perf_counter()
                run(m)
                times[m].append(time.perf_counter() - t0)
        for p in flow.parameters():
            p.grad = None
        med = {m: 1e3 * statistics.median(v) for m, v in times.items()}
        rows.append({"level": i, "shape": tuple(h.shape[1:]), "forward_ms": med["forward"],
                     "plain_ms": med["plain"], "inverse_ms": med["inverse"]})
    return rows


def profile_tables(cases: dict, rows: int = 30) -> dict:
    """{case: torch.profiler op table (self CPU time) of one training step}, after one untimed step."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for case, (_, opt, loss_fn) in cases.items():
        for _ in range(2):  # the second step is profiled
            opt.zero_grad(set_to_none=True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                loss_fn().backward()
                opt.step()
        out[case] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return out


def measure(k: int, levels: int, width: int, batch: int, repeats: int, warmup: int, ref_module=None,
            per_level: bool = True, level_repeats: int = 5, profile_dir: Path | None = None,
            fold: bool = False) -> dict:
    """One K: parameter counts (checked), step medians, saved MiB, per-level overheads; with
    ``profile_dir``, a torch.profiler op table per case written there first."""
    cases = build_cases(k, levels, width, batch, ref_module, fold=fold)
    counts = {c: count_params(m) for c, (m, _, _) in cases.items()}
    if "reference" in cases:
        check_param_counts(counts["reference"], counts["plain"])
    row = {"k": k, "levels": levels, "width": width, "batch": batch, "params": counts, "fold": fold}
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        for case, table in profile_tables(cases).items():
            (profile_dir / f"profile_k{k}_w{width}_{case}.txt").write_text(
                f"torch.profiler, one training step (forward + backward + Adam), {case}, K={k}, L={levels}, "
                f"width {width}, batch {batch}, fp32, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{table}\n")
    row["saved_mib"] = saved_mib(cases)
    times = time_alternating(cases, repeats, warmup)
    row["step_ms"] = {c: 1e3 * statistics.median(v) for c, v in times.items()}
    row["fastest_ms"] = {c: 1e3 * min(v) for c, v in times.items()}  # the step least disturbed by other load
    if per_level:
        import torch

        from ...data.quantize import preprocess

        flow = cases["plain"][0]
        x = preprocess(torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8), 8)
        row["levels_ms"] = time_levels(flow, x, level_repeats)
    return row


def format_table(rows: list[dict]) -> str:
    """The markdown tables: step times as ratios to the reference (``-`` without one), saved
    activations, and (when measured) the per-level inverse-recompute overhead against its floor."""
    lines = ["| K | params ref / flowscale | reference plain ms | flowscale plain (x ref) | flowscale inverse (x ref) "
             "| inverse / plain | saved MiB plain | saved MiB inverse |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms, mib, n = r["step_ms"], r["saved_mib"], r["params"]
        ref = ms.get("reference")
        for v in ("", "_folded"):
            if "plain" + v not in ms:
                continue
            p, i = "plain" + v, "inverse" + v
            x = (lambda c: f"{ms[c]:.0f} ms ({ms[c] / ref:.2f}x)") if ref else (lambda c: f"{ms[c]:.0f} ms (-)")
            lines.append(f"| {r['k']}{' folded' if v else ''} | {_m(n.get('reference'))} / {_m(n[p])} "
                         f"| {f'{ref:.0f}' if ref else '-'} | {x(p)} | {x(i)} | {ms[i] / ms[p]:.2f}x "
                         f"| {mib[p]:.1f} | {mib[i]:.1f} |")
    fastest = [r for r in rows if "fastest_ms" in r]
    if fastest:
        lines += ["", "Fastest step of each case (on a shared machine, the one least disturbed by other load), "
                  "as a ratio to the reference's fastest:", ""]
        for r in fastest:
            f = r["fastest_ms"]
            ref = f.get("reference")
            lines.append(f"- K={r['k']}: " + ", ".join(
                f"{c} {f[c]:.0f} ms" + (f" ({f[c] / ref:.2f}x)" if ref and c != "reference" else "") for c in f))
    level_rows = [(r["k"], lv) for r in rows for lv in r.get("levels_ms", [])]
    if level_rows:
        lines += ["", "Inverse recompute per level (chain of K steps alone, forward + backward; F = forward without a graph):",
                  "", "| K | level | input C x H x W | F ms | plain ms | inverse ms | overhead (inv - plain) / plain "
                  "| floor F / plain | x floor |", "|---|---|---|---|---|---|---|---|---|"]
        for k, lv in level_rows:
            over, floor = lv["inverse_ms"] / lv["plain_ms"] - 1, lv["forward_ms"] / lv["plain_ms"]
            lines.append(f"| {k} | {lv['level']} | {'x'.join(map(str, lv['shape']))} | {lv['forward_ms']:.1f} "
                         f"| {lv['plain_ms']:.1f} | {lv['inverse_ms']:.1f} | {100 * over:.0f}% | {100 * floor:.0f}% "
                         f"| {(1 + over) / (1 + floor):.2f} |")
        lines += ["", "Cost model: inverse recompute runs every step's forward twice (once without a graph, once "
                  "inside backward), so its floor is (2F + B) / (F + B) = 1 + F / plain; ~1.33x when a conv's "
                  "backward costs twice its forward. 'x floor' = inverse / (plain + F)."]
    return "\n".join(lines)


def _m(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def run(args) -> int:
    import torch

    ref_module = None
    if args.ref:
        try:
            ref_module = load_reference(args.ref)
        except (FileNotFoundError, ReferenceMismatch) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    rows = []
    for k in args.K:
        try:
            row = measure(k, args.levels, args.width, args.batch, args.repeats, args.warmup, ref_module,
                          per_level=not args.no_per_level, level_repeats=args.level_repeats,
                          profile_dir=Path(args.profile) if args.profile else None, fold=args.fold_norms)
        except ReferenceMismatch as e:
            print(f"error: K={k}: {e}", file=sys.stderr)
            return 2
        n = row["params"]
        print(f"  K={k}: parameters " + ", ".join(f"{c} {v:,}" for c, v in n.items()) + "; step ms "
              + ", ".join(f"{c} {v:.0f}" for c, v in row["step_ms"].items()), file=sys.stderr, flush=True)
        rows.append(row)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Glow 32x32x3, L={args.levels}, width {args.width}, affine coupling, LU 1x1 conv, batch {args.batch}, fp32, "
          f"forward + backward + Adam (flowscale fused, reference torch.optim.Adam as in its train.py); reference "
          f"{args.ref or '(none)'}; {machine}; torch {torch.__version__}; "
          f"median of {args.repeats} alternating steps after {args.warmup} warm-up; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load:.1f} at the end")
    print()
    print(format_table(rows))
    return 0


def _add_args(p) -> None:
    p.add_argument("--ref", default=None,
                   help="the reference model.py (or its folder), e.g. a clone of rosinality/glow-pytorch; "
                        "without it only flowscale's cases are timed")
    p.add_argument("--K", type=int, nargs="+", default=[8, 32], help="steps per level (default: 8 32)")
    p.add_argument("--levels", type=int, default=3, help="L (default: 3)")
    p.add_argument("--width", type=int, default=512, help="coupling network width (default: 512)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds, one step per case each (default: 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    p.add_argument("--no-per-level", action="store_true", help="skip the per-level inverse-recompute overheads")
    p.add_argument("--level-repeats", type=int, default=5, help="timed rounds per level (default: 5)")
    p.add_argument("--fold-norms", action="store_true",
                   help="also time flowscale with its coupling networks' ActNorms folded into the convs "
                        "(GlowNet.fold_norms; rows 'K folded')")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also write a torch.profiler op table of one step per case and K to DIR")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reference", help="flowscale's Glow vs an external reference Glow (path), side by side",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(p)
    p.set_defaults(func=run)
