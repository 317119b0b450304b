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
worst for badly conditioned 1x1 convs and unbounded scales. :func:`reconstruction_errors`
measures |x - f^{-1}(f(x))| / |x| per level and per step; :func:`check_and_flag` hands a
step whose own error exceeds a bound back to ordinary autograd: the wrapper around its chain
(:class:`InvertibleSequence`, ``stored``) keeps that step's activations instead, cutting the
chain there into recomputed segments and ordinary autograd steps. The layers themselves carry
no such state.

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


# -- numerical health ----------------------------------------------------------------------------

def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def reconstruction_errors(flow: nn.Module, x: torch.Tensor, cond: torch.Tensor | None = None) -> dict:
    """Relative reconstruction errors ``|x - f^{-1}(f(x))| / |x|`` on a batch, along
    :meth:`Flow.walk`.

    Returns {"level": [per-chain error of the whole chain], "step": [[per-step errors] per chain]}.
    """

    def measure(i, chain, h, cond):
        z, per_step = h, []
        for step in chain:
            z_next, _ = step(z, cond=cond)
            back, _ = step(z_next, cond=cond, reverse=True)
            per_step.append(_rel_err(z, back))
            z = z_next
        back = z
        for step in reversed(list(chain)):
            back, _ = step(back, cond=cond, reverse=True)
        return z, None, (_rel_err(h, back), per_step)

    passes = list(flow.walk(x, cond, run=measure))
    return {"level": [p.extra[0] for p in passes], "step": [p.extra[1] for p in passes]}


def reconstruction_tolerance(max_error: float | None, dtype: torch.dtype) -> float:
    """``memory.max_reconstruction_error``, or where null, the precision's own:
    max(1e-3, 4 * eps(dtype)) (the field's docstring derives it)."""
    if max_error is not None:
        return float(max_error)
    return max(1e-3, 4 * torch.finfo(dtype).eps)


@torch.no_grad()
def check_and_flag(flow: nn.Module, x: torch.Tensor, max_error: float, cond: torch.Tensor | None = None,
                   reduce=None) -> dict:
    """Measure reconstruction errors and flag unstable steps to store their activations.

    A step whose own relative error exceeds ``max_error`` is flagged; on a chain wrapped for
    inverse recompute (:class:`InvertibleSequence`) the flagged steps become its ``stored`` set,
    so they run with ordinary autograd and every other step (back under the bound included) is
    recomputed. Other chains hold nothing to flag; their errors are reported alike. ``reduce``: a
    collective taking the per-step errors (a 1-d float64 tensor) to their maximum over ranks, so
    every rank flags the same steps (the backward graphs, and DeepSpeed's gradient buckets, then
    line up). Returns the errors plus ``"flagged"``: the number of flagged steps and ``"stored"``:
    their (chain, step) indices, over all chains.
    """
    errs = reconstruction_errors(flow, x, cond)
    flat = torch.tensor([e for per_step in errs["step"] for e in per_step], dtype=torch.float64)
    flat = torch.nan_to_num(flat, nan=float("inf"))  # NaN counts as bad
    if reduce is not None:
        flat = reduce(flat)
    stored, k = [], 0
    for i, holder in enumerate(flow.require_chains("the reconstruction check")):
        bad = [j for j in range(len(holder.steps)) if not (flat[k + j].item() <= max_error)]
        if isinstance(holder.steps, InvertibleSequence):
            holder.steps.store(bad)
        stored += [(i, j) for j in bad]
        k += len(holder.steps)
    errs["step_max"] = flat.max().item() if len(flat) else 0.0
    errs["flagged"] = len(stored)
    errs["stored"] = stored
    return errs


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


def stored_bytes_per_image(flow: nn.Module, x: torch.Tensor, stored: list[tuple[int, int]],
                           cond: torch.Tensor | None = None) -> int:
    """Bytes per image that the flagged ``stored`` steps (chain, step) keep for backward under
    ordinary autograd (what they add to inverse recompute's memory), measured on ``x``."""
    want = set(stored)
    total = [0]

    def run(i, chain, h, cond):
        for j, step in enumerate(chain):
            if (i, j) in want:
                with torch.enable_grad():
                    h_in = h.detach().requires_grad_(True)
                    n, (h, _) = saved_activation_bytes(lambda: step(h_in, cond=cond), module=flow)
                total[0] += n
                h = h.detach()
            else:
                with torch.no_grad():
                    h, _ = step(h, cond=cond)
        return h, None, None

    for _ in flow.walk(x, cond, run=run):
        pass
    return total[0] // max(1, len(x))


class UnstableSteps:
    """The runtime side of the reconstruction check in training: which steps inverse recompute
    hands back to ordinary autograd, said out loud.

    Each check flags the steps whose error exceeds ``tolerance`` on any rank (one collective:
    every rank flags the same steps). Under ``on_unstable="store"``, whenever the set of flagged
    steps in recomputed chains changes, :meth:`check` returns one line saying how many, which
    (level: steps) and the activation bytes they add per micro-batch; ``"error"`` raises
    instead. ``recomputing``: inverse recompute is on (otherwise the flags change nothing and
    nothing is said)."""

    def __init__(self, tolerance: float, on_unstable: str, micro_batch: int, recomputing: bool, why: str = ""):
        self.tolerance, self.on_unstable, self.micro_batch = tolerance, on_unstable, micro_batch
        self.recomputing, self.why = recomputing, why
        self.stored: list[tuple[int, int]] = []

    def check(self, flow: nn.Module, x: torch.Tensor, step: int, reduce=None) -> tuple[dict, str | None]:
        """(metrics, a line to log or None). Collective when ``reduce`` is."""
        errs = check_and_flag(flow, x, self.tolerance, reduce=reduce)
        holders = flow.require_chains("the reconstruction check")
        stored = [(i, j) for i, j in errs["stored"] if isinstance(holders[i].steps, InvertibleSequence)]
        metrics = {f"recon_err/level_{i}": e for i, e in enumerate(errs["level"])}
        metrics["recon_err/step_max"] = errs["step_max"]
        metrics["recon_unstable_steps"] = errs["flagged"]
        if not self.recomputing:
            return metrics, None
        metrics["recon_stored_steps"] = len(stored)
        per_image = stored_bytes_per_image(flow, x, stored) if stored else 0
        metrics["recon_stored_mib"] = per_image * self.micro_batch / 2 ** 20
        if stored == self.stored:
            return metrics, None
        self.stored = stored
        total = sum(len(h.steps) for h in holders if isinstance(h.steps, InvertibleSequence))
        where = "; ".join(f"level {i}: steps {[j for ii, j in stored if ii == i]}" for i in sorted({i for i, _ in stored}))
        bound = f"memory.max_reconstruction_error={self.tolerance:.2g}{self.why}"
        if stored and self.on_unstable == "error":
            raise FloatingPointError(
                f"step {step}: {len(stored)} of {total} recomputed flow steps reconstruct their input with a relative "
                f"error above {bound} ({where}; largest {errs['step_max']:.2g}), and memory.on_unstable=error. Lower "
                f"optim.lr, bound the 1x1 convs (model.lu_max_log_s), raise the bound, or set memory.on_unstable=store "
                f"to keep those steps' activations")
        if not stored:
            return metrics, f"inverse recompute: every step is recomputed again (reconstruction errors <= {bound})"
        return metrics, (f"inverse recompute: {len(stored)} of {total} steps store their activations instead "
                         f"(reconstruction error above {bound}): {where}; +{metrics['recon_stored_mib']:.1f} MiB "
                         f"per micro-batch of {self.micro_batch}")
