"""``flowscale bench step``: DeepSpeed step time against a plain torch loop, and throughput with
and without inverse recompute, for one model config (default: the demo model).

Cases, each in its own subprocess, measured in one run:

    torch        a plain loop: forward, bits/dim, backward, clip, torch optimizer step
    deepspeed    flowscale's train_step on a DeepSpeed engine (ZeRO stage from the config)
    ds+inverse   the same with memory.inverse_recompute=true

Prints a markdown table with the median step time over ``--steps`` timed steps (after
warm-up), images/s and the ratio to the plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CASES = ("torch", "deepspeed", "ds+inverse")


def run_case(case: str, config: str | None, overrides: list[str], steps: int, warmup: int) -> dict:
    import torch

    from ...build import build_initialized_flow, build_optimizer, build_training, pick_device
    from ...config import load_config
    from ...data import build_datasets
    from ...distributed import cleanup, init_distributed
    from ...engine import train_step
    from ...loss import training_loss

    extra = ["memory.inverse_recompute=true"] if case == "ds+inverse" else []
    cfg = load_config(config, list(overrides) + extra + ["wandb.mode=disabled"])
    device = pick_device(cfg.train.device)
    train_x, _ = build_datasets(cfg.data)
    init = train_x[:cfg.train.init_batch_size]
    batches = [(train_x[i * cfg.data.batch_size:(i + 1) * cfg.data.batch_size], None) for i in range(4)]
    info = None
    if case == "torch":  # the reference: the same model, objective and optimizer in a plain torch loop
        flow, _ = build_initialized_flow(cfg, init, device)
        opt, schedule = build_optimizer(cfg, flow.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        loss_fn = training_loss(cfg, device, torch.float32)

        def step(i):
            opt.zero_grad(set_to_none=True)
            loss_fn(flow, *batches[i % 4])[0].backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), cfg.optim.grad_clip)
            opt.step()
            sched.step()
    else:
        info = init_distributed(cfg.engine.backend, cfg.train.device)
        run = build_training(cfg, info, init, device)
        loss_fn = training_loss(cfg, device, run.dtype)

        def step(i):
            train_step(run.engine, batches[i % 4], loss_fn)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(warmup):
        step(i)
    sync()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
    if info is not None:
        cleanup()
    med = statistics.median(times)
    return {"case": case, "step_s": med, "images_per_s": cfg.data.batch_size / med, "batch": cfg.data.batch_size,
            "device": str(device)}


def run(args) -> int:
    import torch

    _normalise(args)
    rows = []
    for case in args.cases:
        cmd = [sys.executable, "-m", "flowscale.tools.bench.step", "--one", case, "--steps", str(args.steps),
               "--warmup", str(args.warmup), *([args.config] if args.config else []), *args.overrides]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            rows.append({"case": case, "error": (p.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  {case}: " + (r["error"] if "error" in r else f"{r['step_s']:.4f} s/step"), file=sys.stderr, flush=True)
    base = next((r for r in rows if r["case"] == "torch" and "error" not in r), None)
    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"step time, config {args.config or 'demo defaults'} {' '.join(args.overrides)}; {machine}; "
          f"torch {torch.__version__}; median of {args.steps} steps after {args.warmup} warm-up")
    print()
    print("| case | step s | images/s | x torch loop |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | error: {r['error']} | | |")
        else:
            ratio = f"{r['step_s'] / base['step_s']:.3f}" if base else "-"
            print(f"| {r['case']} | {r['step_s']:.4f} | {r['images_per_s']:.1f} | {ratio} |")
    return 0


def _normalise(args) -> None:
    if args.config and "=" in args.config:  # only overrides were given
        args.overrides, args.config = [args.config, *args.overrides], None


def _add_args(p) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: the demo defaults)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--steps", type=int, default=20, help="timed steps per case (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default: 3)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("step", help="DeepSpeed step time vs a plain torch loop; with/without inverse recompute",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(p)
    p.set_defaults(func=run)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    _add_args(ap)
    ap.add_argument("--one", required=True, choices=CASES)
    a = ap.parse_args()
    _normalise(a)
    print(json.dumps(run_case(a.one, a.config, a.overrides, a.steps, a.warmup)))
