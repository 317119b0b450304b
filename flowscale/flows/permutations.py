"""Channel mixing between couplings: fixed permutations and Glow's invertible 1x1 convolution.

Log-determinants and inverses of learned matrices are computed in float64 whatever the
compute dtype (``slogdet``/``inv``/LU reject bf16, and float32 inverses of a badly
conditioned W drift); the result is cast back to the activation dtype. The 1x1 convolutions
themselves run in the activations' dtype with autocast switched off: they are cheap, and a
bf16 W x would not be invertible to better than bf16 precision, which the inverse-recompute
backprop relies on.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .base import Flow, accumulate_grads, watched, zeros_logdet


class ChannelPermutation(Flow):
    """z[:, i] = x[:, perm[i]]; volume preserving (logdet = 0)."""

    def __init__(self, perm: torch.Tensor):
        super().__init__()
        self.register_buffer("perm", perm.long().contiguous())
        self.register_buffer("inv_perm", torch.argsort(perm).long().contiguous())

    def _forward(self, x, cond):
        return x[:, self.perm], zeros_logdet(x)

    def _inverse(self, z, cond):
        return z[:, self.inv_perm], zeros_logdet(z)


class ReversePermutation(ChannelPermutation):
    """Reverse the channel order (RealNVP/Glow "reverse")."""

    def __init__(self, channels: int):
        super().__init__(torch.arange(channels - 1, -1, -1))


class ShufflePermutation(ChannelPermutation):
    """A fixed random channel permutation drawn from ``seed`` (Glow "shuffle")."""

    def __init__(self, channels: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        super().__init__(torch.randperm(channels, generator=g))


def _random_rotation(channels: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))
    return q


def _exact(x: torch.Tensor):
    """Per-pixel matrix products in x's dtype, outside autocast and without TF32.

    cuDNN runs float32 convolutions in TF32 (10-bit mantissa) by default on Ampere and newer
    GPUs; W x and W^-1 z would then each lose ~1e-3 relative accuracy and the inverse
    reconstruction would drift step after step (seen on an H100 at K=32 as NaN weights).
    """
    if x.device.type == "meta":  # shape/memory planning (flowscale.tools.plan): no autocast on meta
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    guards = contextlib.ExitStack()
    guards.enter_context(torch.autocast(device_type=x.device.type, enabled=False))
    guards.enter_context(cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                                     deterministic=cudnn.deterministic, allow_tf32=False))
    return guards


def _conv1x1(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """z = W x per pixel, under :func:`_exact`."""
    with _exact(x):
        return F.conv2d(x, w.to(x.dtype)[:, :, None, None])


def _conv1x1_backward(grad_z: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """(dL/dx, dL/dW) of z = W x per pixel, in one convolution-backward call: W^T g and
    sum over pixels of g x^T (in x's dtype, under :func:`_exact`)."""
    with _exact(x):
        grad_x, grad_w = torch.ops.aten.convolution_backward(grad_z, x, w.to(x.dtype)[:, :, None, None], None,
                                                             [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                             [True, True, False])[:2]
    return grad_x, grad_w[:, :, 0, 0]


def _add_bias(z: torch.Tensor, bias: nn.Parameter | None, sign: float = 1.0) -> torch.Tensor:
    return z if bias is None else z + sign * bias.to(z.dtype)


class _Conv1x1Flow(Flow):
    """What the two 1x1 convolutions share: their step of inverse recompute."""

    fused_backprop = True  # differentiated by hand, no forward rerun
    bias: nn.Parameter | None

    def _weight_graph(self):
        """(W, log|det W|) with a graph to the parameters; W in float32 or wider."""
        raise NotImplementedError

    def reconstruct_and_backprop(self, z, grad_z, grad_logdet, cond):
        """Inverse recompute's step through z = W x (+ b), differentiated by hand: the input
        x = W^-1 (z - b) as in the inverse, then (dL/dx, dL/dW) from one convolution backward
        (no forward convolution is rerun to be differentiated), dL/db = sum g and
        dL/dlog|det W| = H W sum_b dL/dlogdet_b, backpropagated through W's own small graph."""
        if watched(self):
            return super().reconstruct_and_backprop(z, grad_z, grad_logdet, cond)
        with torch.enable_grad():
            w, log_det = self._weight_graph()
        with torch.no_grad():
            x = _conv1x1(_add_bias(z, self.bias, -1.0), torch.linalg.inv(w.detach().double()))
            grad_x, grad_w = _conv1x1_backward(grad_z, x, w.detach())
            g_log_det = grad_logdet.sum() * z.shape[2] * z.shape[3]
        params, grads = [w, log_det], [grad_w, g_log_det]
        if self.bias is not None:
            params.append(self.bias)
            grads.append(grad_z.sum((0, 2, 3), keepdim=True, dtype=torch.promote_types(z.dtype, torch.float32)))
        accumulate_grads(params, grads)
        return x, grad_x


class InvConv1x1(_Conv1x1Flow):
    """Invertible 1x1 convolution z = W x (+ b) per pixel; logdet = H*W*log|det W| (Glow).

    W starts as a random rotation (|det W| = 1). ``bias``: a learned per-channel b, initialised
    to 0 (DLF's --invconv_bias, used for ImageNet 64).
    """

    def __init__(self, channels: int, seed: int = 0, bias: bool = False):
        super().__init__()
        # QR returns a non-contiguous view; DeepSpeed needs contiguous parameters.
        self.weight = nn.Parameter(_random_rotation(channels, seed).float().contiguous())
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1)) if bias else None

    def _hw(self, x):
        return x.shape[2] * x.shape[3]

    def _weight_graph(self):
        return self.weight, torch.linalg.slogdet(self.weight.double())[1]

    def _forward(self, x, cond):
        w = self.weight
        z = _add_bias(_conv1x1(x, w), self.bias)
        logdet = torch.linalg.slogdet(w.double())[1].to(torch.promote_types(x.dtype, torch.float32))
        return z, (logdet * self._hw(x)).expand(x.shape[0])

    def _inverse(self, z, cond):
        w = self.weight.double()
        w_inv = torch.linalg.inv(w)
        x = _conv1x1(_add_bias(z, self.bias, -1.0), w_inv)
        logdet = torch.linalg.slogdet(w)[1].to(torch.promote_types(z.dtype, torch.float32))
        return x, (-logdet * self._hw(z)).expand(z.shape[0])


class InvConv1x1LU(_Conv1x1Flow):
    """LU-parameterised 1x1 convolution: W = P L (U + diag(sign * exp(log_s))).

    P is fixed, L unit lower-triangular, U strictly upper-triangular; log|det W| = sum(log_s)
    costs O(C) instead of O(C^3). ``max_log_s`` (optional) soft-bounds |log_s| to keep W's
    conditioning, and so the accuracy of its inverse, under control.
    """

    def __init__(self, channels: int, seed: int = 0, max_log_s: float | None = None, bias: bool = False):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1)) if bias else None
        w = _random_rotation(channels, seed)
        p, l, u = torch.linalg.lu(w)
        s = torch.diagonal(u)
        self.register_buffer("p", p.float().contiguous())
        self.register_buffer("sign_s", torch.sign(s).float().contiguous())
        self.register_buffer("l_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(l.float().contiguous())
        self.upper = nn.Parameter(torch.triu(u, 1).float().contiguous())
        self.log_s = nn.Parameter(torch.log(s.abs()).float().contiguous())
        self.max_log_s = max_log_s

    def _bounded_log_s(self) -> torch.Tensor:
        if self.max_log_s is None:
            return self.log_s
        return self.max_log_s * torch.tanh(self.log_s / self.max_log_s)

    def weight_and_logdet(self, dtype=torch.float64):
        log_s = self._bounded_log_s().to(dtype)
        lower = self.lower.to(dtype) * self.l_mask.to(dtype) + self.eye.to(dtype)
        upper = self.upper.to(dtype) * self.l_mask.T.to(dtype) + torch.diag(self.sign_s.to(dtype) * torch.exp(log_s))
        return self.p.to(dtype) @ lower @ upper, log_s.sum()

    def _weight_graph(self):
        return self.weight_and_logdet(torch.float64)

    def _forward(self, x, cond):
        w, ld = self.weight_and_logdet(torch.promote_types(x.dtype, torch.float32))
        z = _add_bias(_conv1x1(x, w), self.bias)
        return z, (ld * x.shape[2] * x.shape[3]).expand(x.shape[0])

    def _inverse(self, z, cond):
        w, ld = self.weight_and_logdet(torch.float64)
        x = _conv1x1(_add_bias(z, self.bias, -1.0), torch.linalg.inv(w))
        ld = ld.to(torch.promote_types(z.dtype, torch.float32))
        return x, (-ld * z.shape[2] * z.shape[3]).expand(z.shape[0])


def build_permutation(kind: str, channels: int, seed: int = 0, max_log_s: float | None = None,
                      bias: bool = False) -> Flow | None:
    """``kind`` in {"none", "reverse", "shuffle", "invconv", "invconv_lu"}; ``bias`` only for the 1x1 convs."""
    if bias and kind not in ("invconv", "invconv_lu"):
        raise ValueError(f"a 1x1-conv bias needs permutation invconv or invconv_lu, got {kind!r}")
    if kind == "none":
        return None
    if kind == "reverse":
        return ReversePermutation(channels)
    if kind == "shuffle":
        return ShufflePermutation(channels, seed)
    if kind == "invconv":
        return InvConv1x1(channels, seed, bias)
    if kind == "invconv_lu":
        return InvConv1x1LU(channels, seed, max_log_s, bias)
    raise ValueError(f"unknown permutation {kind!r}; choose reverse, shuffle, invconv, invconv_lu or none")
