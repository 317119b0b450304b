"""``flowscale bench gpu``: step time, images/s and peak GPU memory of the paper configs at the
memory planner's batch size, against what the planner predicted.

For every config (default: every configs/*.yaml except demo.yaml) and every case

    fp32-plain     fp32, ordinary autograd
    fp32-inverse   fp32, memory.inverse_recompute=true
    bf16-plain     engine.precision=bf16
    bf16-inverse   bf16 and inverse recompute

the micro-batch per GPU is the planner's largest that fits in ``--gpu-mem`` (default: the
visible GPU's memory) for that mode, capped at ``--max-batch``; ``--same-batch`` runs the
inverse case at the plain case's batch instead, ``--micro-batch N`` skips the planner. A fresh
subprocess (its own CUDA allocator, so peak statistics are its own) then builds the model and
the DeepSpeed engine exactly as ``flowscale train`` does, on one GPU, and runs ``--warmup``
untimed and ``--steps`` timed ``train_step`` calls on random uint8 batches (no shards needed).

Reported per case: the median step time, images/s, the peak CUDA memory allocated and
reserved over the whole process (parameters, optimizer state, activations, temporaries: the
planner predicts the same total), its ratio to the planner's prediction, and for inverse
cases the step-time ratio to the plain case at the same precision and micro-batch. A case
that fails (out of memory, any error) becomes a row saying so. Writes
``gpu_<device>.md`` and ``gpu_<device>.json`` to ``--out``.

``--device cpu`` runs the same path on CPU (a smoke run; memory is then the growth of the
process's peak RSS, which the planner does not model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path

CASES = ("fp32-plain", "fp32-inverse", "bf16-plain", "bf16-inverse")
def default_configs() -> list[str]:
    """Every bundled config but the demo (they ship inside the package)."""
    from ...config import list_configs

    return [str(p) for name, p in list_configs().items() if name != "demo"]


def case_config(path: str, overrides: list[str], case: str, micro_batch: int | None = None):
    """The config of one case: the user's overrides, then the case's precision and recompute,
    then data.batch_size = micro_batch * grad_accum (one rank: DeepSpeed's micro-batch is micro_batch)."""
    from ...config import load_config

    precision, mode = case.split("-")
    # Only the cost of a step is measured; a tiny LR keeps a deep flow on random batches from
    # diverging to skipped (non-finite) steps, whose timings would be meaningless. The user may override it.
    ov = ["optim.lr=1e-7", *overrides, "wandb.mode=disabled", f"engine.precision={precision}",
          f"memory.inverse_recompute={str(mode == 'inverse').lower()}"]
    cfg = load_config(path, ov)
    if micro_batch is None:
        return cfg
    return load_config(path, ov + [f"data.batch_size={micro_batch * cfg.engine.grad_accum}"])


def run_case(path: str, overrides: list[str], case: str, micro_batch: int, steps: int, warmup: int,
             device: str) -> dict:
    """One case, in this process (the environment holds a one-rank rendezvous). Returns the numbers."""
    import resource

    import torch

    from ...build import build_training
    from ...distributed import cleanup, init_distributed
    from ...engine import train_step
    from ...loss import training_loss

    cfg = case_config(path, overrides, case, micro_batch)
    dev = torch.device(device)
    info = init_distributed(cfg.engine.backend, dev.type)
    try:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after the imports
        c, s, b = cfg.data.channels, cfg.data.image_size, cfg.data.batch_size
        init = torch.randint(0, 256, (min(micro_batch, 16), c, s, s), dtype=torch.uint8)
        run = build_training(cfg, info, init, dev)  # as flowscale train does (the init runs without a graph)
        loss_fn = training_loss(cfg, dev, run.dtype)
        n_params = run.n_params
        n_cls = cfg.model.num_classes
        batches = [(torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8),
                    torch.randint(0, n_cls, (b,)) if n_cls > 0 else None) for _ in range(2)]

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize()

        times, skipped, metrics = [], 0, {}
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            metrics = train_step(run.engine, batches[i % 2], loss_fn)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                skipped += metrics["skipped"]
        if skipped:  # a skipped step does no backward or optimizer work
            raise FloatingPointError(f"{skipped} of {steps} timed steps were skipped (non-finite loss or gradient): "
                                     f"the timing is meaningless; lower optim.lr")
        out = {"step_s": statistics.median(times), "images_per_s": b / statistics.median(times),
               "bpd": metrics["bpd"], "params": n_params, "device": str(dev)}
        if dev.type == "cuda":
            free, total = torch.cuda.mem_get_info(dev)  # device-wide: includes the CUDA context
            out.update(peak_bytes=torch.cuda.max_memory_allocated(dev), reserved_bytes=torch.cuda.max_memory_reserved(dev),
                       device_used_bytes=total - free)
        else:
            out.update(peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0,
                       reserved_bytes=None, device_used_bytes=None)
        return out
    finally:
        cleanup()


def probe(device: str) -> dict:
    """The machine and versions. For cuda call it in a subprocess: the parent stays off the GPU,
    so no CUDA context of its own takes memory from the cases."""
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": version("deepspeed")}
    if device == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        props = torch.cuda.get_device_properties(0) if n else None
        out.update(count=n, name=props.name if n else None, total_memory=props.total_memory if n else 0)
    else:
        out.update(count=1, name=f"cpu {platform.processor() or platform.machine()}",
                   cores=os.cpu_count(), total_memory=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return out


def plan_cases(args, path: str, gpu_mem: int) -> dict:
    """{case: {"micro_batch", "planned_bytes"}} for one config; {"error"} where no batch could be chosen."""
    out = {}
    for precision in dict.fromkeys(c.split("-")[0] for c in args.cases):
        cases = [c for c in args.cases if c.startswith(precision + "-")]
        try:
            cfg = case_config(path, args.override, f"{precision}-plain")
        except Exception as e:  # a bad config or override: every case of it is an error row
            out.update({c: {"error": _one_line(e)} for c in cases})
            continue
        try:
            from ..plan import plan

            p, plan_error = plan(cfg, gpu_mem, 1, with_flops=False), None  # FLOPs are not needed here
        except Exception as e:  # with --micro-batch the planner only fills the "planned" column
            p, plan_error = None, f"planner: {_one_line(e)}"
        for case in cases:
            mode = case.split("-")[1]
            if args.micro_batch:
                b = args.micro_batch
            elif p is None:
                out[case] = {"error": plan_error}
                continue
            else:
                src = "plain" if args.same_batch else mode
                b = min(p.modes[src].max_micro_batch, args.max_batch)
                if b <= 0:
                    out[case] = {"error": "planner: does not fit" + (" (plain mode, --same-batch)" if src != mode else "")}
                    continue
            out[case] = {"micro_batch": b, "accum": cfg.engine.grad_accum,
                         "planned_bytes": p.modes[mode].total_bytes(b) if p is not None else None,
                         "planner_max_micro_batch": p.modes[mode].max_micro_batch if p is not None else None,
                         "planned_reserve_bytes": getattr(p.modes[mode], "reserve", None) if p is not None else None}
    return out


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]


def _subprocess(args, path: str, case: str, micro_batch: int) -> dict:
    from ...distributed import _free_port

    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), PYTHONUNBUFFERED="1")
    if args.device == "cpu":  # DeepSpeed must be told before it is imported; hide any GPU
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    else:
        env["DS_ACCELERATOR"] = "cuda"
    cmd = [sys.executable, "-m", "flowscale.tools.bench.gpu", "--one", case, "--configs", path,
           "--override", *args.override, "--micro-batch", str(micro_batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.case_timeout} s"}
    # DeepSpeed logs to stdout too: the result is the last line that is a JSON object.
    for line in reversed(p.stdout.strip().splitlines()):
        try:
            res = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(res, dict):
            return res
    tail = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}, no output"])[-1]
    if "out of memory" in p.stderr.lower():
        return {"error": f"OOM at micro-batch {micro_batch}"}
    if p.returncode < 0:  # killed by a signal: the host's OOM killer, most often
        return {"error": f"killed by signal {-p.returncode} ({tail[:200]})"}
    return {"error": tail[:300]}


def add_ratios(rows: list[dict]) -> None:
    """inverse step time / plain step time, same config, precision and micro-batch, where both ran."""
    plain = {(r["path"], r["precision"], r.get("micro_batch")): r for r in rows
             if r["recompute"] == "plain" and "error" not in r}
    for r in rows:
        p = plain.get((r["path"], r["precision"], r.get("micro_batch")))
        if r["recompute"] == "inverse" and "error" not in r and p is not None:
            r["x_plain_step"] = r["step_s"] / p["step_s"]


def format_table(rows: list[dict], device: str) -> str:
    gib = lambda b: f"{b / 2 ** 30:.2f}" if b is not None else "-"  # noqa: E731
    peak = "peak alloc GiB" if device == "cuda" else "peak RSS growth GiB"
    head = ["config", "precision", "recompute", "micro-batch", "planned GiB", peak, "measured/planned",
            "peak reserved GiB", "GPU used GiB", "step s", "images/s", "inverse x plain step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = r.get("micro_batch")
        mb = "-" if b is None else f"{b}" if r.get("accum", 1) == 1 else f"{b} x {r['accum']} accum"
        cells = [r["config"], r["precision"], r["recompute"], mb, gib(r.get("planned_bytes"))]
        if "error" in r:
            cells += [r["error"].replace("|", "\\|")] + [""] * (len(head) - len(cells) - 1)
        else:
            # RSS growth on CPU is no measure of what the planner predicts for a GPU
            ratio = r["peak_bytes"] / r["planned_bytes"] if r.get("planned_bytes") and device == "cuda" else None
            cells += [gib(r["peak_bytes"]), f"{ratio:.2f}" if ratio else "-", gib(r["reserved_bytes"]),
                      gib(r["device_used_bytes"]),
                      f"{r['step_s']:.4f}", f"{r['images_per_s']:.1f}",
                      f"{r['x_plain_step']:.2f}" if "x_plain_step" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> int:
    if args.device == "cpu":
        machine = probe("cpu")
    else:  # in a subprocess, so that this process never holds a CUDA context
        pr = subprocess.run([sys.executable, "-m", "flowscale.tools.bench.gpu", "--probe", "--device", "cuda"],
                            capture_output=True, text=True)
        if pr.returncode != 0:
            print(f"flowscale: error: could not read the GPU: {pr.stderr.strip()[-500:]}", file=sys.stderr)
            return 1
        machine = json.loads(pr.stdout.strip().splitlines()[-1])
    if args.device == "cuda" and machine["count"] == 0:
        print(f"flowscale: error: no CUDA device: torch {machine['torch']} (CUDA {machine['cuda']}) sees no GPU; "
              f"use --device cpu for a smoke run", file=sys.stderr)
        return 1
    if args.gpu_mem is not None:
        from ..plan import parse_bytes

        gpu_mem = parse_bytes(args.gpu_mem)
    else:
        gpu_mem = machine["total_memory"]
    configs = args.configs or default_configs()

    rows = []
    for path in configs:
        planned = plan_cases(args, path, gpu_mem)
        for case in args.cases:
            precision, mode = case.split("-")
            row = {"config": Path(path).stem, "path": path, "precision": precision, "recompute": mode, **planned[case]}
            if "error" not in row:
                row.update(_subprocess(args, path, case, row["micro_batch"]))
            rows.append(row)
            status = row["error"] if "error" in row else f"{row['step_s']:.4f} s/step, {row['peak_bytes'] / 2 ** 30:.2f} GiB"
            print(f"  {row['config']} {case} b={row.get('micro_batch', '-')}: {status}", file=sys.stderr, flush=True)
    add_ratios(rows)
    reserve = next((r["planned_reserve_bytes"] for r in rows if r.get("planned_reserve_bytes")), None)

    if args.device == "cuda":
        where = f"{machine['count']} x {machine['name']} ({machine['total_memory'] / 2 ** 30:.1f} GiB; cases run on GPU 0)"
        memory = ("peak alloc = torch.cuda.max_memory_allocated over the whole case process (parameters, optimizer "
                  "state, activations, temporaries), reserved = max_memory_reserved, GPU used = the device's memory "
                  "in use after the timed steps (total - free: adds the CUDA context); planned = the planner's "
                  "per-GPU peak, which includes its reserve for the CUDA context and workspaces"
                  + (f" ({reserve / 2 ** 30:.1f} GiB)" if reserve else ""))
    else:
        where = f"{machine['name']}, {machine['cores']} cores (CPU smoke run)"
        memory = "peak = growth of the process's peak RSS from before the model was built; reserved n/a"
    batch = (f"--micro-batch {args.micro_batch}" if args.micro_batch else
             f"the planner's largest for {gpu_mem / 2 ** 30:.1f} GiB, capped at {args.max_batch}"
             + ("; inverse at the plain mode's batch" if args.same_batch else ""))
    header = (f"flowscale bench gpu: {where}; {date.today().isoformat()}; torch {machine['torch']}, "
              f"deepspeed {machine['deepspeed']}, CUDA {machine['cuda']}")
    notes = (f"median of {args.steps} steps after {args.warmup} warm-up, one rank; micro-batch per GPU: {batch}; "
             f"overrides: {' '.join(args.override) or 'none'}; {memory}; 'inverse x plain step' = step time over "
             f"the plain case's at the same precision and micro-batch")
    table = format_table(rows, args.device)
    print(header + "\n\n" + notes + "\n\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_" + re.sub(r"[^a-z0-9]+", "_", machine["name"].lower()).strip("_")
    (out / f"{stem}.md").write_text(header + "\n\n" + notes + "\n\n" + table + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"header": header, "notes": notes, "machine": machine,
                                                  "gpu_mem_bytes": gpu_mem, "rows": rows}, indent=1))
    print(f"\nwrote {out / (stem + '.md')}, {out / (stem + '.json')}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("gpu", help="paper configs at the planner's batch: step time, images/s, peak GPU "
                                          "memory vs planned (fp32/bf16, with/without inverse recompute)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(p)
    p.set_defaults(func=run)


def _add_args(p) -> None:
    p.add_argument("--configs", nargs="+", default=None, metavar="YAML",
                   help="config files (default: every configs/*.yaml except demo.yaml)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted overrides applied to every config, e.g. engine.zero_stage=2")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, metavar="CASE",
                   help=f"cases to run, of {', '.join(CASES)} (default: all four)")
    p.add_argument("--micro-batch", type=int, default=None, metavar="N",
                   help="run every case at this micro-batch per GPU instead of the planner's")
    p.add_argument("--gpu-mem", default=None, metavar="BYTES",
                   help="memory to plan for, e.g. 80GB, 80GiB, 80e9 (default: the visible GPU's total memory)")
    p.add_argument("--max-batch", type=int, default=64, metavar="N", help="cap on the planner's micro-batch (default: 64)")
    p.add_argument("--same-batch", action="store_true",
                   help="run the inverse cases at the plain mode's planned batch (step times side by side)")
    p.add_argument("--steps", type=int, default=5, metavar="N", help="timed steps per case; the median is reported (default: 5)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed warm-up steps (default: 2)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default) or cpu (a smoke run of the same path)")
    p.add_argument("--case-timeout", type=int, default=1800, metavar="S",
                   help="give up on a case after this many seconds (default: 1800)")
    p.add_argument("--out", default="docs/bench", metavar="DIR", help="directory for gpu_<device>.md/.json (default: docs/bench)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    _add_args(ap)
    ap.add_argument("--one", choices=CASES, help="internal: run one case of the first config, print JSON")
    ap.add_argument("--probe", action="store_true", help="internal: print the machine as JSON")
    a = ap.parse_args()
    if a.probe:
        print(json.dumps(probe(a.device)))
        sys.exit(0)
    try:
        res = run_case(a.configs[0], a.override, a.one, a.micro_batch, a.steps, a.warmup, a.device)
    except Exception as e:
        import traceback

        import torch

        traceback.print_exc()
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        print(json.dumps({"error": f"OOM at micro-batch {a.micro_batch}" if oom else _one_line(e)}))
        sys.exit(1)
    print(json.dumps(res))
