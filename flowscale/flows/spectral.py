"""Switchable spectral normalisation of coupling / g_k network weights (a Lipschitz bound).

"Jacobian Determinant of Normalizing Flows" (Liao & He 2021) argues that stable training
needs both the flow and its inverse to be Lipschitz; for a coupling the constants grow with
those of its network. This bounds each conv's spectral norm (of the weight reshaped to
[out, in * k * k], Miyato et al. 2018's proxy for the conv operator norm):

    W_used = W / max(1, sigma(W) / coeff)

sigma is estimated by ``n_iter`` power iterations from a fixed random start vector, with
gradients through sigma = u^T W v (u, v held constant), as in torch's spectral_norm. Unlike
torch's, nothing is updated during forward: W_used is a deterministic function of W, so the
forward and the inverse of a flow see the same network (torch's updates its power-iteration
state at every training-mode call, which breaks the round trip). The estimate is a lower
bound of the reshaped matrix's norm that tightens with ``n_iter``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


class BoundedSpectralNorm(nn.Module):
    """Parametrization W -> W / max(1, sigma(W) / coeff); see the module docstring."""

    def __init__(self, out_features: int, coeff: float = 1.0, n_iter: int = 10, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("u0", F.normalize(torch.randn(out_features, generator=g), dim=0))
        self.coeff, self.n_iter = coeff, n_iter

    def sigma(self, w: torch.Tensor) -> torch.Tensor:
        mat = w.reshape(w.shape[0], -1)
        with torch.no_grad():
            u = self.u0.to(mat.dtype)
            for _ in range(self.n_iter):
                v = F.normalize(mat.T @ u, dim=0, eps=1e-12)
                u = F.normalize(mat @ v, dim=0, eps=1e-12)
        return u @ mat @ v

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w / torch.clamp(self.sigma(w) / self.coeff, min=1.0)


def spectral_norm_(conv: nn.Module, coeff: float = 1.0, n_iter: int = 10, seed: int = 0) -> nn.Module:
    """Register :class:`BoundedSpectralNorm` on ``conv.weight`` in place; returns ``conv``."""
    parametrize.register_parametrization(conv, "weight", BoundedSpectralNorm(conv.weight.shape[0], coeff, n_iter, seed))
    return conv
