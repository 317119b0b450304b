"""Memory-saving backprop: recompute activations by running the flow's own inverses.

Plain autograd keeps every step's intermediate activations, so memory grows linearly with
the number of steps K. A bijection does not need them: from a step's output z its input is
x = f^{-1}(z). So the forward pass of a chain f_K o ... o f_1 runs without building a graph
and keeps only the chain's output; backward walks the chain from the end:

    for k = K .. 1:
        x_k  = f_k^{-1}(z_k)                       (no graph: reconstruct the input)
        z', ld' = f_k(x_k)                         (rebuild this step's local graph only)
        backprop (dL/dz_k, dL/dlogdet) through (z', ld'), accumulating parameter gradients
        dL/dz_{k-1} = dL/dx_k;  z_{k-1} = x_k

The total log-det is the sum of the steps', so its output gradient (one value per sample)
flows into every step's log-det unchanged. Each step does this through its layers'
``reconstruct_and_backprop`` (:mod:`flowscale.flows.base`): a coupling rebuilds the graph of its
network only, once for the inverse and the backward; ActNorm and the 1x1 convolutions are
differentiated by hand, so besides inverting those per-pixel layers the only work repeated is
the coupling networks' forward (the cost floor: one extra forward pass). Activation memory is then one step's graph plus
each level's output, flat in K. Inverse and recompute both go through ``module(...)``, so
hooks (DeepSpeed ZeRO-3 parameter gathering) fire, and the autocast state of the forward is
replayed in backward, so bf16 autocast works.

Floating point breaks exact invertibility: reconstruction errors compound down the chain,
worst for badly conditioned 1x1 convs and unbounded scales. :mod:`flowscale.reconstruction`
measures them and hands a step whose own error exceeds a bound back to ordinary autograd: the
wrapper around its chain (:class:`InvertibleSequence`, ``stored``) keeps that step's
activations instead, cutting the chain there into recomputed segments and ordinary autograd
steps. The layers themselves carry no such state. :func:`saved_activation_bytes` measures what
a forward keeps for backward (the benches, the plan and the stored steps' cost).

Usage (applied from outside the single-device model)::

    flow = inverse_checkpoint(build_flow(...), enabled=True, levels=None)
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from torch import nn

from .flows.base import Flow, FlowSequence, run_chain, zeros_logdet


def _autocast_state(device_type: str):
    if device_type == "meta":  # shape/memory planning (flowscale.tools.plan): autocast has no meta backend
        return None
    if torch.is_autocast_enabled(device_type):
        return {"device_type": device_type, "dtype": torch.get_autocast_dtype(device_type), "enabled": True}
    return {"device_type": device_type, "enabled": False}


class _InverseRecompute(torch.autograd.Function):
    """Runs ``steps`` forward without a graph; backward reconstructs inputs via inverses.

    Inputs: (x, cond, anchor, steps). ``anchor`` is an empty tensor that requires grad so the
    output is part of the graph even when x is not (the data input of the first level).

    The chain's parameters are deliberately NOT inputs of this node (as in re-entrant
    activation checkpointing): their gradients are accumulated by the inner backward of
    ``reconstruct_and_backprop``, which creates and runs each parameter's AccumulateGrad node
    exactly once per backward. Listing them as inputs would make the outer backward run those
    nodes a second time with no gradient, firing post-accumulate-grad hooks twice (DeepSpeed
    ZeRO-1/2 then reduces a gradient twice and asserts), and would build the nodes while
    ZeRO-3 has the parameters partitioned (shape [0]), breaking the inner graph's shape checks.
    Ordering is still right: the inner backward runs when the outer one reaches this node,
    i.e. after everything downstream of the chain's output has been backpropagated.
    """

    @staticmethod
    def forward(ctx, x, cond, anchor, steps):
        ctx.steps = steps
        ctx.cond = cond
        ctx.autocast = _autocast_state(x.device.type)
        with torch.no_grad():
            z, logdet = run_chain(steps, x, cond)
        ctx.x_requires_grad = x.requires_grad
        ctx.save_for_backward(z)
        return z, logdet

    @staticmethod
    def backward(ctx, grad_z, grad_logdet):
        (z,) = ctx.saved_tensors
        if grad_z is None:
            grad_z = torch.zeros_like(z)
        if grad_logdet is None:
            grad_logdet = torch.zeros(z.shape[0], dtype=torch.promote_types(z.dtype, torch.float32), device=z.device)
        z = z.detach()
        with torch.autocast(**ctx.autocast) if ctx.autocast is not None else contextlib.nullcontext():
            for step in reversed(ctx.steps):  # the contract's hook: fused where the layer has one
                z, grad_z = step.reconstruct_and_backprop(z, grad_z, grad_logdet, ctx.cond)
        grad_x = grad_z if ctx.x_requires_grad else None
        return grad_x, None, None, None


class InvertibleSequence(FlowSequence):
    """A FlowSequence whose forward under autograd keeps no intermediate activations.

    Built around the steps of the FlowSequence it replaces: the same modules, so the same
    parameters and state-dict keys. The wrapper owns the whole recompute state, per instance:
    ``recompute`` (the switch) and ``stored`` (the steps run with ordinary autograd). Neither is
    a parameter, buffer or state-dict entry: checkpoints do not carry them.
    """

    stored: frozenset[int]
    """Indices of the steps run with ordinary autograd, keeping their activations, because their
    inverse is not accurate enough. Set through :meth:`store` (by :func:`check_and_flag`, alike on
    every rank); runtime state, empty after construction and re-derived by the next check (training
    runs one at the first step of every start, so a resumed run flags afresh)."""

    def __init__(self, steps, recompute: bool = True):
        super().__init__(steps)
        self.recompute = recompute
        """The switch: False runs the chain with ordinary autograd (:func:`plain_autograd`)."""
        self.stored = frozenset()

    def store(self, indices) -> None:
        """Run the steps at ``indices`` (into this chain) with ordinary autograd from now on, and
        every other step through its inverse; replaces the previous set."""
        stored = frozenset(int(j) for j in indices)
        outside = sorted(j for j in stored if not 0 <= j < len(self.steps))
        if outside:
            raise IndexError(f"InvertibleSequence.store: steps {outside} outside this chain of {len(self.steps)} steps")
        self.stored = stored

    def _segments(self):
        """Consecutive runs of steps: (recompute?, [steps])."""
        runs: list[tuple[bool, list[Flow]]] = []
        for j, step in enumerate(self.steps):
            ok = j not in self.stored
            if runs and runs[-1][0] == ok:
                runs[-1][1].append(step)
            else:
                runs.append((ok, [step]))
        return runs

    def _forward(self, x, cond):
        if not (self.recompute and torch.is_grad_enabled()):
            return super()._forward(x, cond)
        logdet = zeros_logdet(x)
        for ok, steps in self._segments():
            if ok:
                anchor = torch.empty(0, device=x.device, requires_grad=True)
                x, ld = _InverseRecompute.apply(x, cond, anchor, steps)
            else:
                x, ld = run_chain(steps, x, cond)
            logdet = logdet + ld
        return x, logdet


def inverse_checkpoint(flow: nn.Module, enabled: bool = True, levels: list[int] | None = None) -> nn.Module:
    """Switch each of ``flow``'s chains of steps (:meth:`Flow.step_chains`: a multi-scale flow's
    levels) to inverse recompute; a flow that declares no chains is refused by name.

    ``levels``: indices of the chains to convert (None = all). Works in place and returns
    ``flow``; parameters, buffers and state-dict keys are unchanged, so checkpoints load
    either way. ``enabled=False`` returns ``flow`` untouched.
    """
    if not enabled:
        return flow
    for i, holder in enumerate(flow.require_chains("inverse recompute (memory.inverse_recompute)")):
        if levels is not None and i not in levels:
            continue
        if type(holder.steps) is FlowSequence:
            holder.steps = InvertibleSequence(holder.steps)
        if isinstance(holder.steps, InvertibleSequence):
            holder.steps.recompute = True
    return flow


@contextlib.contextmanager
def plain_autograd(flow: nn.Module):
    """Run ``flow``'s inverse-recompute chains with ordinary autograd inside the block (for a
    gradient with respect to the input only, such as the score of sampling's denoising step:
    recompute's backward would accumulate parameter gradients as a side effect)."""
    chains = [m for m in flow.modules() if isinstance(m, InvertibleSequence)]
    before = [c.recompute for c in chains]
    for c in chains:
        c.recompute = False
    try:
        yield flow
    finally:
        for c, r in zip(chains, before):
            c.recompute = r


class CheckpointedSequence(FlowSequence):
    """Baseline for comparison: ``torch.utils.checkpoint`` around each step. Keeps every
    step's input (memory still linear in K) and recomputes the step's internals in backward."""

    def _forward(self, x, cond):
        if not torch.is_grad_enabled():
            return super()._forward(x, cond)
        logdet = zeros_logdet(x)
        for step in self.steps:
            x, ld = torch.utils.checkpoint.checkpoint(step, x, cond, use_reentrant=False)
            logdet = logdet + ld
        return x, logdet


def checkpoint_steps(flow: nn.Module) -> nn.Module:
    """Switch every chain of steps to per-step ``torch.utils.checkpoint`` (in place)."""
    for holder in flow.require_chains("memory.checkpoint_steps"):
        if type(holder.steps) is FlowSequence:
            holder.steps = CheckpointedSequence(holder.steps)
    return flow


def saved_activation_bytes(fn, exclude=(), module=None):
    """(bytes of distinct storages saved for backward while running ``fn()``, its result),
    excluding ``exclude`` and the parameters of ``module`` as they are when saved (ZeRO-3
    gathers them into new storages during the forward)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if module is not None and any(p.data.untyped_storage().data_ptr() == ptr for p in module.parameters()):
            return t
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out
