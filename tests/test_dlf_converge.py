"""`flowscale bench converge`: parameter matching, the target crossing, and a tiny end-to-end run."""

import json

import pytest

from flowscale.tools.bench.converge import count_params, first_reach, match_width, parse_spec
from flowscale.cli import main as cli_main
from flowscale.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_match_width_equalises_parameter_counts():
    glow = count_params(ModelConfig(preset="glow", levels=2, steps=2, width=32), 3, 16)
    for preset in ("dlf", "realnvp"):
        cfg = ModelConfig(preset=preset, levels=2, steps=2, width=32)
        w = match_width(cfg, glow, 3, 16)
        best = abs(count_params(ModelConfig(preset=preset, levels=2, steps=2, width=w), 3, 16) - glow)
        for other in (w - 1, w + 1):
            assert best <= abs(count_params(ModelConfig(preset=preset, levels=2, steps=2, width=other), 3, 16) - glow)
        assert best / glow < 0.05


def test_first_reach_interpolates_between_evaluations():
    curve = [{"step": 0, "wall_s": 0.0, "test_bpd": 8.0}, {"step": 10, "wall_s": 1.0, "test_bpd": 6.0},
             {"step": 20, "wall_s": 3.0, "test_bpd": 4.0}]
    assert first_reach(curve, 5.0, "step") == pytest.approx(15.0)
    assert first_reach(curve, 5.0, "wall_s") == pytest.approx(2.0)
    assert first_reach(curve, 8.5, "step") == 0
    assert first_reach(curve, 3.0, "step") is None


def test_model_specs():
    assert parse_spec("dlf") == ("dlf", [])
    assert parse_spec("dlf:model.dlt_beta_init=0,optim.lr=5e-3") == ("dlf", ["model.dlt_beta_init=0", "optim.lr=5e-3"])
    with pytest.raises(SystemExit):
        parse_spec("flowpp")
    with pytest.raises(SystemExit):
        parse_spec("dlf:lr=1")


def test_tiny_converge_run(tmp_path, capsys, single_process_env):
    out = tmp_path / "out"
    rc = cli_main(["bench", "converge", "model.levels=2", "model.steps=1", "model.width=8", "data.image_size=8",
                   "data.train_size=256", "data.test_size=64", "data.batch_size=16", "train.init_batch_size=32",
                   f"data.cache_dir={tmp_path / 'cache'}", "--steps", "6", "--eval-every", "3",
                   "--test-images", "32", "--out", str(out), "--models", "glow", "dlf:model.dlt_beta_init=0",
                   "realnvp"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| glow |" in text and "| dlf:model.dlt_beta_init=0 |" in text and "| realnvp |" in text
    assert "Linear-flow bound" in text
    data = json.loads((out / "converge.json").read_text())
    for r in data["results"].values():
        assert [p["step"] for p in r["curve"]] == [0, 3, 6]
    assert data["target"] == data["results"]["glow"]["curve"][-1]["test_bpd"]
    assert (out / "converge.md").is_file() and (out / "converge.png").stat().st_size > 1000
