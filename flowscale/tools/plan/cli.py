"""``flowscale plan CONFIG.yaml [...] [section.field=value ...]``: the command line."""

from __future__ import annotations

import argparse
import json
import re
import sys

from ...config import ConfigError, load_config
from . import DEFAULT_FRAGMENTATION, plan
from . import __doc__ as DESCRIPTION  # the package's docstring describes the command
from .report import OPTIONS_HEADER, SUMMARY_HEADER, best_option, format_plan, gib, option_row, summary_row


def parse_bytes(text: str | int | float) -> int:
    """'80GB', '80GiB', '500MB', '85e9' (bytes) -> bytes. GB and GiB both mean 2^30: a GPU sold
    as "80GB" has 80 GiB (A100) or a little less (H100: 79.6 GiB)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GB, 40GiB, 500MB or a byte count")
    value = float(m.group(1))
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(value * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[unit])


def cmd_plan(ns) -> int:
    configs = [a for a in ns.args if "=" not in a]
    overrides = [a for a in ns.args if "=" in a]
    if not configs:
        configs = [None]
    try:
        mem = parse_bytes(ns.gpu_mem)
        reserve = parse_bytes(ns.reserve)
    except ValueError as e:
        print(f"flowscale: error: {e}", file=sys.stderr)
        return 2
    if ns.options:
        return _options(ns, configs, overrides, mem, reserve)
    results = []
    for path in configs:
        cfg = load_config(path, overrides)
        p = plan(cfg, mem, ns.gpus, reserve, ns.fragmentation, config_name=path or "defaults",
                 with_flops=not ns.no_flops)
        results.append((p, cfg))
    if ns.json:
        print(json.dumps([p.to_dict() for p, _ in results], indent=1, default=list))
    elif len(results) > 1 or ns.summary:
        print(f"per-GPU memory predicted by `flowscale plan` for {ns.gpus} GPU(s) x {gib(mem)} GiB "
              f"(reserve {gib(reserve)} GiB, fragmentation {ns.fragmentation:.0%}); "
              "micro-batch = data.batch_size / (GPUs x grad_accum); (no) = does not fit\n")
        print(SUMMARY_HEADER)
        for p, cfg in results:
            print(summary_row(p, cfg))
    else:
        print(format_plan(*results[0]))
    return 0


def _options(ns, configs, overrides, mem: int, reserve: int) -> int:
    """Every ZeRO stage x precision of each config (its other settings kept), plain and inverse
    recompute side by side, the best marked (see :func:`best_option`)."""
    for path in configs:
        rows = []
        for stage in range(4):
            for precision in ("fp32", "bf16"):
                try:
                    cfg = load_config(path, [*overrides, f"engine.zero_stage={stage}", f"engine.precision={precision}"])
                except ConfigError as e:  # refused combination: say why
                    rows.append((stage, precision, None, None, str(e)))
                    continue
                rows.append((stage, precision, plan(cfg, mem, ns.gpus, reserve, ns.fragmentation,
                                                    config_name=path or "defaults", with_flops=False), cfg, None))
        cfg0 = load_config(path, overrides)
        mode = "inverse" if cfg0.memory.inverse_recompute else "plain"
        best = best_option([(r[0], r[1], r[2]) for r in rows if r[2] is not None], mode)
        print(f"{path or 'defaults'}: every ZeRO stage x precision on {ns.gpus} GPU(s) x {gib(mem)} GiB (configured: "
              f"ZeRO-{cfg0.engine.zero_stage} {cfg0.engine.precision}, "
              f"{'inverse recompute' if mode == 'inverse' else 'plain autograd'}); best for {mode} = the largest "
              f"micro-batch that fits, then the smallest peak at the configured one\n")
        print(OPTIONS_HEADER)
        for stage, precision, p, cfg, refused in rows:
            print(option_row(stage, precision, p, refused, (stage, precision) == best))
        print()
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("plan", help="predict per-GPU memory, the largest micro-batch and FLOPs of a config (no GPU needed)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=DESCRIPTION + "\nexamples:\n"
                                   "  flowscale plan configs/glow_celebahq1024.yaml --gpu-mem 80GB --gpus 8\n"
                                   "  flowscale plan configs/*.yaml --gpu-mem 80GB --gpus 8     (one summary row per config)\n"
                                   "  flowscale plan configs/glow_imagenet64.yaml engine.zero_stage=3 --gpus 64 --json\n"
                                   "  flowscale plan glow_celebahq256 --gpus 8 --options   (ZeRO 0-3 x fp32/bf16 side by side)")
    s.add_argument("args", nargs="*", metavar="[CONFIG.yaml ...] [section.field=value ...]",
                   help="one or more YAML configs (several: a summary table), then dotted overrides for all of them")
    s.add_argument("--gpu-mem", default="80GB", help="memory of one GPU, e.g. 80GB, 40GiB, 24GB (default: 80GB = 80 GiB)")
    s.add_argument("--gpus", type=int, default=1,
                   help="GPUs (data-parallel ranks) in the job: divides the global batch and ZeRO partitions (default: 1)")
    s.add_argument("--reserve", default="2GiB",
                   help="memory no tensor accounts for: CUDA context, cuDNN/cuBLAS workspaces, NCCL buffers (default: 2GiB)")
    s.add_argument("--fragmentation", type=float, default=DEFAULT_FRAGMENTATION,
                   help="extra fraction on activations for the caching allocator's fragmentation (default: 0.10)")
    s.add_argument("--summary", action="store_true", help="one summary row per config even for a single config")
    s.add_argument("--json", action="store_true", help="print the full plan(s) as JSON")
    s.add_argument("--options", action="store_true",
                   help="compare every ZeRO stage (0-3) x precision (fp32, bf16) of the config, plain autograd and "
                        "inverse recompute side by side, and mark the one that serves its memory mode best")
    s.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster for very deep models)")
    s.set_defaults(func=cmd_plan)
