"""Run logging: metric names under their sections (train/, test/, optim/, health/, data/, perf/,
samples/) in metrics.jsonl and W&B alike, read back from a real offline W&B run file with wandb's
own record type; captioned sample grids; parameter count and topology in the W&B config; the
one-line hint where an offline run is and how to upload it; older runs' metrics read under the
new names."""

from __future__ import annotations

import json
import os

import pytest

from flowscale.build import build_model
from flowscale.config import load_config
from flowscale.logging import METRIC_NAMES, metric_name, read_metrics
from flowscale.train import main as train_main

from helpers import wandb_records

TINY = ["model.levels=2", "model.steps=2", "model.width=8", "data.train_size=64", "data.test_size=16",
        "data.batch_size=8", "train.init_batch_size=16", "train.progress=false", "train.log_every=1"]


def _offline_run(tmp_path, monkeypatch, *extra: str):
    """A 2-step training run in W&B offline mode: (cfg, its run file)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    cfg = load_config(None, TINY + [f"train.run_dir={tmp_path / 'run'}", "wandb.mode=offline", "train.steps=2",
                                    "train.eval_every=2", "train.sample_every=2", *extra])
    train_main(cfg)
    files = list((tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return cfg, files[0]


def _history(records) -> dict[int, dict]:
    """step -> {name: value} of a W&B run's history records (a media value: a dict of its fields)."""
    history = {}
    for r in records:
        if r.HasField("history"):
            items = {}  # a W&B media value comes as one item per field: nested_key = [name, field]
            for i in r.history.item:
                name, *field = list(i.nested_key) or [i.key]
                value = json.loads(i.value_json)
                if field:
                    items.setdefault(name, {})[field[0]] = value
                else:
                    items[name] = value
            history.setdefault(items["_step"], {}).update(items)
    return history


def test_offline_wandb_run_has_sectioned_metrics_captioned_grid_and_topology(tmp_path, monkeypatch, capsys,
                                                                             single_process_env):
    cfg, run_file = _offline_run(tmp_path, monkeypatch, "train.temperatures=[0.0,0.7]", "memory.check_every=1")
    run_dir = tmp_path / "run"
    out = capsys.readouterr().out

    sync_dir = run_file.parent
    hints = [line for line in out.splitlines() if f"wandb sync {sync_dir}" in line]
    assert len(hints) == 2 and hints[0].startswith(f"W&B run offline: {sync_dir};"), out[-2000:]

    records = wandb_records(run_file)
    config = {u.key: json.loads(u.value_json) for r in records if r.HasField("run") for u in r.run.config.update}
    config.update({u.key: json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update})
    assert config["params"] == sum(p.numel() for p in build_model(cfg).parameters()) > 0
    assert config["topology"] == {"world_size": 1, "nodes": 1, "ranks_per_node": 1, "zero_stage": 0,
                                  "precision": "fp32"}
    assert config["model"]["levels"] == 2  # the resolved config is there too

    history = _history(records)
    logged = {k for items in history.values() for k in items if not k.startswith("_")}
    assert {"train/bpd", "test/bpd", "optim/lr", "optim/grad_norm", "perf/images_per_s", "perf/mem_gb",
            "data/epoch", "health/recon_err/level_0", "health/logdet_step/max_abs", "samples/grid"} <= logged
    assert all(k.split("/")[0] in {"train", "test", "optim", "health", "data", "perf", "samples"} for k in logged), \
        logged
    grid = history[2]["samples/grid"]
    assert grid["_type"] == "image-file" and grid["caption"].startswith("row 1: T=0; row 2: T=0.7"), grid

    # metrics.jsonl: the same names, for the same steps (the grid as its path)
    written = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    names = {k for r in written for k in r} - {"step"}
    assert names == logged, names ^ logged
    assert {r["step"] for r in written} == set(history) == {0, 1, 2}  # step 0: the health check before the first step
    assert history[2]["test/bpd"] == next(r["test/bpd"] for r in written if "test/bpd" in r)


def test_log_images_false_keeps_the_grid_out_of_wandb(tmp_path, monkeypatch, single_process_env):
    _, run_file = _offline_run(tmp_path, monkeypatch, "wandb.log_images=false")
    history = _history(wandb_records(run_file))
    assert "test/bpd" in history[2] and "samples/grid" not in history[2], history[2]
    assert (tmp_path / "run" / "samples" / "step_00000002.png").is_file()


def test_older_runs_read_under_the_new_names(tmp_path):
    """A run logged before the sections (and resumed after: both kinds in one file) reads as one."""
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "bpd": 5.0, "lr": 1e-3, "grad_norm": 2.0, "skipped": 0, "images_per_s": 9.0}) + "\n" +
        json.dumps({"step": 1, "recon_err/level_0": 1e-7, "logdet_step/level_1/max": 0.5}) + "\n" +
        json.dumps({"step": 2, "test_bpd": 4.0, "samples": "s.png", "data_skipped": 3}) + "\n" +
        json.dumps({"step": 3, "train/bpd": 4.5, "health/recon_err/level_0": 2e-7, "samples/grid": "t.png"}) + "\n")
    assert read_metrics(tmp_path) == [
        {"step": 1, "train/bpd": 5.0, "optim/lr": 1e-3, "optim/grad_norm": 2.0, "skipped": 0,
         "perf/images_per_s": 9.0},
        {"step": 1, "health/recon_err/level_0": 1e-7, "health/logdet_step/level_1/max": 0.5},
        {"step": 2, "test/bpd": 4.0, "samples/grid": "s.png", "data/skipped_samples": 3},
        {"step": 3, "train/bpd": 4.5, "health/recon_err/level_0": 2e-7, "samples/grid": "t.png"}]


def test_every_metric_has_one_section():
    assert len(set(METRIC_NAMES.values())) == len(METRIC_NAMES), "two metrics logged under one name"
    assert all(v.count("/") >= 1 for v in METRIC_NAMES.values())
    with pytest.raises(KeyError, match="'new_thing' has no section: add it to flowscale.logging.METRIC_NAMES"):
        metric_name("new_thing")


THIRD_PARTY_WRITES = {"PYTORCH_NVML_BASED_CUDA_CHECK", "TORCHINDUCTOR_CACHE_DIR", "WANDB_SERVICE"}
"""Set by the libraries themselves, not by flowscale: DeepSpeed's import (the first two, through
torch) and W&B's service process (its socket)."""


def test_a_run_started_from_python_leaves_the_environment_as_it_found_it(tmp_path, monkeypatch, single_process_env):
    """The variables DeepSpeed reads from nowhere else (LOCAL_RANK, DS_ACCELERATOR) are held only
    while the process group lives, and W&B is told where and how quietly by arguments: after a run
    with offline W&B, os.environ is what it was, and W&B's files are under the run directory."""
    for name in ("LOCAL_RANK", "DS_ACCELERATOR", "WANDB_MODE", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_SILENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    before = dict(os.environ)
    cfg = load_config(None, TINY + [f"train.run_dir={tmp_path / 'run'}", "wandb.mode=offline", "train.steps=1"])
    train_main(cfg)
    after = dict(os.environ)
    changed = {k: after.get(k) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert set(changed) <= THIRD_PARTY_WRITES, changed
    assert len(list((tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert not (tmp_path / "wandb").exists()  # nothing in the working directory
