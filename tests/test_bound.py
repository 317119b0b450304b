"""The linear-flow bound: the closed form against Monte-Carlo likelihoods on Gaussian data, a
trained LU-parameterised linear flow reaching it, and `flowscale bound` on the demo data."""

import math

import pytest
import torch

from flowscale.analysis.bound import (CovarianceAccumulator, bound_from_covariance, dataset_bound, gaussian_nll_nats,
                             linear_flow_bound, nats_to_bpd)
from flowscale.cli import main as cli_main
from flowscale.config import load_config
from flowscale.flows.permutations import InvConv1x1LU
from flowscale.loss import bits_per_dim
from flowscale.flows.priors import standard_normal_logprob


pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_gaussian(d: int, seed: int):
    """(mean, covariance) with strongly correlated dimensions and scales spread over ~2 decades."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.1
    cov = a @ a.T + 1e-3 * torch.eye(d, dtype=torch.float64)
    return torch.randn(d, generator=g, dtype=torch.float64) * 0.1, cov


def test_closed_form_matches_monte_carlo():
    d, n = 6, 200_000
    mean, cov = correlated_gaussian(d, seed=0)
    dist = torch.distributions.MultivariateNormal(mean, cov)
    torch.manual_seed(1)
    x = dist.sample((n,))
    nll_mc = -dist.log_prob(x)
    closed = gaussian_nll_nats(torch.linalg.eigvalsh(cov))
    # Var(-log p) = D/2 for a Gaussian: the MC mean's standard error is sqrt(D / 2n) ~ 0.004 nats.
    se = math.sqrt(d / 2 / n)
    assert abs(nll_mc.mean().item() - closed) < 5 * se
    assert abs(nll_mc.std().item() - math.sqrt(d / 2)) < 0.02
    # ... and in bits/dim, through the one bits/dim function.
    bpd_mc = bits_per_dim(-nll_mc, torch.zeros(n, dtype=torch.float64), d, n_bits=8).mean().item()
    assert abs(bpd_mc - nats_to_bpd(closed, d, 8)) < 5 * se / (d * math.log(2))
    assert nats_to_bpd(closed, d, 8) == pytest.approx((closed + d * math.log(256)) / (d * math.log(2)), abs=1e-12)


def test_in_sample_bound_is_the_fitted_gaussians_likelihood():
    d, n = 5, 3000
    mean, cov = correlated_gaussian(d, seed=2)
    x = torch.distributions.MultivariateNormal(mean, cov).sample((n,)) + 3.0  # an offset tests the shifted sums
    acc = CovarianceAccumulator()
    for chunk in x.split(700):
        acc.update(chunk)
    assert torch.allclose(acc.covariance(), torch.cov(x.T, correction=0), atol=1e-12)
    assert torch.allclose(acc.mean(), x.mean(0), atol=1e-12)
    fitted = torch.distributions.MultivariateNormal(acc.mean(), acc.covariance())
    out = bound_from_covariance(acc.covariance(), n_bits=8, n_images=n)
    assert out["nats"] == pytest.approx(-fitted.log_prob(x).mean().item(), abs=1e-9)


def test_population_correction_removes_the_small_sample_bias():
    d, n = 24, 60  # few samples: the in-sample bound is far too optimistic
    mean, cov = correlated_gaussian(d, seed=3)
    truth = nats_to_bpd(gaussian_nll_nats(torch.linalg.eigvalsh(cov)), d, 8)
    dist = torch.distributions.MultivariateNormal(mean, cov)
    torch.manual_seed(4)
    ins, pop = [], []
    for _ in range(20):
        x = dist.sample((n,))
        out = bound_from_covariance(torch.cov(x.T, correction=0), 8, n)
        ins.append(out["bpd"])
        pop.append(out["bpd_population"])
    ins, pop = sum(ins) / len(ins), sum(pop) / len(pop)
    assert ins < truth - 0.1  # the bias is real (~0.18 bits/dim here) ...
    assert abs(pop - truth) < 0.03  # ... and the Wishart correction removes it


def test_singular_covariance_is_refused():
    with pytest.raises(ValueError, match="use more than"):
        bound_from_covariance(torch.eye(10, dtype=torch.float64), 8, n_images=5)
    with pytest.raises(ValueError, match="singular"):
        gaussian_nll_nats(torch.tensor([1.0, 0.0]))


def test_lu_linear_flow_trained_on_correlated_gaussian_reaches_the_bound():
    """A dense linear flow z = W x + b (W = P L U), standard normal base, trained by Adam on a
    fixed sample, ends within 0.02 bits/dim of the closed form for that sample."""
    d, n = 8, 2048
    mean, cov = correlated_gaussian(d, seed=5)
    torch.manual_seed(6)
    x = torch.distributions.MultivariateNormal(mean, cov).sample((n,)).view(n, d, 1, 1)
    bound = bound_from_covariance(torch.cov(x.view(n, d).T, correction=0), n_bits=8, n_images=n)["bpd"]

    flow = InvConv1x1LU(d, seed=0, bias=True).double()
    opt = torch.optim.Adam(flow.parameters(), lr=0.05)

    def bpd():
        z, logdet = flow(x)
        return bits_per_dim(standard_normal_logprob(z), logdet, d, n_bits=8).mean()

    start = bpd().item()
    for _ in range(300):
        opt.zero_grad()
        loss = bpd()
        loss.backward()
        opt.step()
    final = bpd().item()
    assert start - bound > 1.0  # the test starts far from the bound
    assert final >= bound - 1e-6  # nothing linear beats it on its own sample
    assert final - bound < 0.02, f"trained linear flow {final:.4f} vs bound {bound:.4f}"


def test_linear_flow_bound_on_uint8_batches_dequantises_like_training():
    # Independent uniform pixels over 2^n_bits bins: dequantised x is exactly U[-0.5, 0.5) per
    # dimension (variance 1/12). The discrete entropy is n_bits per dimension; the best Gaussian
    # pays 0.5*log2(2 pi e / 12) ~ 0.25 bits/dim more.
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20000, 1, 2, 2), generator=g, dtype=torch.uint8)
    out = linear_flow_bound(images.split(1000), n_bits=8, seed=0)
    gap = 0.5 * math.log2(2 * math.pi * math.e / 12)
    assert out["n_images"] == 20000 and out["n_dims"] == 4
    assert out["bpd"] == pytest.approx(8 + gap, abs=0.01)
    out5 = linear_flow_bound(images.split(1000), n_bits=5, seed=0, max_images=5000)
    assert out5["n_images"] == 5000 and out5["bpd"] == pytest.approx(5 + gap, abs=0.02)


def test_bound_on_demo_data_and_cli(tmp_path, capsys):
    overrides = ["data.image_size=8", "data.train_size=1024", "data.test_size=256", f"data.cache_dir={tmp_path}"]
    cfg = load_config(None, overrides)
    out = dataset_bound(cfg.data, "train", batch_size=256)
    assert out["n_dims"] == 192 and out["n_images"] == 1024
    assert 0 < out["bpd"] < out["bpd_population"] < 8
    assert cli_main(["bound", *overrides]) == 0
    text = capsys.readouterr().out
    assert f"{out['bpd']:.4f}" in text and "bits/dim" in text
    # The test split has 256 images for 192 dimensions: fine; too few images is an error, not a number.
    assert cli_main(["bound", *overrides, "--max-images", "100"]) == 1
    assert "use more than 192" in capsys.readouterr().err
