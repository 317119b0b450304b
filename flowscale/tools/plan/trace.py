"""What one training forward of a config's flow does on the meta device: the bytes autograd
saves for backward, attributed to the level and flow step that saved them, and the FLOPs."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ...config import Config


def meta_flow(cfg: Config, inverse: bool, dtype: torch.dtype | None = None):
    """The config's flow on the meta device, in the training dtype, optionally with inverse recompute."""
    from ...engine import model_dtype
    from ...flows.models import build_flow
    from ...inverse_checkpoint import inverse_checkpoint

    with torch.device("meta"):
        flow = build_flow(cfg.model, cfg.data.channels, cfg.data.image_size)
    flow = flow.to(dtype or model_dtype(cfg))
    return inverse_checkpoint(flow, enabled=inverse, levels=cfg.memory.recompute_levels)


def meta_inputs(cfg: Config, batch: int, dtype: torch.dtype, device="meta"):
    """(x, y) of a micro-batch of ``batch`` images; y only for class-conditional models."""
    d = cfg.data
    x = torch.empty(batch, d.channels, d.image_size, d.image_size, dtype=dtype, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device) if cfg.model.num_classes > 0 else None
    return x, y


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
    from ...loss import flow_bpd_dequantized

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


def level_bytes(by_label: dict, level: int) -> int:
    """Bytes a level saved, all its steps and the rest of it together."""
    return sum(v for k, v in by_label.items() if k[0] == "level" and k[1] == level)


def largest_step_bytes(by_label: dict, level: int) -> int:
    """Bytes the level's largest single step saved (0 for a level without steps)."""
    return max((v for k, v in by_label.items() if k[0] == "level" and k[1] == level and k[2] is not None), default=0)


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
    from ...loss import flow_bpd_dequantized

    x, y = meta_inputs(cfg, 1, next(flow.parameters()).dtype)
    with _FlopCount() as counter, torch.set_grad_enabled(backward):
        bpd, _ = flow_bpd_dequantized(flow, x, cfg.data.n_bits, y)
        if backward:
            bpd.sum().backward()
    flow.zero_grad(set_to_none=True)
    return float(counter.total)
