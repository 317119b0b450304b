"""Sampling: shapes, temperature semantics, and the PNG grid."""

import torch
from PIL import Image

from flowscale.sample import sample, sample_grid

from helpers import small_flow


def test_sample_shapes_and_dtype():
    flow = small_flow("glow", levels=2, steps=2, width=8, size=8, dtype=torch.float32, scale=0.1)
    x = sample(flow, flow.latent_shapes(3, 8), n=5, temperature=0.7)
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_temperature_zero_decodes_every_prior_mean():
    # With learned (perturbed) priors the mean is not zero, so this can fail: encoding the T=0
    # sample must give eps = 0 at every level, i.e. every latent sits at its prior's mean.
    flow = small_flow("glow", levels=3, steps=2, width=8, size=16, scale=0.2)
    shapes = flow.latent_shapes(3, 16)
    x0 = sample(flow, shapes, n=3, temperature=0.0, dtype=torch.float64)
    assert x0.abs().max() > 1e-3  # the prior means decode to a non-trivial image
    eps, _ = flow(x0)
    assert max(e.abs().max().item() for e in eps) < 1e-9
    # All T=0 samples are identical; T>0 samples differ.
    assert torch.allclose(x0[0], x0[1])
    x1 = sample(flow, shapes, n=3, temperature=1.0, dtype=torch.float64)
    assert not torch.allclose(x1[0], x1[1])


def test_temperature_scales_the_latent_noise():
    flow = small_flow("glow", levels=2, steps=2, width=8, size=8, scale=0.2)
    shapes = flow.latent_shapes(3, 8)
    g = torch.Generator().manual_seed(3)
    x = sample(flow, shapes, n=200, temperature=0.5, generator=g, dtype=torch.float64)
    eps, _ = flow(x)
    std = torch.cat([e.reshape(-1) for e in eps]).std().item()
    assert abs(std - 0.5) < 0.02


def test_class_conditional_sampling_depends_on_label():
    flow = small_flow("glow", levels=2, steps=1, width=6, size=8, scale=0.3, num_classes=3)
    shapes = flow.latent_shapes(3, 8)
    a = sample(flow, shapes, 2, 0.0, y=torch.tensor([0, 0]), dtype=torch.float64)
    b = sample(flow, shapes, 2, 0.0, y=torch.tensor([2, 2]), dtype=torch.float64)
    assert (a - b).abs().max() > 1e-4


def test_sample_grid_png(tmp_path):
    flow = small_flow("realnvp", levels=2, steps=2, width=8, size=8, dtype=torch.float32, scale=0.1)
    path = sample_grid(flow, flow.latent_shapes(3, 8), 8, [0.0, 0.7, 1.0], tmp_path / "g.png", n_per_row=4)
    with Image.open(path) as im:
        w, h = im.size
    # 3 rows x 4 columns of 8px images with 1px padding
    assert (w, h) == (4 * 9 + 1, 3 * 9 + 1)
