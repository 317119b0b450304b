"""Config tree: YAML + dotted overrides, and a clear error for each kind of bad input."""

from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch

from flowscale.cli import main as cli_main
from flowscale.config import (CONFIG_DIR, Config, ConfigError, config_path, config_summary, describe_fields, field_docs,
                              from_dict, list_configs, load_config, to_dict, to_yaml)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_demo_config():
    assert load_config(CONFIG_DIR / "demo.yaml") == load_config() == load_config("demo")


def test_config_path_takes_a_bundled_name_with_or_without_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: only the package's copy can answer
    assert config_path("glow_imagenet32") == config_path("glow_imagenet32.yaml") == CONFIG_DIR / "glow_imagenet32.yaml"
    assert CONFIG_DIR.parent == Path(config_path.__code__.co_filename).parent  # inside the package
    assert load_config("glow_imagenet32").model.steps == 48  # the file's value, not the default 4


def test_config_path_an_existing_file_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("demo.yaml").write_text("model:\n  levels: 1\n")
    assert config_path("demo.yaml") == Path("demo.yaml")
    assert load_config("demo.yaml").model.levels == 1
    assert load_config("demo").model.levels == 3  # the bare name is still the bundled one
    sub = tmp_path / "mine" / "run.yaml"
    sub.parent.mkdir()
    sub.write_text("optim:\n  lr: 0.25\n")
    assert config_path(sub) == sub and load_config(str(sub)).optim.lr == 0.25
    assert load_config("mine/run.yaml").optim.lr == 0.25  # relative paths too


def test_unknown_config_name_lists_the_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        config_path("glow_imagenet33")
    msg = str(e.value)
    assert "glow_imagenet33" in msg and "not found" in msg
    assert all(name in msg for name in list_configs()), msg
    with pytest.raises(ConfigError, match="glow_imagenet33"):
        load_config("glow_imagenet33")
    # A path (it has a directory) is never taken for a name; the error still points at the name.
    with pytest.raises(ConfigError, match=r"configs/demo.yaml' not found.*bundled config 'demo'"):
        config_path("configs/demo.yaml")


def test_list_configs_names_every_bundled_file_with_its_summary():
    configs = list_configs()
    assert list(configs) == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) and "demo" in configs
    assert all(p.is_file() and p.parent == CONFIG_DIR for p in configs.values())
    assert config_summary(configs["demo"]).startswith("The demo run")
    assert all(config_summary(p) for p in configs.values())
    top = REPO / "configs"  # a source checkout keeps the old top-level path, as a link to the package's copy
    if top.exists():
        assert top.resolve() == CONFIG_DIR.resolve()


@pytest.mark.parametrize("command", ["train", "bound", "submit"])
def test_list_configs_flag(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main([command, "--list-configs"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert listed == {name: config_summary(p) for name, p in list_configs().items()}


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  levels: 2\n  preset: realnvp\noptim:\n  lr: 0.01\n")
    cfg = load_config(p, ["model.levels=1", "optim.lr=1e-3", "train.temperatures=[0.5,1.0]", "model.actnorm=false"])
    assert cfg.model.levels == 1 and cfg.model.preset == "realnvp"
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.train.temperatures == [0.5, 1.0]
    assert cfg.model.actnorm is False
    assert cfg.data.batch_size == Config().data.batch_size


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config(None, ["model.preset=nice", "data.n_bits=5"])
    p = tmp_path / "resolved.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, field, hint", [
    ("model.preset=glo", "model.preset", "nice"),                # bad Literal: lists the choices
    ("model.levls=2", "model.levls", "levls"),                   # unknown key
    ("model.levels=two", "model.levels", "two"),                 # wrong type
    ("data.n_bits=9", "data.n_bits", "1..8"),                    # range
    ("optim.lr=-1", "optim.lr", "> 0"),
    ("model.levels=6", "model.levels", "divisible"),             # cross-field: 32 px / 2^6
    ("train.temperatures=[-1]", "train.temperatures", ">= 0"),
    ("nosection.x=1", "nosection", "nosection"),
    ("optim.decay=exponential", "optim.min_lr_ratio", "> 0"),     # exponential needs a floor
])
def test_bad_values_name_the_field(override, field, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{field}" in msg and hint in msg, msg


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"nice.*realnvp.*glow"):
        load_config(None, ["model.preset=glo"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["model.levels"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(p)


def _all_dataclasses(cls):
    yield cls
    default = cls()
    for f in fields(cls):
        v = getattr(default, f.name)
        if is_dataclass(v):
            yield from _all_dataclasses(type(v))


def test_every_field_has_a_docstring():
    for cls in _all_dataclasses(Config):
        docs = field_docs(cls)
        missing = [f.name for f in fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"
    assert len(describe_fields()) > 30


def test_every_shipped_config_loads():
    assert list_configs()
    for name, p in list_configs().items():
        assert load_config(name) == load_config(p)


def test_cli_reports_config_errors_before_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = cli_main(["train", "model.preset=glo", f"train.run_dir={run_dir}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "model.preset" in err and "glow" in err
    assert not run_dir.exists(), "nothing may be written before the config is valid"


@pytest.mark.parametrize("name", ["train_manifest", "test_manifest", "train_shards", "test_shards"])
def test_shards_fields_are_refused_with_the_demo_dataset(tmp_path, capsys, name):
    with pytest.raises(ConfigError, match=f"'data.{name}': set, but data.dataset=demo does not read it; add "
                                          f"data.dataset=shards"):
        load_config(None, [f"data.{name}=/data/x"])
    run_dir = tmp_path / "run"
    assert cli_main(["train", f"data.{name}=/data/x", f"train.run_dir={run_dir}"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not run_dir.exists()
    both = load_config(None, ["data.dataset=shards", "data.train_manifest=/a", "data.test_manifest=/b", f"data.{name}=/c"])
    assert getattr(both.data, name) == "/c"


def test_train_help_lists_fields(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "model.preset" in out and "Architecture family" in out and "optim.lr" in out


@pytest.mark.parametrize("decay", ["none", "cosine", "linear", "exponential"])
def test_lr_schedule_closed_forms(decay):
    import math

    from flowscale.build import build_optimizer

    cfg = load_config(None, [f"optim.decay={decay}", "optim.warmup_steps=10", "train.steps=110",
                             "optim.min_lr_ratio=0.01"])
    _, f = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warmup
    expected = {"none": lambda p: 1.0,
                "cosine": lambda p: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p)),
                "linear": lambda p: 0.01 + 0.99 * (1 - p),
                "exponential": lambda p: 0.01 ** p}[decay]
    for step in (10, 35, 60, 109, 110, 500):
        p = min(1.0, (step - 10) / 100)
        assert f(step) == pytest.approx(expected(p), rel=1e-12), step
    if decay != "none":
        assert f(110) == pytest.approx(0.01) and f(60) < f(35) < 1.0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_communication_settings_follow_the_stage_and_reach_deepspeed(stage):
    """null = DeepSpeed's recommendation per stage (overlap at ZeRO-2/3, contiguous gradients,
    its default bucket sizes); a value set is passed through; inverse recompute is accepted on
    every stage (tests/test_zero_recompute.py trains it)."""
    from flowscale.engine import deepspeed_config

    cfg = load_config(None, ["memory.inverse_recompute=true", f"engine.zero_stage={stage}", "data.batch_size=8"])
    z = deepspeed_config(cfg, 2)["zero_optimization"]
    assert z["stage"] == stage and z["overlap_comm"] == (stage >= 2) and z["contiguous_gradients"] is True
    assert z["reduce_bucket_size"] == 500_000_000 and z["stage3_param_persistence_threshold"] == 100_000
    cfg = load_config(None, [f"engine.zero_stage={stage}", "engine.overlap_comm=false", "engine.reduce_bucket_size=1000",
                             "engine.param_persistence_threshold=0", "engine.prefetch_bucket_size=0"])
    z = deepspeed_config(cfg, 1)["zero_optimization"]
    assert not z["overlap_comm"] and z["reduce_bucket_size"] == 1000
    assert z["stage3_param_persistence_threshold"] == 0 and z["stage3_prefetch_bucket_size"] == 0
    with pytest.raises(ConfigError, match=r"engine.reduce_bucket_size.*>= 1"):
        load_config(None, ["engine.reduce_bucket_size=0"])
