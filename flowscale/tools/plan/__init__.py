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
  DeepSpeed's gradient buckets) follow from the parameter count, the precision, the ZeRO
  stage and the bucket sizes of the engine's generated DeepSpeed config, as DeepSpeed 0.19
  allocates them (see :func:`model_state_bytes`).
* **FLOPs** per image: ``torch.utils.flop_counter``'s per-op formulas over a forward and a full training
  step (forward + backward, which includes the inverse passes of inverse recompute).

The per-GPU peak is ``model states + reserve + (1 + fragmentation) * activations(b)``; the
largest micro-batch is the largest ``b`` under the GPU's memory. ``reserve`` stands for what
no tensor accounts for (CUDA context, cuDNN/cuBLAS workspaces, NCCL buffers); ``fragmentation``
for the caching allocator's rounding and split blocks. ``flowscale bench gpu`` measures the
real peak next to this prediction.
"""

# Here: plan() and its results. trace.py builds and traces the flow on meta (saved bytes, FLOPs),
# states.py the model-state formula, report.py the verdict and tables, cli.py the command (the
# docstring above is its description).

from __future__ import annotations

from dataclasses import dataclass

from ...config import Config, ConfigError
from ...engine import batch_layout, deepspeed_config, zero_optimization
from .report import GIB, SUMMARY_HEADER, format_plan, summary_row, verdict
from .states import model_state_bytes
from .trace import count_flops, largest_step_bytes, level_bytes, meta_flow, meta_inputs, saved_bytes_by_label

DEFAULT_RESERVE = 2 * GIB
DEFAULT_FRAGMENTATION = 0.10
# Workspace cuDNN/cuBLAS take inside a convolution's backward (64 MiB on the H100 runs in
# docs/bench/memory_h100.json: the measured peak minus everything else, the same at every K).
CUDA_WORKSPACE = 64 * 2 ** 20


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


def plan(cfg: Config, gpu_mem_bytes: int, gpus: int = 1, reserve_bytes: int = DEFAULT_RESERVE,
         fragmentation: float = DEFAULT_FRAGMENTATION, config_name: str = "", with_flops: bool = True) -> Plan:
    """Predict per-GPU memory of ``cfg`` on ``gpus`` GPUs of ``gpu_mem_bytes`` each, for plain
    autograd and inverse recompute (whatever ``cfg.memory.inverse_recompute`` says)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    from ...engine import model_dtype
    from ...inverse_checkpoint import inverse_checkpoint

    # One meta model, traced plain, then switched to inverse recompute in place and traced
    # again. Two micro-batches give the batch-independent part and the per-image slope exactly.
    meta = meta_flow(cfg, inverse=False)

    def traced(b: int):
        x, y = meta_inputs(cfg, b, model_dtype(cfg))
        return saved_bytes_by_label(meta, x, y, cfg.data.n_bits)

    plain = [traced(b) for b in (1, 2)]
    flops = {"forward": count_flops(meta, cfg, False), "train_plain": count_flops(meta, cfg, True)} if with_flops else {}
    inverse_checkpoint(meta, levels=cfg.memory.recompute_levels)
    inv = [traced(b) for b in (1, 2)]
    if with_flops:
        flops["train_inverse"] = count_flops(meta, cfg, True)

    def slope_fixed(v1: int, v2: int) -> tuple[int, int]:
        return v2 - v1, 2 * v1 - v2

    def per_image(bytes_of, traces, level: int) -> int:
        """The per-image slope of ``bytes_of(by_label, level)`` over the two traced micro-batches."""
        return slope_fixed(*(bytes_of(by_label, level) for by_label, _ in traces))[0]

    levels = []
    for i, shape in enumerate(meta.level_shapes(cfg.data.channels, cfg.data.image_size)):
        lv = meta.levels[i]
        n = sum(p.numel() for p in lv.parameters())
        levels.append(LevelPlan(shape=shape, width=cfg.model.level_width(i), params=n,
                                saved_plain=per_image(level_bytes, plain, i), saved_inverse=per_image(level_bytes, inv, i),
                                step_graph=per_image(largest_step_bytes, plain, i)))
    n_params = sum(p.numel() for p in meta.parameters())
    try:  # the engine's own numbers: its per-GPU micro-batch and the ZeRO buckets it configures
        micro = batch_layout(cfg, gpus)["micro"]
        zero = deepspeed_config(cfg, gpus)["zero_optimization"]
    except ConfigError:  # data.batch_size does not split over the GPUs: the verdict says so
        micro, zero = 0, zero_optimization(cfg.engine)
    states = model_state_bytes(n_params, cfg.engine.precision, cfg.engine.zero_stage, gpus, cfg.optim.name,
                               cfg.optim.ema_decay > 0, zero)
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
                    act = sum(by_label.values()) + (largest_step_bytes(plain[j][0], lvl) if lvl in recomputed else 0)
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
    return Plan(config=config_name, gpus=gpus, gpu_mem=gpu_mem_bytes, micro_batch=micro, params=n_params,
                states=states, levels=levels, modes=modes, flops=flops)


# Last: the command line uses plan() and the defaults above.
from .cli import add_parser, cmd_plan, parse_bytes  # noqa: E402

__all__ = ["CUDA_WORKSPACE", "DEFAULT_FRAGMENTATION", "DEFAULT_RESERVE", "GIB", "SUMMARY_HEADER", "LevelPlan",
           "ModePlan", "Plan", "add_parser", "cmd_plan", "count_flops", "format_plan", "meta_flow", "meta_inputs",
           "model_state_bytes", "parse_bytes", "plan", "saved_bytes_by_label", "summary_row", "verdict"]
