"""Is inverse recompute exact enough? Reconstruction errors, and the steps handed back to autograd.

Floating point breaks exact invertibility: reconstruction errors compound down a chain, worst
for badly conditioned 1x1 convs and unbounded scales. :func:`reconstruction_errors` measures
|x - f^{-1}(f(x))| / |x| per chain and per step along :meth:`Flow.walk`;
:func:`check_and_flag` stores the activations of the steps whose own error exceeds a bound
(:meth:`flowscale.inverse_checkpoint.InvertibleSequence.store`); :class:`UnstableSteps` is the
training run's side of it (one line when the set changes, or an error), driven by
:class:`flowscale.health.HealthCheck`.
"""

from __future__ import annotations

import torch
from torch import nn

from .inverse_checkpoint import InvertibleSequence, saved_activation_bytes


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
