"""``flowscale bench memory``: activation memory and step time of Glow under three backprop modes.

    plain       ordinary autograd: every step's activations are kept
    checkpoint  torch.utils.checkpoint around each flow step: keeps every step's input,
                recomputes the step's internals in backward
    inverse     flowscale's inverse recompute: keeps each level's output only, rebuilds
                inputs in backward by running the steps' inverses

For every (resolution, batch, K, mode) case a fresh subprocess builds the model, runs one
training step under ``torch.autograd.graph.saved_tensors_hooks`` to count the bytes saved
for backward (activations only: parameter storages are excluded), then times
``--repeats`` steps and reads the peak memory (process RSS on CPU; CUDA peak allocated on
GPU). Step times are then measured side by side: for each (resolution, batch, K) one more
subprocess builds the model once, copies it for every mode and alternates single training
steps between the modes (rotating the order each round), so load on a shared machine hits
all modes alike; the table's time ratios come from these medians (``--timing separate``
uses the per-case subprocess timings instead). Prints a markdown table with ratios to plain
autograd at the same K and writes a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "checkpoint", "inverse")
DEFAULT_CASES = ("64:16", "256:1")


def _levels_for(size: int) -> int:
    # openai/glow: 4 levels at 64x64 (ImageNet 64), 6 at 256x256 (CelebA-HQ 256).
    return {32: 3, 64: 4, 128: 5, 256: 6}.get(size, 3)


def run_case(size: int, batch: int, k: int, mode: str, width: int, repeats: int, device: str, seed: int = 0) -> dict:
    """One case, in this process. Returns the measured numbers."""
    import torch

    from ...config import ModelConfig
    from ...flows.actnorm import initialize_actnorm
    from ...flows.models import build_flow
    from ...inverse_checkpoint import checkpoint_steps, inverse_checkpoint, saved_activation_bytes
    from ...loss import flow_bpd_dequantized

    torch.manual_seed(seed)
    levels = _levels_for(size)
    flow = build_flow(ModelConfig(preset="glow", levels=levels, steps=k, width=width), 3, size).to(device)
    x = (torch.rand(batch, 3, size, size, device=device) - 0.5)
    initialize_actnorm(flow, x)
    if mode == "inverse":
        inverse_checkpoint(flow)
    elif mode == "checkpoint":
        checkpoint_steps(flow)
    # A tiny learning rate: only the cost of a step is measured, and a deep Glow at lr 1e-4
    # without warmup diverges within two steps on a fixed batch (bits/dim 8 -> 214 -> NaN).
    opt = torch.optim.Adam(flow.parameters(), lr=1e-7)
    params = list(flow.parameters())

    fb_peaks = []  # CUDA: peak of forward+backward above what was allocated before it

    def step():
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            base = torch.cuda.memory_allocated()  # parameters + optimizer state (grads are None)
            torch.cuda.reset_peak_memory_stats()
        bpd, _ = flow_bpd_dequantized(flow, x, 8)
        loss = bpd.mean()
        loss.backward()
        if device == "cuda":
            fb_peaks.append(torch.cuda.max_memory_allocated() - base)
        opt.step()
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Count saved bytes on a forward pass, then finish that step.
    nbytes, bpd = saved_activation_bytes(lambda: flow_bpd_dequantized(flow, x, 8)[0], exclude=params)
    bpd.mean().backward()
    opt.zero_grad(set_to_none=True)
    del bpd
    step()  # warm-up (allocates optimizer state)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss in the timed steps ({loss.item()}): the timing is meaningless")
    out = {"size": size, "batch": batch, "k": k, "levels": levels, "width": width, "mode": mode,
           "saved_bytes": nbytes, "step_s": statistics.median(times),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "rss_before_bytes": rss_before,
           "params": sum(p.numel() for p in params)}
    if device == "cuda":
        out["cuda_fwd_bwd_peak_bytes"] = max(fb_peaks)
        out["cuda_static_bytes"] = torch.cuda.memory_allocated()
    return out


def build_case(size: int, k: int, mode: str, width: int, device: str, seed: int = 0):
    """(flow, input batch builder) for one benchmark case; the same seed gives the same weights."""
    import torch

    from ...config import ModelConfig
    from ...flows.models import build_flow
    from ...inverse_checkpoint import checkpoint_steps, inverse_checkpoint

    torch.manual_seed(seed)
    flow = build_flow(ModelConfig(preset="glow", levels=_levels_for(size), steps=k, width=width), 3, size).to(device)
    return flow, (inverse_checkpoint if mode == "inverse" else checkpoint_steps if mode == "checkpoint" else None)


def time_interleaved(size: int, batch: int, k: int, modes, width: int, repeats: int, device: str,
                     seed: int = 0) -> dict:
    """Median step time per mode, the modes' steps alternating in one process (same weights, same batch)."""
    import copy

    import torch

    from ...flows.actnorm import initialize_actnorm
    from ...loss import flow_bpd_dequantized

    torch.manual_seed(seed)
    flow, _ = build_case(size, k, "plain", width, device, seed)
    x = (torch.rand(batch, 3, size, size, device=device) - 0.5)
    initialize_actnorm(flow, x)
    runs = {}
    for mode in modes:
        f = copy.deepcopy(flow)
        _, wrap = build_case(size, k, mode, width, device, seed)
        if wrap is not None:
            wrap(f)
        runs[mode] = (f, torch.optim.Adam(f.parameters(), lr=1e-7))

    def step(mode):
        f, opt = runs[mode]
        opt.zero_grad(set_to_none=True)
        bpd, _ = flow_bpd_dequantized(f, x, 8)
        bpd.mean().backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    for mode in modes:  # warm-up: optimizer state, allocator
        step(mode)
    times = {m: [] for m in modes}
    order = list(modes)
    for r in range(repeats):
        for mode in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            step(mode)
            times[mode].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def _subprocess_timing(args, size, batch, k) -> dict:
    cmd = [sys.executable, "-m", "flowscale.tools.bench.memory", "--time", f"{size}:{batch}:{k}", "--modes", *args.modes,
           "--width", str(args.width), "--repeats", str(args.repeats), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _subprocess_case(args, size, batch, k, mode) -> dict:
    cmd = [sys.executable, "-m", "flowscale.tools.bench.memory", "--one", f"{size}:{batch}:{k}:{mode}",
           "--width", str(args.width), "--repeats", str(args.repeats), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"size": size, "batch": batch, "k": k, "mode": mode, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_mb(b: float) -> str:
    return f"{b / 2 ** 20:,.1f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table; ratios are to plain autograd at the same size, batch and K."""
    plain = {(r["size"], r["batch"], r["k"]): r for r in rows if r["mode"] == "plain" and "error" not in r}
    first_k = {}
    for r in rows:
        if "error" not in r:
            key = (r["size"], r["batch"], r["mode"])
            first_k.setdefault(key, r)
    gpu = any("cuda_fwd_bwd_peak_bytes" in r for r in rows)
    side = any("step_s_isolated" in r for r in rows)
    head = ["size", "batch", "K", "mode", "saved act. MB", "x plain", "x own K=min",
            "fwd+bwd peak MB" if gpu else "peak RSS growth MB", "step s", "x plain time"]
    if side:
        head += ["isolated step s", "x plain (isolated)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['batch']} | {r['k']} | {r['mode']} | error: {r['error']} |")
            continue
        p = plain.get((r["size"], r["batch"], r["k"]))
        base = first_k[(r["size"], r["batch"], r["mode"])]
        peak = r.get("cuda_fwd_bwd_peak_bytes", r["peak_rss_bytes"] - r["rss_before_bytes"])
        lines.append("| " + " | ".join([
            str(r["size"]), str(r["batch"]), str(r["k"]), r["mode"], _fmt_mb(r["saved_bytes"]),
            f"{r['saved_bytes'] / p['saved_bytes']:.3f}" if p else "-",
            f"{r['saved_bytes'] / base['saved_bytes']:.2f}",
            _fmt_mb(peak), f"{r['step_s']:.3f}",
            f"{r['step_s'] / p['step_s']:.2f}" if p else "-"]
            + ([f"{r['step_s_isolated']:.3f}" if "step_s_isolated" in r else "-",
                f"{r['step_s_isolated'] / p['step_s_isolated']:.2f}" if p and "step_s_isolated" in r
                and "step_s_isolated" in p else "-"] if side else [])) + " |")
    kind = ("CUDA peak allocated during forward+backward above parameters and optimizer state "
            "(activations, gradients, temporaries)" if gpu else
            "growth of the process peak RSS over the training steps (after the model was built)")
    lines.append("")
    lines.append(f"peak mem = {kind}; 'x own K=min' = saved bytes relative to the same mode at the smallest K."
                 + (" 'step s' = median over steps alternating between the modes in one process (side by side);"
                    " 'isolated' = each case's own process, run one after another." if side else ""))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({(r["size"], r["batch"]) for r in rows if "error" not in r})
    fig, axes = plt.subplots(2, len(sizes), figsize=(5 * len(sizes), 7), squeeze=False)
    for j, (size, batch) in enumerate(sizes):
        for mode in MODES:
            pts = sorted((r["k"], r["saved_bytes"], r["step_s"]) for r in rows
                         if "error" not in r and r["mode"] == mode and (r["size"], r["batch"]) == (size, batch))
            if not pts:
                continue
            ks = [p[0] for p in pts]
            axes[0][j].plot(ks, [p[1] / 2 ** 20 for p in pts], marker="o", label=mode)
            axes[1][j].plot(ks, [p[2] for p in pts], marker="o", label=mode)
        axes[0][j].set_title(f"Glow {size}x{size}, batch {batch}")
        axes[0][j].set_ylabel("saved activations (MB)")
        axes[1][j].set_ylabel("step time (s)")
        for ax in axes[:, j]:
            ax.set_xlabel("K (steps per level)")
            ax.set_xscale("log", base=2)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> int:
    import torch

    cases = [tuple(int(v) for v in c.split(":")) for c in args.cases]
    rows = []
    for size, batch in cases:
        for k in args.ks:
            for mode in args.modes:
                r = _subprocess_case(args, size, batch, k, mode)
                rows.append(r)
                status = r.get("error") or f"saved {_fmt_mb(r['saved_bytes'])} MB, {r['step_s']:.3f} s/step"
                print(f"  {size}px b{batch} K={k} {mode}: {status}", file=sys.stderr, flush=True)
            if args.timing == "interleaved":
                side = _subprocess_timing(args, size, batch, k)
                for r in rows:
                    if (r["size"], r["batch"], r["k"]) == (size, batch, k) and "error" not in r and r["mode"] in side:
                        r["step_s_isolated"], r["step_s"] = r["step_s"], side[r["mode"]]
                print(f"  {size}px b{batch} K={k} side by side: " +
                      ", ".join(f"{m} {t:.3f} s" for m, t in side.items()), file=sys.stderr, flush=True)
    machine = (torch.cuda.get_device_name(0) if args.device == "cuda" else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    header = (f"Glow (L by size: 64->4, 256->6; width {args.width}) one training step, fp32, device {args.device} "
              f"({machine}), torch {torch.__version__}, median of {args.repeats} steps"
              + (", step times measured side by side (modes alternating in one process)"
                 if args.timing == "interleaved" else ", step times from separate processes"))
    table = format_table(rows)
    print(header)
    print()
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    (out / "memory.md").write_text(header + "\n\n" + table + "\n")
    plot(rows, out / "memory.png")
    print(f"\nwrote {out / 'memory.md'}, {out / 'memory.json'}, {out / 'memory.png'}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("memory", help="activation memory / step time: plain vs checkpoint vs inverse recompute",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(p)
    p.set_defaults(func=run)


def _add_args(p) -> None:
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="SIZE:BATCH",
                   help="resolution:batch pairs (default: 64:16 256:1)")
    p.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32], help="steps per level K (default: 4 8 16 32)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="backprop modes (default: all)")
    p.add_argument("--width", type=int, default=128, help="coupling network width (default: 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per case; the median is reported (default: 3)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    p.add_argument("--timing", default="interleaved", choices=["interleaved", "separate"],
                   help="step times from one process alternating the modes (default), or from each case's own process")
    p.add_argument("--out", default="bench_out", help="directory for memory.md/.json/.png (default: bench_out)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    _add_args(ap)
    ap.add_argument("--one", help="internal: SIZE:BATCH:K:MODE, run one case and print JSON")
    ap.add_argument("--time", help="internal: SIZE:BATCH:K, time the modes side by side and print JSON")
    a = ap.parse_args()
    if a.time:
        s, b, kk = (int(v) for v in a.time.split(":"))
        print(json.dumps(time_interleaved(s, b, kk, a.modes, a.width, a.repeats, a.device)))
    else:
        s, b, kk, m = a.one.split(":")
        print(json.dumps(run_case(int(s), int(b), int(kk), m, a.width, a.repeats, a.device)))
