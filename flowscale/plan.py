"""``flowscale plan``: what a config needs per GPU, predicted without allocating anything.

The flow is built on the meta device (shapes and dtypes, no storage) and one training forward
is traced there, so the numbers come from the same code that trains, not from a second model
of it:

* **activations**: every tensor autograd saves for backward is counted once per storage
  (``saved_tensors_hooks``), attributed to the level and flow step that saved it. Traced at
  micro-batches 1 and 2; every per-image tensor scales linearly, so bytes(b) = fixed + b * slope.
  With inverse recompute only each level's output is saved, but backward rebuilds one step's
  graph at a time, so that mode adds the largest single step's graph on top.
* **model states** (parameters, gradients, fp32 master weights, optimizer moments, EMA and
  DeepSpeed's gradient buckets) follow from the parameter count, the precision and the ZeRO
  stage, as DeepSpeed 0.19 allocates them (see :func:`model_state_bytes`).
* **FLOPs** per image: ``torch.utils.flop_counter``'s per-op formulas over a forward and a full training
  step (forward + backward, which includes the inverse passes of inverse recompute).

The per-GPU peak is ``model states + reserve + (1 + fragmentation) * activations(b)``; the
largest micro-batch is the largest ``b`` under the GPU's memory. ``reserve`` stands for what
no tensor accounts for (CUDA context, cuDNN/cuBLAS workspaces, NCCL buffers); ``fragmentation``
for the caching allocator's rounding and split blocks. ``flowscale bench gpu`` measures the
real peak next to this prediction.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .config import Config, ConfigError, load_config

GIB = 2 ** 30
DEFAULT_RESERVE = 2 * GIB
DEFAULT_FRAGMENTATION = 0.10
# Workspace cuDNN/cuBLAS take inside a convolution's backward (64 MiB on the H100 runs in
# docs/bench/memory_h100.json: the measured peak minus everything else, the same at every K).
CUDA_WORKSPACE = 64 * 2 ** 20
# DeepSpeed's defaults (runtime/zero/config.py): ZeRO-1/2 allocate one gradient bucket of
# reduce_bucket_size elements; ZeRO-3 keeps up to prefetch_bucket_size gathered elements live.
DS_REDUCE_BUCKET = int(5e8)
DS_PREFETCH_BUCKET = int(5e7)
_OPT_MOMENTS = {"adam": 2, "adamw": 2, "adamax": 2}  # exp_avg + exp_avg_sq / exp_inf, fp32


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


# -- tracing on the meta device -----------------------------------------------------------------

def meta_flow(cfg: Config, inverse: bool, dtype: torch.dtype | None = None):
    """The config's flow on the meta device, in the training dtype, optionally with inverse recompute."""
    from .engine import model_dtype
    from .flows.models import build_flow
    from .inverse_checkpoint import inverse_checkpoint

    with torch.device("meta"):
        flow = build_flow(cfg.model, cfg.data.channels, cfg.data.image_size)
    flow = flow.to(dtype or model_dtype(cfg))
    return inverse_checkpoint(flow, enabled=inverse, levels=cfg.memory.recompute_levels)


def _labelled(flow):
    """Forward hooks that keep a stack of labels: ("level", i, k) inside step k of level i,
    ("level", i, None) elsewhere in level i (split prior, the chain wrapper), ("top",) in the
    top prior and ("other",) outside (loss, dequantisation)."""
    stack: list[tuple] = [("other",)]
    handles = []

    def watch(module, label):
        def enter(m, args):
            stack.append(label)

        def leave(m, args, out):  # returns None: the output is left alone
            stack.pop()

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))

    for i, level in enumerate(flow.levels):
        watch(level.steps, ("level", i, None))
        for k, step in enumerate(level.steps):
            watch(step, ("level", i, k))
        if level.prior is not None:
            watch(level.prior, ("level", i, None))
    if flow.top_prior is not None:
        watch(flow.top_prior, ("top",))
    return stack, handles


def saved_bytes_by_label(flow, x: torch.Tensor, y: torch.Tensor | None = None,
                         n_bits: int = 8) -> tuple[dict[tuple, int], int]:
    """Run the training forward (bits/dim) under autograd and count the bytes it saves for
    backward: ({label: bytes}, largest single saved storage). Parameters are not counted.
    Works on any device; on meta nothing is allocated."""
    from .loss import flow_bpd_dequantized

    params = {p.untyped_storage()._cdata for p in flow.parameters()}
    seen: dict[int, tuple[int, tuple]] = {}
    stack, handles = _labelled(flow)

    def pack(t):
        st = t.untyped_storage()
        key = st._cdata  # one StorageImpl per allocation, shared by its views
        if key not in params and key not in seen:
            seen[key] = (st.nbytes(), stack[-1])
        return t

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            bpd, _ = flow_bpd_dequantized(flow, x, n_bits, y)
    finally:
        for h in handles:
            h.remove()
    by_label: dict[tuple, int] = {}
    for nbytes, label in seen.values():
        by_label[label] = by_label.get(label, 0) + nbytes
    del bpd
    return by_label, max((n for n, _ in seen.values()), default=0)


def _inputs(cfg: Config, batch: int, dtype: torch.dtype, device="meta"):
    d = cfg.data
    x = torch.empty(batch, d.channels, d.image_size, d.image_size, dtype=dtype, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device) if cfg.model.num_classes > 0 else None
    return x, y


class _FlopCount(TorchDispatchMode):
    """Sums ``torch.utils.flop_counter``'s per-op FLOP formulas (convolutions, matrix products)
    over every op dispatched; unlike FlopCounterMode it tracks no module hierarchy, which is
    slower and trips over views made under no_grad."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import FlopCounterMode

        self.registry = FlopCounterMode().flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def count_flops(flow, cfg: Config, backward: bool) -> float:
    """FLOPs of one image through ``flow`` (a forward pass, or forward + backward), counted on
    the meta device (convolutions and matrix products, 2 per multiply-add)."""
    from .loss import flow_bpd_dequantized

    x, y = _inputs(cfg, 1, next(flow.parameters()).dtype)
    with _FlopCount() as counter, torch.set_grad_enabled(backward):
        bpd, _ = flow_bpd_dequantized(flow, x, cfg.data.n_bits, y)
        if backward:
            bpd.sum().backward()
    flow.zero_grad(set_to_none=True)
    return float(counter.total)


# -- the plan ------------------------------------------------------------------------------------

@dataclass
class LevelPlan:
    """Per-level numbers; bytes are per image (the slope in the micro-batch)."""

    shape: tuple[int, int, int]
    """(C, H, W) of the level's steps (after the squeeze)."""
    width: int
    params: int
    saved_plain: int
    """Bytes per image saved for backward with plain autograd."""
    saved_inverse: int
    """Bytes per image saved with inverse recompute (the level's output; plain where the level is excluded)."""
    step_graph: int
    """Bytes per image of the largest single step's graph (what inverse recompute rebuilds at once)."""


@dataclass
class ModePlan:
    """Memory of one backprop mode. Backward walks the levels from the top (coarsest) down, so
    the activation peak is the largest of one candidate per level l: what is still saved for
    levels <= l, the graph being rebuilt at l (inverse recompute), plus the parameter gradients
    of levels >= l already produced. Each candidate is linear in the micro-batch b:
    ``fixed + b * per_image`` bytes."""

    mode: str
    candidates: list[tuple[int, int]]
    """(fixed, per_image) bytes of the activation peak candidates (see :func:`plan`)."""
    saved: tuple[int, int]
    """(fixed, per_image) bytes autograd saves for backward in the forward pass (all levels)."""
    static: int
    """Model states (parameters, persistent gradients, master weights, moments, EMA, buckets)."""
    reserve: int
    fragmentation: float
    gpu_mem: int
    max_micro_batch: int = 0

    @property
    def per_image(self) -> int:
        """Activation bytes per additional image (the largest slope)."""
        return max(p for _, p in self.candidates)

    def saved_bytes(self, b: int) -> int:
        """Bytes saved for backward by the forward pass at micro-batch b (what autograd holds when backward starts)."""
        return self.saved[0] + b * self.saved[1]

    def activation_bytes(self, b: int) -> int:
        """Peak bytes of activations, activation gradients and in-flight parameter gradients at micro-batch b."""
        return max(f + b * p for f, p in self.candidates)

    def total_bytes(self, b: int) -> int:
        """Predicted peak per-GPU bytes at micro-batch ``b``."""
        return int(self.static + self.reserve + (1 + self.fragmentation) * self.activation_bytes(b))

    def largest_fitting(self) -> int:
        """The largest micro-batch with total_bytes(b) <= gpu_mem (0 if not even 1 fits)."""
        if self.total_bytes(1) > self.gpu_mem:
            return 0
        lo, hi = 1, 2
        while self.total_bytes(hi) <= self.gpu_mem and hi < 2 ** 40:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # total_bytes is non-decreasing in b
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.total_bytes(mid) <= self.gpu_mem else (lo, mid)
        return lo


@dataclass
class Plan:
    config: str
    gpus: int
    gpu_mem: int
    micro_batch: int
    """The config's own micro-batch per GPU: data.batch_size / (gpus x engine.grad_accum) (0 if it does not divide)."""
    params: int
    states: dict[str, int]
    """Model-state bytes per GPU by part (see model_state_bytes)."""
    levels: list[LevelPlan]
    modes: dict[str, ModePlan]
    flops: dict[str, float]
    """FLOPs per image: forward, train_plain, train_inverse."""

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("config", "gpus", "gpu_mem", "micro_batch", "params", "states", "flops")}
        d["levels"] = [vars(lv) for lv in self.levels]
        d["modes"] = {m: {**vars(p), "total_bytes_at_micro_batch": p.total_bytes(self.micro_batch) if self.micro_batch else None}
                      for m, p in self.modes.items()}
        return d


def model_state_bytes(n_params: int, precision: str, zero_stage: int, gpus: int, optimizer: str = "adam",
                      ema: bool = False) -> dict[str, int]:
    """Per-GPU bytes of everything that scales with the parameter count (and DeepSpeed's reduce
    bucket) at the backward peak, as DeepSpeed 0.19 holds it under flowscale's engine config (a
    torch optimizer, no ``grad_accum_dtype``: gradients are reduced in the training dtype).
    Measured against a real engine in tests/test_plan_states.py.

    P parameters, N = gpus, w = 4 (fp32) or 2 (bf16/fp16) bytes, B = reduce_bucket_size = 5e8:

        stage  parameters        gradients  fp32 master   moments  buckets
        0      wP                -          4P if bf16    8P       -
        1      wP                wP/N (b)   4P/N          8P/N     wB (a)
        2      wP                wP/N (b)   4P/N          8P/N     wB (a)
        3      wP/N + live (c)   wP/N       4P/N          8P/N     wB

    Parameters, fp32 master weights, moments and EMA live from start to end; so do ZeRO-3's
    gradient partition and reduce bucket (one flat buffer each, allocated at initialisation).

    (a) ZeRO-1/2 allocate their bucket at the first gradient of every backward and free it when
        backward ends: alive through all of backward, so at the peak (on CPU ``torch.empty`` of
        2 GB fp32 is paged in lazily; a GPU's caching allocator holds all of it).
    (b) The reduced gradient partition appears at the end of backward (next to the bucket it is
        flushed from) and is freed by the step, which first turns it into fp32 (4P/N, after the
        bucket is gone). ZeRO-2 keeps param.grad as views into the bucket.
    (c) ZeRO-3 keeps parameters of at most 1e5 elements (stage3_param_persistence_threshold)
        whole on every rank and gathers the others module by module, prefetching up to
        prefetch_bucket_size (5e7) elements: counted as w * min(P, 5e7) when N > 1 (at N = 1
        the partition is the parameter; nothing is gathered).

    At ZeRO-0/1 the wP of param.grad exists only from backward to the end of the step; the
    plan counts it with the activations (:class:`ModePlan`), level by level as backward makes it.
    bf16 (and fp16) ZeRO-0 wraps the torch optimizer in DeepSpeed's FP16_UnfusedOptimizer: a
    whole fp32 copy of the parameters on every rank (not partitioned), the moments on that copy,
    and fp32 gradients only inside the step. fp32 ZeRO-0 steps the torch optimizer on the
    parameters: moments 8P, no copy. The EMA shadow is a whole fp32 copy on every rank.
    """
    P, N = n_params, gpus
    w = 4 if precision == "fp32" else 2
    moments = _OPT_MOMENTS[optimizer] * 4
    low = precision != "fp32"
    s: dict[str, int] = {}
    if zero_stage == 0:
        s["parameters"] = w * P
        s["gradients"] = 0  # param.grad lives only from backward to the end of the step (counted in ModePlan)
        s["fp32 master weights"] = 4 * P if low else 0
        s["optimizer moments"] = moments * P
    elif zero_stage in (1, 2):
        s["parameters"] = w * P
        s["gradients"] = w * P // N
        s["fp32 master weights"] = 4 * P // N
        s["optimizer moments"] = moments * P // N
        s["gradient buckets"] = w * DS_REDUCE_BUCKET
    else:
        s["parameters"] = w * P // N
        s["gathered parameters"] = w * min(P, DS_PREFETCH_BUCKET) if N > 1 else 0
        s["gradients"] = w * P // N
        s["fp32 master weights"] = 4 * P // N
        s["optimizer moments"] = moments * P // N
        s["gradient buckets"] = w * DS_REDUCE_BUCKET
    s["EMA weights"] = 4 * P if ema else 0
    return {k: int(v) for k, v in s.items()}


def _level_sum(by_label: dict, level: int) -> int:
    return sum(v for k, v in by_label.items() if k[0] == "level" and k[1] == level)


def _max_step(by_label: dict, level: int) -> int:
    return max((v for k, v in by_label.items() if k[0] == "level" and k[1] == level and k[2] is not None), default=0)


def plan(cfg: Config, gpu_mem_bytes: int, gpus: int = 1, reserve_bytes: int = DEFAULT_RESERVE,
         fragmentation: float = DEFAULT_FRAGMENTATION, config_name: str = "", with_flops: bool = True) -> Plan:
    """Predict per-GPU memory of ``cfg`` on ``gpus`` GPUs of ``gpu_mem_bytes`` each, for plain
    autograd and inverse recompute (whatever ``cfg.memory.inverse_recompute`` says)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    from .engine import model_dtype
    from .inverse_checkpoint import inverse_checkpoint

    # One meta model, traced plain, then switched to inverse recompute in place and traced
    # again. Two micro-batches give the batch-independent part and the per-image slope exactly.
    meta = meta_flow(cfg, inverse=False)

    def trace(b: int):
        x, y = _inputs(cfg, b, model_dtype(cfg))
        return saved_bytes_by_label(meta, x, y, cfg.data.n_bits)

    plain = [trace(b) for b in (1, 2)]
    flops = {"forward": count_flops(meta, cfg, False), "train_plain": count_flops(meta, cfg, True)} if with_flops else {}
    inverse_checkpoint(meta, levels=cfg.memory.recompute_levels)
    inv = [trace(b) for b in (1, 2)]
    if with_flops:
        flops["train_inverse"] = count_flops(meta, cfg, True)

    def slope_fixed(v1: int, v2: int) -> tuple[int, int]:
        return v2 - v1, 2 * v1 - v2

    levels = []
    for i, shape in enumerate(meta.level_shapes(cfg.data.channels, cfg.data.image_size)):
        lv = meta.levels[i]
        n = sum(p.numel() for p in lv.parameters())
        levels.append(LevelPlan(shape=shape, width=cfg.model.level_width(i), params=n,
                                saved_plain=slope_fixed(_level_sum(plain[0][0], i), _level_sum(plain[1][0], i))[0],
                                saved_inverse=slope_fixed(_level_sum(inv[0][0], i), _level_sum(inv[1][0], i))[0],
                                step_graph=slope_fixed(_max_step(plain[0][0], i), _max_step(plain[1][0], i))[0]))
    n_params = sum(p.numel() for p in meta.parameters())
    states = model_state_bytes(n_params, cfg.engine.precision, cfg.engine.zero_stage, gpus, cfg.optim.name,
                               cfg.optim.ema_decay > 0)
    static = sum(states.values())
    # Parameter gradients that exist only during backward (ZeRO-0/1 put them on param.grad in
    # the training dtype and free them after the step; ZeRO-2/3 reduce them into the
    # partitions and buckets counted in the model states). Top-prior gradients come first.
    w = (4 if cfg.engine.precision == "fp32" else 2) if cfg.engine.zero_stage <= 1 else 0
    grads = [w * lv.params for lv in levels]
    grads[-1] += w * (n_params - sum(lv.params for lv in levels))
    recomputed = [i for i in range(cfg.model.levels)
                  if cfg.memory.recompute_levels is None or i in cfg.memory.recompute_levels]

    def candidates(traces, inverse: bool) -> list[tuple[int, int]]:
        """One peak candidate per point of backward: entering level l (levels > l done, their
        gradients made) for l = top .. 0, and the end (every gradient made)."""
        out = []
        for lvl in [*range(cfg.model.levels), None]:
            # Inverse recompute makes level lvl's gradients while its largest graph may still be
            # ahead (the first steps' graphs are rebuilt last), so it counts them; plain frees
            # level lvl's saved tensors as its gradients appear, so the two ends bound it.
            made = sum(grads) if lvl is None else sum(grads[lvl if inverse else lvl + 1:])
            at_b = []
            for j, (by_label, largest) in enumerate(traces):  # micro-batch 1, 2
                if inverse:
                    # Everything saved stays until the end (it is small); level lvl rebuilds one step at a time.
                    act = sum(by_label.values()) + (_max_step(plain[j][0], lvl) if lvl in recomputed else 0)
                else:
                    # Saved tensors of the levels above lvl were freed as backward went through them.
                    last = -1 if lvl is None else lvl
                    act = sum(v for k, v in by_label.items() if not (k[0] == "level" and k[1] > last))
                # The gradient of the tensor being backpropagated (about the largest saved
                # tensor) and the cuDNN/cuBLAS workspace of the convolution computing it.
                at_b.append(act + largest + CUDA_WORKSPACE + made)
            slope, fixed = slope_fixed(*at_b)
            out.append((fixed, slope))
        return out

    modes = {}
    for name, traces in (("plain", plain), ("inverse", inv)):
        slope, fixed = slope_fixed(*(sum(t[0].values()) for t in traces))
        mp = ModePlan(name, candidates(traces, name == "inverse"), (fixed, slope), static, reserve_bytes,
                      fragmentation, gpu_mem_bytes)
        mp.max_micro_batch = mp.largest_fitting()
        modes[name] = mp
    d = cfg.data
    micro = d.batch_size // (gpus * cfg.engine.grad_accum) if d.batch_size % (gpus * cfg.engine.grad_accum) == 0 else 0
    return Plan(config=config_name, gpus=gpus, gpu_mem=gpu_mem_bytes, micro_batch=micro, params=n_params,
                states=states, levels=levels, modes=modes, flops=flops)


# -- reporting -----------------------------------------------------------------------------------

def _gib(b: float) -> str:
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
        line = (f"{label}: micro-batch {p.micro_batch} needs {_gib(total)} GiB of {_gib(p.gpu_mem)} -> "
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
    out = [f"plan: {p.config or 'config'} on {p.gpus} GPU(s) x {_gib(p.gpu_mem)} GiB "
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
    out += [f"| {k} | {_gib(v)} |" for k, v in p.states.items() if v]
    mp0 = next(iter(p.modes.values()))
    out += [f"| reserve (CUDA context, workspaces) | {_gib(mp0.reserve)} |", "",
            f"per GPU at micro-batch b (activations x {1 + mp0.fragmentation:.2f} for allocator fragmentation):", "",
            "| mode | activations GiB/image | total GiB at b=1 | "
            + (f"total GiB at b={p.micro_batch} (configured) | " if p.micro_batch else "") + "largest micro-batch |",
            "|---|---|---|" + ("---|" if p.micro_batch else "") + "---|"]
    for name, mp in p.modes.items():
        row = f"| {name} | {_gib(mp.per_image)} | {_gib(mp.total_bytes(1))} | "
        if p.micro_batch:
            row += f"{_gib(mp.total_bytes(p.micro_batch))} | "
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
    at = {k: (_gib(mp.total_bytes(b)) + ("" if mp.total_bytes(b) <= p.gpu_mem else " (no)")) if b else "-"
          for k, mp in p.modes.items()}
    g = p.flops["train_plain"] / 1e9 if p.flops else None
    fl = "-" if g is None else f"{g:,.0f}" if g >= 10 else f"{g:.2g}"
    return (f"| {Path(p.config).stem} | {m.preset} L={m.levels} K={m.steps} w={widths} | {p.params / 1e6:,.1f}M | "
            f"{cfg.engine.zero_stage}, {cfg.engine.precision} | {b} | {at['plain']} | {at['inverse']} | "
            f"{p.modes['plain'].max_micro_batch} / {p.modes['inverse'].max_micro_batch} | {fl} |")


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
    results = []
    for path in configs:
        cfg = load_config(path, overrides)
        p = plan(cfg, mem, ns.gpus, reserve, ns.fragmentation, config_name=path or "defaults",
                 with_flops=not ns.no_flops)
        results.append((p, cfg))
    if ns.json:
        print(json.dumps([p.to_dict() for p, _ in results], indent=1, default=list))
    elif len(results) > 1 or ns.summary:
        print(f"per-GPU memory predicted by `flowscale plan` for {ns.gpus} GPU(s) x {_gib(mem)} GiB "
              f"(reserve {_gib(reserve)} GiB, fragmentation {ns.fragmentation:.0%}); "
              "micro-batch = data.batch_size / (GPUs x grad_accum); (no) = does not fit\n")
        print(SUMMARY_HEADER)
        for p, cfg in results:
            print(summary_row(p, cfg))
    else:
        print(format_plan(*results[0]))
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("plan", help="predict per-GPU memory, the largest micro-batch and FLOPs of a config (no GPU needed)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=__doc__ + "\nexamples:\n  flowscale plan configs/glow_celebahq1024.yaml --gpu-mem 80GB --gpus 8\n"
                                   "  flowscale plan configs/*.yaml --gpu-mem 80GB --gpus 8     (one summary row per config)\n"
                                   "  flowscale plan configs/glow_imagenet64.yaml engine.zero_stage=3 --gpus 64 --json")
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
    s.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster for very deep models)")
    s.set_defaults(func=cmd_plan)
