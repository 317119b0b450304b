"""flowscale plan: the memory prediction against measurements, the largest micro-batch, FLOPs,
the model-state formula against a real DeepSpeed engine, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowscale.inverse_checkpoint import saved_activation_bytes
from flowscale.config import Config, DataConfig, ModelConfig, load_config
from flowscale.engine import model_dtype
from flowscale.flows.actnorm import initialize_actnorm
from flowscale.flows.models import build_flow
from flowscale.inverse_checkpoint import inverse_checkpoint
from flowscale.loss import flow_bpd_dequantized
from flowscale.tools.plan import GIB, model_state_bytes, parse_bytes, plan

ROOT = Path(__file__).parent.parent
SMALL = "model.steps=2 model.width=16"
# Small versions of the paper configs (same presets, couplings, level structure; fewer steps, narrower).
CASES = {
    "glow_imagenet32": f"{SMALL}",
    "realnvp_imagenet32": f"{SMALL}",
    "dlf_imagenet32": f"{SMALL} data.image_size=16",
    "glow_celebahq256": f"{SMALL} data.image_size=64 model.levels=4",
    "glow_imagenet64-bf16": f"{SMALL} engine.precision=bf16",
    "glow_imagenet64-widths": "model.steps=2 model.widths=[8,16,32,24]",
    "dlf_imagenet64-recompute-levels": f"{SMALL} data.image_size=32 memory.recompute_levels=[1,2]",
    "glow_imagenet32-grayscale28": f"{SMALL} data.channels=1 data.image_size=28 model.levels=2",  # MNIST-like
}


def _cfg(case: str) -> Config:
    name = case.split("-")[0]
    return load_config(ROOT / "configs" / f"{name}.yaml", CASES[case].split())


def _measured_saved_bytes(cfg: Config, batch: int, inverse: bool) -> int:
    """Bytes saved for backward by a real CPU forward (the bench's data_ptr-based counter)."""
    torch.manual_seed(0)
    d = cfg.data
    flow = build_flow(cfg.model, d.channels, d.image_size)
    initialize_actnorm(flow, torch.rand(8, d.channels, d.image_size, d.image_size) - 0.5)
    flow = flow.to(model_dtype(cfg))
    inverse_checkpoint(flow, enabled=inverse, levels=cfg.memory.recompute_levels)
    x = (torch.rand(batch, d.channels, d.image_size, d.image_size) - 0.5).to(model_dtype(cfg))
    nbytes, _ = saved_activation_bytes(lambda: flow_bpd_dequantized(flow, x, d.n_bits)[0],
                                       exclude=list(flow.parameters()))
    return nbytes


@pytest.mark.parametrize("case", list(CASES))
def test_predicted_saved_activations_match_cpu_measurement(case):
    cfg = _cfg(case)
    p = plan(cfg, 80 * GIB, with_flops=False)
    batch = 3  # the plan traces micro-batches 1 and 2 on meta: 3 checks the extrapolation
    for mode in ("plain", "inverse"):
        measured = _measured_saved_bytes(cfg, batch, inverse=mode == "inverse")
        predicted = p.modes[mode].saved_bytes(batch)
        # The issue asks for 15%; the meta trace is the same code, so it is held to 2% (it is exact here).
        assert abs(predicted - measured) <= 0.02 * measured, (case, mode, predicted, measured)
    assert p.modes["inverse"].saved_bytes(batch) < p.modes["plain"].saved_bytes(batch)
    # Per-level attribution adds up to no more than the whole (the rest is loss and top prior).
    per_level = sum(lv.saved_plain for lv in p.levels)
    assert 0.5 * p.modes["plain"].saved[1] < per_level <= p.modes["plain"].saved[1]


def _h100_rows():
    rows = json.loads((ROOT / "docs/bench/memory_h100.json").read_text())["rows"]
    return [r for r in rows if r["mode"] in ("plain", "inverse") and r["k"] in (4, 32)]


@pytest.mark.parametrize("row", _h100_rows(), ids=lambda r: f"{r['size']}px-K{r['k']}-{r['mode']}")
def test_predicted_backward_peak_matches_h100_measurement(row):
    """docs/bench/memory_h100.json: CUDA peak of forward+backward above parameters and
    optimizer state, measured by `flowscale bench memory --device cuda` (Glow, fp32, width 512)."""
    cfg = Config(model=ModelConfig(preset="glow", levels=row["levels"], steps=row["k"], width=row["width"]),
                 data=DataConfig(image_size=row["size"], batch_size=row["batch"]))
    p = plan(cfg, 80 * GIB, with_flops=False)
    assert p.params == row["params"]
    predicted = p.modes[row["mode"]].activation_bytes(row["batch"])
    measured = row["cuda_fwd_bwd_peak_bytes"]
    assert abs(predicted - measured) <= 0.15 * measured, (predicted / 2 ** 20, measured / 2 ** 20)


def test_largest_micro_batch_is_the_boundary_and_zero_stages_shrink_states():
    cfg = load_config(ROOT / "configs/glow_imagenet64.yaml", SMALL.split() + ["engine.zero_stage=0"])
    for mem in (3 * GIB, 6 * GIB):
        p = plan(cfg, mem, gpus=1, with_flops=False)
        for mp in p.modes.values():
            b = mp.max_micro_batch
            assert b >= 1 and mp.total_bytes(b) <= mem < mp.total_bytes(b + 1)
    small, big = (plan(cfg, m, with_flops=False).modes["plain"].max_micro_batch for m in (3 * GIB, 6 * GIB))
    assert big > small
    tight = plan(cfg, 2 * GIB, with_flops=False)  # under the 2 GiB reserve: nothing fits
    assert tight.modes["plain"].max_micro_batch == 0
    P = 10 ** 9  # ZeRO-3 still holds a 2 GB reduce bucket: the win shows on large models
    totals = [sum(model_state_bytes(P, "fp32", z, 8, "adam").values()) for z in (0, 3)]
    assert totals[1] < totals[0] / 2
    # fp32 ZeRO-0 Adam: parameters + two moments = 12 bytes per parameter (gradients live in backward).
    assert sum(model_state_bytes(P, "fp32", 0, 1, "adam").values()) == 12 * P


@pytest.mark.parametrize("channels", [3, 1])
def test_flops_forward_equal_the_convolution_count(channels):
    """Glow, 1 level, 1 step, on 3x16x16: squeeze -> 12x8x8; the 1x1 conv (12x12), the coupling
    net conv3x3(6->w), conv1x1(w->w), zero conv3x3(w->12); FLOPs = 2 x MACs. Grayscale: 4x8x8."""
    w, hw, c = 16, 8 * 8, 4 * channels
    cfg = Config(model=ModelConfig(preset="glow", levels=1, steps=1, width=w),
                 data=DataConfig(image_size=16, channels=channels))
    p = plan(cfg, 80 * GIB)
    macs = hw * (c * c + 9 * (c // 2) * w + w * w + 9 * w * c)
    assert p.flops["forward"] == 2 * macs
    assert 2 * p.flops["forward"] < p.flops["train_plain"] < p.flops["train_inverse"]


def test_parse_bytes():
    assert parse_bytes("80GB") == parse_bytes("80GiB") == 80 * GIB
    assert parse_bytes("500MB") == 500 * 2 ** 20 and parse_bytes("85e9") == 85 * 10 ** 9
    with pytest.raises(ValueError, match="80XB"):
        parse_bytes("80XB")


def _plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "flowscale.cli", "plan", *args], capture_output=True, text=True,
                          cwd=ROOT)


def test_bar_glow_celebahq1024_fits_8_per_80gb_gpu_with_inverse_recompute():
    r = _plan_cli("configs/glow_celebahq1024.yaml", "--gpu-mem", "80GB", "--gpus", "8", "--no-flops", "--json")
    assert r.returncode == 0, r.stderr
    (p,) = json.loads(r.stdout)
    assert p["micro_batch"] == 8
    assert p["modes"]["inverse"]["max_micro_batch"] >= 8
    assert p["modes"]["inverse"]["total_bytes_at_micro_batch"] <= 80 * GIB
    assert p["modes"]["plain"]["max_micro_batch"] < 8  # why the config turns inverse recompute on


def test_cli_report_summary_and_errors():
    r = _plan_cli("configs/demo.yaml", "--gpu-mem", "8GB")
    assert r.returncode == 0, r.stderr
    for text in ("per level", "model states per GPU", "largest micro-batch", "FLOPs per image", "fits"):
        assert text in r.stdout
    r = _plan_cli("configs/demo.yaml", "configs/glow_imagenet32.yaml", "model.steps=2", "--no-flops")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| demo") or line.startswith("| glow_imagenet32")]
    assert len(rows) == 2
    r = _plan_cli("configs/demo.yaml", "--gpu-mem", "80XB")
    assert r.returncode == 2 and "80XB" in r.stderr
    r = _plan_cli("configs/nope.yaml")
    assert r.returncode == 2 and "nope.yaml" in r.stderr and "not found" in r.stderr
    r = _plan_cli("configs/demo.yaml", "data.batch_size=30", "--gpus", "4", "--no-flops")
    assert r.returncode == 0 and "does not divide" in r.stdout


def test_verdict_suggests_what_fits():
    """Plain autograd at 80 micro-batch per GPU of a 64 px Glow does not fit in 8 GiB; the plan
    proposes a gradient accumulation that divides the batch and fits, and inverse recompute."""
    r = _plan_cli("configs/glow_imagenet64.yaml", "model.steps=8", "data.batch_size=80", "engine.zero_stage=0",
                  "--gpu-mem", "8GB", "--no-flops", "--json")
    (p,) = json.loads(r.stdout)
    m = p["modes"]["plain"]["max_micro_batch"]
    assert 1 <= m < 80 and p["modes"]["inverse"]["max_micro_batch"] >= 80
    r = _plan_cli("configs/glow_imagenet64.yaml", "model.steps=8", "data.batch_size=80", "engine.zero_stage=0",
                  "--gpu-mem", "8GB", "--no-flops")
    line = next(l for l in r.stdout.splitlines() if l.startswith("plain autograd"))
    accum = int(line.split("engine.grad_accum=")[1].split()[0])
    assert 80 % accum == 0 and 80 // accum <= m  # divides the batch, and the micro-batch fits
    assert all(80 // a > m for a in range(1, accum) if 80 % a == 0)  # the smallest such
    assert "set memory.inverse_recompute=true to fit micro-batch 80" in r.stdout


def test_class_conditional_config_plans():
    cfg = load_config(ROOT / "configs/glow_imagenet32.yaml", SMALL.split() + ["model.num_classes=10"])
    p = plan(cfg, 80 * GIB, with_flops=False)
    plain = plan(load_config(ROOT / "configs/glow_imagenet32.yaml", SMALL.split()), 80 * GIB, with_flops=False)
    assert p.params == plain.params + 10 * 2 * p.levels[-1].shape[0]  # the top prior's label embedding


def test_options_compare_every_stage_and_precision_and_mark_the_best():
    """`plan --options`: ZeRO 0-3 x fp32/bf16 side by side, refused combinations with their
    reason, and the row marked best is the one whose memory mode takes the largest micro-batch."""
    r = _plan_cli("configs/demo.yaml", "optim.ema_decay=0.99", "memory.inverse_recompute=true", "data.batch_size=64",
                  "--gpus", "2", "--gpu-mem", "1GB", "--reserve", "0", "--options")
    assert r.returncode == 0, r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [(c[0].strip(), c[1].strip()) for c in rows] == [(str(z), p) for z in range(4) for p in ("fp32", "bf16")]
    refused = [c for c in rows if "refused" in c[2]]
    assert len(refused) == 2 and all("optim.ema_decay" in c[2] and c[0].strip() == "3" for c in refused)
    ok = [c for c in rows if "refused" not in c[2]]
    inverse_max = [int(c[5].split("/")[1]) for c in ok]
    best = [c for c in ok if "best" in c[6]]
    assert len(best) == 1 and int(best[0][5].split("/")[1]) == max(inverse_max)
    assert best[0][1].strip() == "bf16"  # half the activation bytes per image
