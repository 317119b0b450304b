"""``flowscale bench zero``: inverse recompute under every DeepSpeed setting, against plain autograd.

Runs ``--nproc`` ranks under torchrun (gloo on CPU, nccl on GPU) in one process group. Each
case builds a tiny Glow through :func:`flowscale.build.build_training`, the setup of
``flowscale train``, and takes ``--steps`` real optimizer steps with
:func:`flowscale.engine.train_step` on the same batches and the same dequantisation noise.
For each case it reports:

    grad_err     max over parameters of |g - g_ref| / |g_ref| for the first step's full
                 (gathered) gradient, g_ref = ZeRO-0 plain autograd in fp32 (the first case)
    loss_err     max over steps of |loss - loss_ref| / |loss_ref|
    hooks        post-accumulate-grad hook firings per parameter per backward, "min-max"
                 (1-1 is right; DeepSpeed's ZeRO-1/2/3 gradient hooks are of this kind)
    saved@K      bytes saved for backward by the first micro-batch's forward at each depth K
                 of ``--depths`` (parameters excluded), measured under the engine

A case is ``[PRESET:]STAGE-PRECISION-MODE`` (preset glow unless named) plus optional
``+setting`` suffixes:
``+accum2`` (engine.grad_accum=2), ``+overlap`` / ``+nooverlap``, ``+nocontig``,
``+bucket1k`` (reduce and allgather buckets of 1000 elements), ``+persist0`` (ZeRO-3
partitions every parameter), ``+prefetch0`` (ZeRO-3 without prefetching). MODE is ``plain``,
``inverse`` (memory.inverse_recompute) or ``ckpt`` (memory.checkpoint_steps).

``--matrix`` runs every preset x ZeRO stage x precision x memory mode for one step each: each
combination trains, or is refused when its config is read (the row says the field and why).
With inverse recompute the training loop's reconstruction check runs too (collective).

    flowscale bench zero                        # the default cases, a markdown table
    flowscale bench zero --matrix --depths 2 --steps 1
    flowscale bench zero --cases 2-fp32-inverse 3-bf16-inverse+persist0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

DEFAULT_CASES = (
    "0-fp32-plain", "0-fp32-inverse", "1-fp32-inverse", "2-fp32-inverse", "3-fp32-inverse",
    "1-fp32-inverse+overlap", "2-fp32-inverse+nooverlap", "2-fp32-inverse+accum2", "2-fp32-inverse+bucket1k",
    "2-fp32-inverse+nocontig", "3-fp32-inverse+persist0", "3-fp32-inverse+persist0+prefetch0",
    "3-fp32-inverse+accum2+persist0",
    "0-bf16-plain", "0-bf16-inverse", "1-bf16-inverse", "2-bf16-plain", "2-bf16-inverse", "3-bf16-plain",
    "3-bf16-inverse+persist0",
)
"""The reference (ZeRO-0 plain fp32) first; bf16 rows are compared with it too, next to plain bf16."""

SETTINGS = {
    "accum2": ["engine.grad_accum=2"],
    "overlap": ["engine.overlap_comm=true"],
    "nooverlap": ["engine.overlap_comm=false"],
    "nocontig": ["engine.contiguous_gradients=false"],
    "bucket1k": ["engine.reduce_bucket_size=1000", "engine.allgather_bucket_size=1000"],
    "persist0": ["engine.param_persistence_threshold=0"],
    "prefetch0": ["engine.prefetch_bucket_size=0"],
}
MODES = {"plain": [], "inverse": ["memory.inverse_recompute=true"], "ckpt": ["memory.checkpoint_steps=true"]}


PRESETS = ("nice", "realnvp", "glow", "dlf", "jet", "tarflow")
PRESET_SHAPE = {"jet": ["model.patch_size=4", "model.vit_heads=2", "model.vit_depth=1"],
                "tarflow": ["model.patch_size=4", "model.vit_heads=2", "model.vit_depth=1"]}
"""Tiny transformer flows: 8x8 images in 2x2 tokens of 4x4 patches."""


def matrix_cases() -> list[str]:
    """Every preset x ZeRO stage x precision x memory mode, ZeRO-0 plain fp32 Glow first."""
    cases = ["glow:0-fp32-plain"]
    for preset in PRESETS:
        for stage in range(4):
            for precision in ("fp32", "bf16"):
                for mode in MODES:
                    case = f"{preset}:{stage}-{precision}-{mode}"
                    if case not in cases:
                        cases.append(case)
    return cases


def case_overrides(case: str, k: int, width: int, size: int, batch: int) -> list[str]:
    """The config overrides of a case name ``[PRESET:]STAGE-PRECISION-MODE[+setting...]`` (see
    the module docstring; the preset defaults to glow)."""
    preset, _, case = case.rpartition(":")
    preset = preset or "glow"
    head, *extras = case.split("+")
    stage, precision, mode = head.split("-")
    out = [f"model.preset={preset}", "model.levels=2", f"model.steps={k}", f"model.width={width}",
           *PRESET_SHAPE.get(preset, []),
           f"data.image_size={size}", f"data.batch_size={batch}", f"engine.zero_stage={stage}",
           f"engine.precision={precision}", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.grad_clip=0",
           "wandb.mode=disabled", "train.progress=false", *MODES[mode]]
    for e in extras:
        if e not in SETTINGS:
            raise SystemExit(f"bench zero: unknown case setting '+{e}' in '{case}' (known: {', '.join(SETTINGS)})")
        out += SETTINGS[e]
    return out


# -- the worker (one per rank, under torchrun) ---------------------------------------------------

def _full_grads(engine) -> dict:
    """{name: float64 full gradient} on every rank, whatever the ZeRO stage (collective)."""
    import torch
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        out[name] = (g if g is not None else torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape)).double().cpu()
    return out


def run_case(case: str, args, info, reference: dict | None) -> dict:
    """Build the case's engine, take args.steps steps, measure (see the module docstring)."""
    import torch

    from ...build import build_training
    from ...config import ConfigError, load_config
    from ...distributed import max_over_ranks
    from ...engine import train_step
    from ...reconstruction import UnstableSteps, reconstruction_tolerance
    from ...loss import sample_noise, training_loss

    row = {"case": case}
    per_depth = {}
    for k in args.depths:
        try:
            cfg = load_config(None, case_overrides(case, k, args.width, args.size, args.batch))
        except ConfigError as e:  # refused when the config is read: the field and the reason
            return {"case": case, "refused": str(e)}, None
        c, s = cfg.data.channels, cfg.data.image_size
        g = torch.Generator().manual_seed(1234)
        images = torch.randint(0, 256, (args.steps, args.batch, c, s, s), dtype=torch.uint8, generator=g)
        init = torch.randint(0, 256, (16, c, s, s), dtype=torch.uint8, generator=g).chunk(info.world_size)[info.rank]
        run = build_training(cfg, info, init, torch.device("cpu"))
        engine, module = run.engine, run.module
        loss_fn = training_loss(cfg, run.device, run.dtype)
        counts: dict[int, int] = {}
        handles = [p.register_post_accumulate_grad_hook(lambda p: counts.__setitem__(id(p), counts.get(id(p), 0) + 1))
                   for p in module.parameters() if p.requires_grad]
        firings, grads, saved = [], None, []
        backward = engine.backward

        def counted_backward(loss, *a, **kw):
            counts.clear()
            out = backward(loss, *a, **kw)
            firings.append([counts.get(id(p), 0) for p in module.parameters() if p.requires_grad])
            return out

        step = engine.step

        def capturing_step(*a, **kw):
            nonlocal grads
            if grads is None and engine.is_gradient_accumulation_boundary():
                grads = _full_grads(engine)
            return step(*a, **kw)

        def measured_loss(model, x, y, u=None, g=None):
            if saved:  # the first micro-batch only
                return loss_fn(model, x, y, u, g)
            from ...inverse_checkpoint import saved_activation_bytes

            n, out = saved_activation_bytes(lambda: loss_fn(model, x, y, u, g), module=module)
            saved.append(n)
            return out

        engine.backward, engine.step = counted_backward, capturing_step
        rows = range(info.rank * args.batch // info.world_size, (info.rank + 1) * args.batch // info.world_size)
        losses = []
        for t in range(args.steps if k == args.depths[0] else 1):
            x = images[t][rows.start:rows.stop]
            u, _ = sample_noise(cfg.train.seed, t, rows, (c, s, s))
            m = train_step(engine, (x, None, u), measured_loss)
            losses.append(float(m["loss"]))
        if cfg.memory.inverse_recompute:  # the training loop's reconstruction check, collective as there
            unstable = UnstableSteps(reconstruction_tolerance(None, run.dtype), "store", run.layout["micro"], True)
            health, _ = unstable.check(module, (images[0][rows.start:rows.stop].float() / 256 - 0.5).to(run.dtype),
                                       0, reduce=max_over_ranks)
            row["recon_stored_steps"] = health["recon_stored_steps"]
        for h in handles:
            h.remove()
        engine.backward, engine.step = backward, step
        flat = [n for f in firings for n in f]
        per_depth[k] = {"saved": saved[0], "hooks": (min(flat), max(flat)), "losses": losses, "grads": grads,
                        "params": len(firings[0]), "skipped": m["skipped"], "firings": sum(firings[0])}
        row["skipped"] = max(row.get("skipped", 0), m["skipped"])
        engine.destroy()
        del engine, run, module
    first = per_depth[args.depths[0]]
    row.update(hooks_min=min(d["hooks"][0] for d in per_depth.values()),
               hooks_max=max(d["hooks"][1] for d in per_depth.values()),
               params=first["params"], firings=first["firings"], losses=first["losses"],
               saved={str(k): d["saved"] for k, d in per_depth.items()})
    if reference is not None and reference["grads"].keys() == first["grads"].keys():
        ref = reference["grads"]
        errs = [((first["grads"][n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref]
        total = (sum(((first["grads"][n] - ref[n]) ** 2).sum() for n in ref) ** 0.5
                 / sum((ref[n] ** 2).sum() for n in ref) ** 0.5).item()
        row.update(grad_err=max(errs), grad_err_global=total,
                   loss_err=max(abs(a - b) / abs(b) for a, b in zip(first["losses"], reference["losses"])))
    return row, first


def worker(args) -> int:
    """One rank: every case in one process group; rank 0 writes the rows as JSON."""
    from ...distributed import cleanup, init_distributed

    info = init_distributed("auto")
    rows, reference = [], None
    try:
        for case in args.cases:
            try:
                row, first = run_case(case, args, info, reference)
            except Exception as e:  # one broken combination must not hide the others
                row, first = {"case": case, "error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]}, None
            if reference is None and first is not None:
                reference = {"grads": first["grads"], "losses": first["losses"]}
                row.update(grad_err=0.0, grad_err_global=0.0, loss_err=0.0)
            rows.append(row)
            if info.rank == 0:
                print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        cleanup()
    if info.rank == 0:
        with open(args.worker_out, "w") as f:
            json.dump(rows, f)
    return 0


# -- the command ---------------------------------------------------------------------------------

def format_table(rows: list[dict], depths) -> str:
    head = ("| case | grad err (max param) | grad err (global) | loss err | hook firings per param "
            "per backward | " + " | ".join(f"saved @K={k}" for k in depths) + " |")
    lines = [head, "|" + "---|" * (5 + len(depths))]
    for r in rows:
        if "error" in r or "refused" in r:
            what = f"error: {r['error']}" if "error" in r else f"refused: {r['refused']}"
            lines.append(f"| {r['case']} | {what} |" + " |" * (3 + len(depths)))
            continue
        if "grad_err" not in r:  # another preset than the reference: trained, not compared
            r = {**r, "grad_err": float("nan"), "grad_err_global": float("nan"), "loss_err": float("nan")}
        saved = " | ".join(f"{r['saved'][str(k)]:,} B" for k in depths)
        lines.append(f"| {r['case']} | {r['grad_err']:.2e} | {r['grad_err_global']:.2e} | {r['loss_err']:.2e} | "
                     f"{r['hooks_min']}-{r['hooks_max']} ({r['firings']} for {r['params']} params) | {saved} |")
    return "\n".join(lines)


def run(args) -> int:
    if getattr(args, "matrix", False):
        args.cases = matrix_cases()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
               f"--master_port={args.port}", "-m", "flowscale.tools.bench.zero", "--worker-out", out,
               "--cases", *args.cases, "--depths", *map(str, args.depths), "--steps", str(args.steps),
               "--width", str(args.width), "--size", str(args.size), "--batch", str(args.batch)]
        env = {**os.environ, "TMPDIR": tmp}
        env.setdefault("DS_ACCELERATOR", "cpu")
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0 or not os.path.exists(out):
            print(f"bench zero: the workers failed (exit {p.returncode}):\n{p.stderr[-3000:]}", file=sys.stderr)
            return 1
        with open(out) as f:
            rows = json.load(f)
    print(f"Glow L=2 K={args.depths[0]} width {args.width}, {args.size}x{args.size}x3, global batch {args.batch} on "
          f"{args.nproc} ranks, {args.steps} steps; reference: the first case")
    print(format_table(rows, args.depths))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _add_args(p) -> None:
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="[PRESET:]STAGE-PRECISION-MODE[+setting...] "
                   "(see `python -m flowscale.tools.bench.zero --help`); the first is the reference")
    p.add_argument("--matrix", action="store_true", help="every preset x ZeRO stage x precision x memory mode "
                   "(replaces --cases): trains or is refused when the config is read")
    p.add_argument("--depths", nargs="+", type=int, default=[2, 8], help="flow steps per level K; the gradients "
                   "and losses are measured at the first, saved bytes at each (default: 2 8)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per case (default: 3)")
    p.add_argument("--width", type=int, default=8, help="coupling network width (default: 8)")
    p.add_argument("--size", type=int, default=8, help="image size (default: 8)")
    p.add_argument("--batch", type=int, default=8, help="global batch (default: 8)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default: 2)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("zero", help="inverse recompute under ZeRO 0-3, fp32/bf16, overlap, accumulation: "
                              "gradients against plain autograd, hook firings, saved bytes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(p)
    p.add_argument("--port", type=int, default=29512, help="rendezvous port (default: 29512)")
    p.set_defaults(func=run)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m flowscale.tools.bench.zero", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(ap)
    ap.add_argument("--worker-out", required=True)
    sys.exit(worker(ap.parse_args()))
