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

    from ..config import load_config
    from ..data import build_datasets
    from ..data.quantize import preprocess
    from ..distributed import cleanup, init_distributed, seed_everything
    from ..engine import initialize, train_step
    from ..flows.actnorm import initialize_actnorm
    from ..loss import flow_bpd
    from ..train import build_model, build_optimizer

    extra = ["memory.inverse_recompute=true"] if case == "ds+inverse" else []
    cfg = load_config(config, list(overrides) + extra + ["wandb.mode=disabled"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = init_distributed(cfg.engine.backend) if case != "torch" else None
    seed_everything(cfg.train.seed)
    train_x, _ = build_datasets(cfg.data)
    flow = build_model(cfg, device)
    initialize_actnorm(flow, preprocess(train_x[:cfg.train.init_batch_size], cfg.data.n_bits).to(device))
    opt, schedule = build_optimizer(cfg, flow.parameters())
    batches = [train_x[i * cfg.data.batch_size:(i + 1) * cfg.data.batch_size] for i in range(4)]

    if case == "torch":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

        def step(i):
            batch = batches[i % 4].to(device)
            opt.zero_grad(set_to_none=True)
            bpd, _ = flow_bpd(flow, batch, cfg.data.n_bits)
            bpd.mean().backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), cfg.optim.grad_clip)
            opt.step()
            sched.step()
    else:
        engine = initialize(cfg, flow, opt, lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule), info.world_size)

        def step(i):
            train_step(engine, batches[i % 4], None, cfg, i)

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
        cmd = [sys.executable, "-m", "flowscale.bench.step", "--one", case, "--steps", str(args.steps),
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
