"""Every config in configs/ is valid: it loads, names its source, sets its DeepSpeed options, and its
model builds on the meta device (no memory) with the right shapes in both directions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from flowscale.config import ConfigError, ModelConfig, load_config
from flowscale.flows.models import build_flow
from flowscale.loss import flow_bpd_dequantized
from flowscale.tools.plan import meta_flow

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
PAPER = {"glow_celebahq1024", "glow_celebahq256", "glow_imagenet32", "glow_imagenet64", "realnvp_imagenet32",
         "realnvp_imagenet64", "dlf_imagenet32", "dlf_imagenet64", "dlf_celebahq256", "demo"}
SMALL = {  # the published small-image setups (issue 23): config -> the dataset variant its shards hold
    "glow_mnist": "mnist", "realnvp_mnist": "mnist", "glow_fashion_mnist": "fashion-mnist",
    "realnvp_fashion_mnist": "fashion-mnist", "glow_cifar10": "cifar10", "realnvp_cifar10": "cifar10"}


def test_the_issue_s_configs_exist():
    assert PAPER | set(SMALL) <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_image_configs_match_their_data_and_the_published_table(name, capsys):
    """D is the dataset's own (MNIST family 1x28x28 = 784, unpadded, as the published figures; CIFAR-10
    3x32x32), the comment states the figure `bench reproduce` compares with, and `flowscale plan` runs."""
    from flowscale.tools.bench.reproduce import PUBLISHED
    from flowscale.cli import main as cli_main

    variant = SMALL[name]
    path = next(p for p in CONFIGS if p.stem == name)
    cfg = load_config(path)
    d = cfg.data
    want = (1, 28) if "mnist" in variant else (3, 32)
    assert (d.channels, d.image_size, d.n_bits) == (*want, 8)
    assert variant.replace("-", "") in d.train_manifest.replace("-", "") and d.test_manifest.endswith("test/manifest.json")
    comments = "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))
    assert f"flowscale prep {variant}" in comments, "the comment must say how to make the shards"
    assert "Preprocessing" in comments and "differs" in comments
    model = "Glow" if name.startswith("glow") else "RealNVP"
    published = {p.model: p.bpd for p in PUBLISHED[variant]}
    if published:
        assert f"{published[model]:.2f}" in comments, f"{name}: cite the {model} figure that bench reproduce uses"
    else:
        assert "no published" in comments.lower()
    assert cli_main(["plan", str(path), "--gpus", "1", "--gpu-mem", "80GB", "--no-flops"]) == 0
    assert "fits" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_cites_its_source_and_sets_deepspeed(path):
    text = path.read_text()
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert text.startswith("#"), f"{path.name} must open with a comment saying what it is and where it comes from"
    if path.stem != "demo":
        assert any(src in comments for src in ("openai/glow", "naturomics/DLF", "arXiv")), \
            f"{path.name}: no source cited for its hyperparameters"
    raw = yaml.safe_load(text)
    assert {"zero_stage", "precision"} <= set(raw.get("engine", {})), f"{path.name}: set engine.zero_stage and precision"
    cfg = load_config(path)
    if cfg.data.dataset == "shards":
        for m in (cfg.data.train_manifest, cfg.data.test_manifest):
            assert m.endswith("manifest.json") and cfg.data.image_size > 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_model_builds_on_meta_and_runs_shapes_both_ways(path):
    cfg = load_config(path)
    flow = meta_flow(cfg, inverse=cfg.memory.inverse_recompute)
    assert all(p.device.type == "meta" for p in flow.parameters())
    d, b = cfg.data, 2
    x = torch.empty(b, d.channels, d.image_size, d.image_size, device="meta", dtype=next(flow.parameters()).dtype)
    y = torch.zeros(b, dtype=torch.long, device="meta") if cfg.model.num_classes else None
    bpd, parts = flow_bpd_dequantized(flow, x, d.n_bits, y)
    assert bpd.shape == (b,) and parts["logdet"].shape == (b,)
    assert parts["logdet"].dtype in (torch.float32, torch.float64)  # log-dets never in bf16
    eps, _ = flow(x, cond=y)
    shapes = flow.latent_shapes(d.channels, d.image_size)
    assert [tuple(e.shape[1:]) for e in eps] == shapes
    assert sum(c * h * w for c, h, w in shapes) == d.channels * d.image_size ** 2
    back, neg_logdet = flow(eps, cond=y, reverse=True)
    assert back.shape == x.shape and neg_logdet.shape == (b,)
    bpd.sum().backward()  # the backward graph (inverse recompute's included) also runs on meta
    assert all(p.grad is not None for p in flow.parameters() if p.requires_grad)


def test_per_level_widths_build_and_validate():
    m = ModelConfig(preset="glow", levels=3, steps=2, widths=[8, 16, 32])
    flow = build_flow(m, 3, 16)
    assert [lv.steps[0][-1].net.conv1.out_channels for lv in flow.levels] == [8, 16, 32]
    with pytest.raises(ConfigError, match="model.widths"):
        load_config(None, ["model.levels=3", "model.widths=[8,16]"])
    with pytest.raises(ConfigError, match="model.widths"):
        load_config(None, ["model.levels=2", "model.widths=[8,0]"])


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "demo"], ids=lambda p: p.stem)
def test_config_batch_fits_8_x_80gb_in_the_mode_it_chooses(path):
    """What each paper config promises in its comments: its micro-batch per GPU on 8 x 80 GB
    fits with the memory mode it sets (plain autograd unless it turns inverse recompute on)."""
    from flowscale.tools.plan import GIB, plan

    cfg = load_config(path)
    p = plan(cfg, 80 * GIB, gpus=8, with_flops=False)
    mode = "inverse" if cfg.memory.inverse_recompute else "plain"
    assert p.micro_batch >= 1, "data.batch_size must split over 8 GPUs"
    assert p.modes[mode].total_bytes(p.micro_batch) <= 80 * GIB, (mode, p.modes[mode].total_bytes(p.micro_batch) / GIB)
    assert p.modes[mode].max_micro_batch >= p.micro_batch
