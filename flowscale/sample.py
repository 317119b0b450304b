"""Sampling with temperature, and sample grids as PNG."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from . import seeds
from .data.quantize import postprocess
from .flows.priors import standard_normal_logprob


@torch.no_grad()
def sample(flow, shapes: list[tuple[int, int, int]], n: int, temperature: float = 1.0,
           y: torch.Tensor | None = None, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
           denoise_std: float = 0.0) -> torch.Tensor:
    """Draw eps_l ~ N(0, T^2 I) for every latent and run the flow backwards: [n, C, H, W] x.

    T = 0 returns the image that every prior's mean decodes to. ``denoise_std`` > 0 (a model
    trained with ``data.noise_std``) follows with one :func:`denoise` step.
    """
    eps = [temperature * torch.randn((n, *s), generator=generator, dtype=dtype).to(device) for s in shapes]
    x, _ = flow(eps, cond=y, reverse=True)
    return denoise(flow, x, denoise_std, y) if denoise_std > 0 else x


def denoise(flow, x: torch.Tensor, std: float, y: torch.Tensor | None = None) -> torch.Tensor:
    """One score-based denoising step (Tweedie's formula, as TarFlow samples): a model of data
    blurred by N(0, std^2) noise gives E[clean | x] = x + std^2 * grad_x log p(x), with
    log p(x) = sum_l log N(eps_l; 0, I) + logdet from the flow's own forward pass."""
    from .inverse_checkpoint import plain_autograd

    with torch.enable_grad(), plain_autograd(flow):
        xg = x.detach().requires_grad_(True)
        eps, logdet = flow(xg, cond=y)
        log_px = sum(standard_normal_logprob(e) for e in eps) + logdet
        (score,) = torch.autograd.grad(log_px.sum(), xg)
    return (x + std ** 2 * score).detach()


def save_grid(images_uint8: torch.Tensor, path: str | Path, nrow: int) -> Path:
    """Write [N, C, H, W] uint8 images as one PNG grid: RGB for C = 3, grayscale (mode L) for C = 1."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = torchvision.utils.make_grid(images_uint8.cpu(), nrow=nrow, padding=1)  # [3, H, W]; C = 1 is repeated
    arr = grid.permute(1, 2, 0).numpy()
    Image.fromarray(arr[:, :, 0] if images_uint8.shape[1] == 1 else arr).save(path)
    return path


def sample_grid(flow, shapes, n_bits: int, temperatures: list[float], path: str | Path, n_per_row: int = 8,
                seed: int = 0, device="cpu", y: torch.Tensor | None = None, write: bool = True,
                dtype: torch.dtype = torch.float32, denoise_std: float = 0.0, num_classes: int = 0) -> Path:
    """One row block per temperature (same noise, scaled), written to ``path`` when ``write``;
    ``denoise_std``: see :func:`sample`. A class-conditional model (``num_classes`` > 0) draws
    column j under label ``y[j]``, by default j mod num_classes."""
    if y is None and num_classes > 0:
        y = torch.arange(n_per_row, device=device) % num_classes
    rows = []
    for t in temperatures:
        g = seeds.generator(seed, "sample")  # the same draws at every temperature
        x = sample(flow, shapes, n_per_row, t, y=y, generator=g, device=device, dtype=dtype, denoise_std=denoise_std)
        rows.append(postprocess(x, n_bits).cpu())
    return save_grid(torch.cat(rows), path, nrow=n_per_row) if write else Path(path)
