"""``flowscale bench gpu`` on CPU: the real case path (config, DeepSpeed engine, train_step) in
subprocesses, the table and JSON it writes, and failing cases that become rows."""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = next(p for p in (ROOT / "configs/glow_imagenet32.yaml", ROOT / "configs/dlf_imagenet32.yaml") if p.exists())
TINY = ["model.steps=2", "model.width=16", "model.levels=2", "data.image_size=16"]


def bench(tmp_path, *args, timeout=240):
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    # One thread per process: a shared CI core otherwise stalls every OpenMP region.
    env.update(DS_ACCELERATOR="cpu", TMPDIR=str(tmp), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "flowscale.cli", "bench", "gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def outputs(out: Path) -> tuple[dict, str]:
    (js,), (md,) = list(out.glob("gpu_*.json")), list(out.glob("gpu_*.md"))
    assert js.stem == md.stem
    return json.loads(js.read_text()), md.read_text()


def test_four_cases_measured(tmp_path):
    out = tmp_path / "out"
    p = bench(tmp_path, "--device", "cpu", "--configs", str(CONFIG), "--override", *TINY,
              "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--out", str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res, md = outputs(out)
    assert f"torch {torch.__version__}" in res["header"] and f"torch {torch.__version__}" in md
    rows = res["rows"]
    assert [(r["precision"], r["recompute"]) for r in rows] == [
        ("fp32", "plain"), ("fp32", "inverse"), ("bf16", "plain"), ("bf16", "inverse")]
    for r in rows:
        assert "error" not in r, r
        assert r["micro_batch"] == 2 and r["config"] == CONFIG.stem
        assert math.isfinite(r["step_s"]) and r["step_s"] > 0
        assert r["images_per_s"] == pytest.approx(2 / r["step_s"], rel=1e-6)
        assert math.isfinite(r["bpd"]) and r["params"] > 0 and r["peak_bytes"] >= 0
    for r in rows[1::2]:  # inverse rows: same batch as plain, so the ratio is there
        plain = rows[rows.index(r) - 1]
        assert r["x_plain_step"] == pytest.approx(r["step_s"] / plain["step_s"])
    table = [ln for ln in md.splitlines() if ln.startswith(f"| {CONFIG.stem} |")]
    assert len(table) == 4
    assert f"{rows[0]['images_per_s']:.1f}" in table[0]


def test_failing_cases_are_rows(tmp_path):
    """A config DeepSpeed cannot start (nccl without a GPU: fails in the case's subprocess) and
    one that does not load (fails before it) become error rows; the good config still runs."""
    (tmp_path / "nccl.yaml").write_text("engine:\n  backend: nccl\n")
    (tmp_path / "bad.yaml").write_text("engine:\n  zero_stage: 7\n")
    out = tmp_path / "out"
    p = bench(tmp_path, "--device", "cpu", "--configs", str(tmp_path / "nccl.yaml"), str(tmp_path / "bad.yaml"),
              str(CONFIG), "--cases", "fp32-plain", "--override", *TINY, "--micro-batch", "2", "--steps", "1",
              "--warmup", "1", "--out", str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res, md = outputs(out)
    nccl, bad, good = res["rows"]
    assert "nccl" in nccl["error"].lower() or "gpu" in nccl["error"].lower(), nccl
    assert "engine.zero_stage" in bad["error"] and "micro_batch" not in bad
    assert "error" not in good and good["step_s"] > 0
    assert "| nccl | fp32 | plain | 2 |" in md and "engine.zero_stage" in md


def test_planner_batches():
    """Without --micro-batch each mode runs at the planner's largest batch, capped; --same-batch
    runs inverse at plain's; a config that fits nowhere is a row saying so."""
    plan = pytest.importorskip("flowscale.tools.plan")
    from flowscale.tools.bench.gpu import _add_args, case_config, plan_cases

    def choose(*argv, gpu_mem):
        ap = argparse.ArgumentParser()
        _add_args(ap)
        args = ap.parse_args(["--configs", str(CONFIG), "--cases", "fp32-plain", "fp32-inverse", "--override", *TINY, *argv])
        return plan_cases(args, str(CONFIG), gpu_mem)

    cfg = case_config(str(CONFIG), TINY, "fp32-plain")
    want = plan.plan(cfg, 64 * 2 ** 30, 1, with_flops=False).modes
    got = choose("--max-batch", "3", gpu_mem=64 * 2 ** 30)
    assert want["plain"].max_micro_batch > 3 and [got[c]["micro_batch"] for c in got] == [3, 3]
    assert got["fp32-inverse"]["planned_bytes"] == want["inverse"].total_bytes(3)

    # Memory for plain at micro-batch 2 exactly: inverse recompute fits more.
    mem = want["plain"].total_bytes(2)
    at = plan.plan(cfg, mem, 1, with_flops=False).modes
    assert at["plain"].max_micro_batch == 2 and at["inverse"].max_micro_batch > 2
    got = choose("--max-batch", "10000", gpu_mem=mem)
    assert got["fp32-plain"]["micro_batch"] == 2
    assert got["fp32-inverse"]["micro_batch"] == min(at["inverse"].max_micro_batch, 10000)
    got = choose("--same-batch", gpu_mem=mem)
    assert got["fp32-inverse"]["micro_batch"] == 2
    assert got["fp32-inverse"]["planned_bytes"] == at["inverse"].total_bytes(2)

    assert choose(gpu_mem=2 ** 20) == {c: {"error": "planner: does not fit"} for c in ("fp32-plain", "fp32-inverse")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_gpu_is_a_clear_error(tmp_path):
    p = bench(tmp_path, "--configs", str(CONFIG), "--out", str(tmp_path / "out"))
    assert p.returncode == 1 and "no CUDA device" in p.stderr and "--device cpu" in p.stderr
    assert not (tmp_path / "out").exists()
