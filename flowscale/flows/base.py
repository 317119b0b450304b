"""The invertible contract, written once.

Every layer is a bijection ``f`` from data side to latent side::

    forward(x)  -> (z, logdet)     z = f(x),       logdet[b] = log|det df/dx| at x[b]
    inverse(z)  -> (x, -logdet)    x = f^{-1}(z),  -logdet[b] = log|det df^{-1}/dz| at z[b]

Both directions always return the pair (never a type that depends on a flag) and both go
through ``module(...)`` -- ``layer(z, reverse=True)`` is the inverse -- so framework hooks
(DeepSpeed ZeRO-3 parameter gathering, forward hooks) fire whichever way the flow runs.
Subclasses implement ``_forward`` and ``_inverse``; callers use ``layer(x)`` /
``layer(z, reverse=True)`` or the ``inverse`` shorthand.

``cond`` is an optional conditioning tensor (for example class labels) that layers may use;
it is passed unchanged through sequences.

Backprop through the inverse (used by :mod:`flowscale.inverse_checkpoint`) is part of the
contract too, with a default that every layer inherits::

    reconstruct_and_backprop(z, dL/dz, dL/dlogdet, cond) -> (x, dL/dx)

rebuilds the input x = f^{-1}(z) from the output and backpropagates through f at x,
accumulating parameter gradients. The default inverts without a graph, reruns ``forward`` with
one and calls autograd; a layer that can share work between the two overrides it and sets
``fused_backprop = True`` (a coupling evaluates its network once for both; ActNorm and the 1x1
convs are differentiated by hand, with no forward rerun). Overrides pass parameter gradients
through autograd (:func:`accumulate_grads`) and take the default path while the layer is
watched (:func:`watched`: a hook installed with :func:`watch`, or DeepSpeed ZeRO-3 holding its
parameters), so that every call is a module call.

Layers carry no runtime state for the memory wrappers: which steps inverse recompute trusts
to invert and which keep their activations (set by the reconstruction-health check,
:func:`flowscale.reconstruction.check_and_flag`, alike on every rank) is held by the
wrapper around their chain (:class:`flowscale.inverse_checkpoint.InvertibleSequence`, ``stored``).

A flow built of chains of steps (the multi-scale flows: squeeze -> K steps -> split, level by
level) declares them, with a default of none::

    step_chains()        -> the holders whose ``.steps`` is a chain (a FlowSequence), data side first
    walk(x, cond, run)   -> one ChainPass per chain, data -> latent: its input h (as the chain
                            sees it), ``run(i, chain, h, cond) -> (h_out, logdet, extra)``, what
                            continues to the next chain and what is factored out

Memory wrappers replace the chains; health checks, Lipschitz statistics and benches walk them.
A flow that declares no chains is refused by them by name.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn


class Flow(nn.Module):
    """An invertible layer with a tractable log-determinant (see the module docstring)."""

    fused_backprop: ClassVar[bool] = False
    """True where :meth:`reconstruct_and_backprop` is overridden by a cheaper exact path."""

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, reverse: bool = False):
        if reverse:
            return self._inverse(x, cond)
        return self._forward(x, cond)

    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None = None):
        """``f^{-1}(z)`` and ``log|det df^{-1}/dz|`` (= minus the forward log-det)."""
        return self(z, cond=cond, reverse=True)

    def _forward(self, x: torch.Tensor, cond: torch.Tensor | None):  # pragma: no cover - abstract
        raise NotImplementedError

    def _inverse(self, z: torch.Tensor, cond: torch.Tensor | None):  # pragma: no cover - abstract
        raise NotImplementedError

    def reconstruct_and_backprop(self, z: torch.Tensor, grad_z: torch.Tensor, grad_logdet: torch.Tensor,
                                 cond: torch.Tensor | None):
        """From the output z = f(x), dL/dz and dL/dlogdet [B]: (x, dL/dx), accumulating the
        parameter gradients. Default: invert without a graph, rerun forward, backprop."""
        return backprop_generic([self], z, grad_z, grad_logdet, cond)

    def step_chains(self) -> list[nn.Module]:
        """The holders of this flow's chains of steps (each has ``.steps``, a FlowSequence, which
        memory wrappers may replace), data side first. Default: none."""
        return []

    def walk(self, x: torch.Tensor, cond: torch.Tensor | None = None,
             run: Callable[..., tuple[torch.Tensor, torch.Tensor, Any]] | None = None) -> Iterator["ChainPass"]:
        """Data -> latent, chain by chain (see the module docstring). ``run(i, chain, h, cond)``
        replaces the chain's own forward (default: ``chain(h, cond=cond)``, extra None)."""
        raise TypeError(f"{type(self).__name__} declares no chains of steps (Flow.step_chains / Flow.walk)")

    def require_chains(self, who: str) -> list[nn.Module]:
        """:meth:`step_chains`, or a TypeError naming ``who`` needs them and this flow's class."""
        holders = self.step_chains()
        if not holders:
            raise TypeError(f"{who} needs a flow that declares its chains of steps (Flow.step_chains / Flow.walk); "
                            f"{type(self).__name__} declares none")
        return holders


@dataclass
class ChainPass:
    """One chain's part of :meth:`Flow.walk`."""
    index: int
    holder: nn.Module
    """What holds the chain (``holder.steps``): a multi-scale flow's Level."""
    h_in: torch.Tensor
    """The chain's input as the chain sees it (after the level's squeeze and memory layout)."""
    h_out: torch.Tensor
    """The chain's output (before any split)."""
    logdet: torch.Tensor
    """The chain's log-det [B] as ``run`` returned it."""
    h: torch.Tensor
    """What goes on to the next chain (the kept half after a split; the latent at the top)."""
    z2: torch.Tensor | None
    """The factored-out half (None where nothing is split off)."""
    extra: Any = None
    """What ``run`` returned beside the output (a health check's per-step measurements)."""


def run_chain_default(i: int, chain, h: torch.Tensor, cond):
    """The default ``run`` of :meth:`Flow.walk`: the chain's own forward (a module call)."""
    z, logdet = chain(h, cond=cond)
    return z, logdet, None


_WATCHES: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
"""Modules with hooks installed through :func:`watch`, and how many."""


class WatchHandle:
    """A hook installed by :func:`watch`: ``remove()`` uninstalls it and ends the watch (a
    context manager too)."""

    def __init__(self, module: nn.Module, handle):
        self._module = weakref.ref(module)
        self._handle = handle

    def remove(self) -> None:
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        module = self._module()
        if module is not None:
            left = _WATCHES.get(module, 0) - 1
            if left > 0:
                _WATCHES[module] = left
            else:
                _WATCHES.pop(module, None)

    def __enter__(self) -> "WatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def watch(module: nn.Module, hook: Callable, *, pre: bool = True, with_kwargs: bool = False) -> WatchHandle:
    """Install ``hook`` as a forward pre-hook (``pre``) or forward hook of ``module`` (torch's
    ``register_forward_pre_hook`` / ``register_forward_hook``) and declare the module watched
    while it is installed (:func:`watched`): every call of it then goes through ``module(...)``.
    A hook that must see every call of a layer (the ActNorm data init; a test counting calls) is
    installed this way; a hook installed with torch's own methods sees the calls that are made,
    and layers may take shortcuts past it."""
    register = module.register_forward_pre_hook if pre else module.register_forward_hook
    handle = register(hook, with_kwargs=with_kwargs)
    _WATCHES[module] = _WATCHES.get(module, 0) + 1
    return WatchHandle(module, handle)


def _zero3_partitioned(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 holds ``module``'s parameters: it gathers them in forward hooks
    of its own, and its parameters say so (DeepSpeed's public ``is_zero_param``). DeepSpeed not
    imported: no ZeRO-3 parameter can exist."""
    zero = sys.modules.get("deepspeed.runtime.zero.utils")
    return zero is not None and any(zero.is_zero_param(p) for p in module.parameters())


def watched(*modules: nn.Module) -> bool:
    """True when something must see every call of one of ``modules``: a hook installed with
    :func:`watch` (the ActNorm data init reads inputs in one), or DeepSpeed ZeRO-3, which
    gathers parameters in its forward hooks. A layer's shortcut that uses parameters without
    calling the module (a hand-written backprop, a folded norm) takes the module path instead."""
    return any(m in _WATCHES for m in modules) or any(_zero3_partitioned(m) for m in modules)


def accumulate_grads(tensors, grads) -> None:
    """Backpropagate ``grads`` from ``tensors`` (parameters, or small functions of them such as a
    1x1 conv's W) into the parameters' ``.grad`` through autograd, so gradient hooks (DeepSpeed's)
    fire as in any backward. Tensors without a graph (frozen parameters) are skipped."""
    pairs = [(t, g.to(t.dtype)) for t, g in zip(tensors, grads) if t is not None and t.requires_grad]
    if pairs:
        torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])


def zeros_logdet(x: torch.Tensor) -> torch.Tensor:
    """A [B] log-det of zeros, always float32 or wider (log-dets never live in bf16)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.zeros(x.shape[0], dtype=dtype, device=x.device)


def sum_except_batch(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the first, accumulated in float32 or wider: [B, ...] -> [B]."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    return t.reshape(t.shape[0], -1).sum(dim=1, dtype=dtype)


def run_chain(steps: Iterable[Flow], x: torch.Tensor, cond: torch.Tensor | None = None):
    """Apply ``steps`` in order data -> latent; returns (z, summed logdet)."""
    logdet = zeros_logdet(x)
    for step in steps:
        x, ld = step(x, cond=cond)
        logdet = logdet + ld
    return x, logdet


def backprop_generic(layers, z: torch.Tensor, grad_z: torch.Tensor, grad_logdet: torch.Tensor, cond):
    """:meth:`Flow.reconstruct_and_backprop` for the chain ``layers`` at once: invert them
    without a graph (module calls), rerun them forward with one, one autograd call."""
    with torch.no_grad():
        for layer in reversed(layers):
            z, _ = layer(z, cond=cond, reverse=True)
    x = z.detach().requires_grad_(True)
    with torch.enable_grad():
        z_re, ld_re = run_chain(layers, x, cond)
    outputs, grads = [z_re], [grad_z]
    if ld_re.requires_grad:
        outputs.append(ld_re)
        grads.append(grad_logdet.to(ld_re.dtype))
    if z_re.requires_grad:
        torch.autograd.backward(outputs, grads)
    grad_x = x.grad if x.grad is not None else torch.zeros_like(x)
    return x.detach(), grad_x


class FlowSequence(Flow):
    """Composition ``f_n o ... o f_1``: log-dets add; the inverse runs the steps backwards."""

    fused_backprop = True  # walks its children, fusing where they can

    def __init__(self, steps: Iterable[Flow]):
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        return iter(self.steps)

    def __getitem__(self, i):
        return self.steps[i]

    def _forward(self, x, cond):
        return run_chain(self.steps, x, cond)

    def _inverse(self, z, cond):
        logdet = zeros_logdet(z)
        for step in reversed(self.steps):
            z, ld = step(z, cond=cond, reverse=True)
            logdet = logdet + ld
        return z, logdet

    def reconstruct_and_backprop(self, z, grad_z, grad_logdet, cond):
        """Children walked backwards: a child with ``fused_backprop`` (a coupling, a nested
        sequence) runs its own; each maximal run of other children (ActNorm, 1x1 conv, ...) is
        inverted, rerun and backpropagated in one autograd call."""
        children = list(self.steps)
        i = len(children)
        while i > 0:
            if children[i - 1].fused_backprop:
                z, grad_z = children[i - 1].reconstruct_and_backprop(z, grad_z, grad_logdet, cond)
                i -= 1
                continue
            j = i - 1  # children[j:i] is a maximal run of layers without a fused path
            while j > 0 and not children[j - 1].fused_backprop:
                j -= 1
            z, grad_z = backprop_generic(children[j:i], z, grad_z, grad_logdet, cond)
            i = j
        return z, grad_z
