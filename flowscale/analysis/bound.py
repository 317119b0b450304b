"""The best bits/dim any *linear* flow with a Gaussian base can reach on a dataset.

From "Jacobian Determinant of Normalizing Flows" (Liao & He 2021): a linear flow
z = W (x - b) with z ~ N(0, I) is the Gaussian model x ~ N(b, (W^T W)^-1). Maximum likelihood
sets b to the data mean and (W^T W)^-1 to the data covariance Sigma (the optimum is unique
up to a rotation of W; probabilistic PCA with all components kept), and the expected negative
log-likelihood there is

    -E log p(x) = D/2 * log(2 pi e) + 1/2 * sum_i log lambda_i        lambda_i = eigenvalues of Sigma

Sigma is the covariance of the data as the flow sees it: n-bit reduced, dequantised with
uniform noise and scaled to [-0.5, 0.5) (:mod:`flowscale.data.quantize`). Converted to bits/dim
with the discretisation term exactly as :func:`flowscale.loss.bits_per_dim` does, this is the
floor a linear flow reaches and a baseline every nonlinear flow must beat.

Sigma is estimated from N images (MLE, divided by N); it needs N > D and D x D float64 memory
(D = C*H*W: 3072 at 32x32, 12288 at 64x64; 256x256 is out of reach, 196608^2 doubles).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .. import seeds

from ..data.quantize import preprocess
from ..loss import bits_per_dim

LOG_2PI_E = math.log(2 * math.pi) + 1.0


def gaussian_nll_nats(eigenvalues: torch.Tensor) -> float:
    """-E log N(x; mu, Sigma) under x ~ N(mu, Sigma) = D/2 log(2 pi e) + 1/2 sum log lambda (nats)."""
    lam = eigenvalues.double()
    if not bool((lam > 0).all()):
        raise ValueError(f"the covariance is singular (smallest eigenvalue {lam.min().item():.3g}): "
                         f"use more images than dimensions ({lam.numel()})")
    return 0.5 * lam.numel() * LOG_2PI_E + 0.5 * torch.log(lam).sum().item()


def nats_to_bpd(nll_nats: float, n_dims: int, n_bits: int) -> float:
    """A per-image negative log-density of dequantised x (nats) as bits/dim of the discrete image,
    through :func:`flowscale.loss.bits_per_dim` (log p_Z = -nll, logdet = 0)."""
    return bits_per_dim(torch.tensor(-nll_nats, dtype=torch.float64), torch.zeros((), dtype=torch.float64),
                        n_dims, n_bits).item()


class CovarianceAccumulator:
    """Streaming mean and covariance of [B, ...] batches, flattened, in float64.

    Sums are taken around a shift (the first batch's mean) so that E[x x^T] - mu mu^T does not
    cancel catastrophically.
    """

    def __init__(self):
        self.n = 0
        self.shift = self.s1 = self.s2 = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(x.shape[0], -1).double()
        if self.shift is None:
            self.shift = x.mean(dim=0)
            d = x.shape[1]
            self.s1 = torch.zeros(d, dtype=torch.float64, device=x.device)
            self.s2 = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        xc = x - self.shift
        self.n += x.shape[0]
        self.s1 += xc.sum(dim=0)
        self.s2 += xc.T @ xc

    def mean(self) -> torch.Tensor:
        return self.shift + self.s1 / self.n

    def covariance(self) -> torch.Tensor:
        """The MLE covariance (divided by N)."""
        m = self.s1 / self.n
        cov = self.s2 / self.n - torch.outer(m, m)
        return 0.5 * (cov + cov.T)


def linear_flow_bound(batches: Iterable[torch.Tensor], n_bits: int, seed: int = 0, max_images: int | None = None,
                      device: torch.device | str = "cpu") -> dict:
    """The linear-flow bound of uint8 image batches [B, C, H, W].

    Each batch is n-bit reduced and dequantised with noise from a generator seeded by ``seed``
    (the same preprocessing training uses). Returns {"bpd", "nats" (per image), "n_images",
    "n_dims", "min_eig", "max_eig"}.
    """
    acc = CovarianceAccumulator()
    g = seeds.generator(seed, "bound")
    for x in batches:
        if max_images is not None:
            x = x[:max_images - acc.n]
            if len(x) == 0:
                break
        acc.update(preprocess(x, n_bits, generator=g).to(device))
        if max_images is not None and acc.n >= max_images:
            break
    if acc.n == 0:
        raise ValueError("no images to estimate the covariance from")
    return bound_from_covariance(acc.covariance(), n_bits, acc.n)


def wishart_logdet_bias(n_dims: int, n_images: int) -> float:
    """E[log det S] - log det Sigma for the MLE covariance S of N Gaussian samples (N S is
    Wishart with N-1 degrees of freedom): sum_i digamma((N-1-i)/2) + D log(2/N), i = 0..D-1.
    Negative: an in-sample covariance looks more concentrated than the population's."""
    i = torch.arange(n_dims, dtype=torch.float64)
    return (torch.special.digamma((n_images - 1 - i) / 2).sum() + n_dims * math.log(2 / n_images)).item()


def bound_from_covariance(cov: torch.Tensor, n_bits: int, n_images: int | None = None) -> dict:
    """The bound of a D x D covariance estimated from ``n_images`` images:

    "bpd"/"nats": the in-sample optimum, what a linear flow fitted to these images reaches on
    them. "bpd_population": the same with log det Sigma corrected for the Wishart bias of an
    N-sample estimate (exact for Gaussian data), an estimate of the population value that
    held-out data would show. Also "n_dims", "n_images", "min_eig", "max_eig".
    """
    d = cov.shape[0]
    if n_images is not None and n_images <= d:
        raise ValueError(f"{n_images} images cannot estimate a {d}-dimensional covariance: use more than {d} "
                         f"(--max-images, or a larger data.train_size for the demo)")
    lam = torch.linalg.eigvalsh(cov.double())
    nats = gaussian_nll_nats(lam)
    out = {"bpd": nats_to_bpd(nats, d, n_bits), "nats": nats, "n_dims": d, "n_images": n_images,
           "min_eig": lam.min().item(), "max_eig": lam.max().item()}
    if n_images is not None:
        out["bpd_population"] = nats_to_bpd(nats - 0.5 * wishart_logdet_bias(d, n_images), d, n_bits)
    return out


def dataset_bound(data_cfg, split: str = "train", max_images: int | None = None, batch_size: int = 256,
                  seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """The bound for a configured dataset (demo or shards), streamed from its ``split``."""
    from ..data import eval_split

    images = eval_split(data_cfg, split)
    batches = (x for _, x, _ in images.batches(batch_size))
    out = linear_flow_bound(batches, data_cfg.n_bits, seed, max_images, device)
    out["split"] = split
    return out
