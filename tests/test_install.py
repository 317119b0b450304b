"""A non-editable install (`pip install .`, as on a cluster) is complete: from a directory that
is not the checkout, the bundled configs are listed and a training run picks one by name and
writes a checkpoint.

The wheel is built once, offline, from a copy of the checkout (the copy then deleted), and
installed into venvs that see the packages of the environment running the tests (torch,
deepspeed, ... need no download): the system interpreter's, or, when the tests run inside a
virtual environment, that environment's too (:func:`make_venv`). Nothing is uninstalled: a
venv's own site-packages come first on ``sys.path`` and an editable finder sits at the end of
``sys.meta_path``, so the venv's copy is what gets imported -- asserted below through
``flowscale.__file__``. Every run also makes a venv inside a venv, so the route a user takes
(the README's command in a fresh virtual environment) is exercised whatever runs the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a checkout holds besides sources; not copied into the build tree.
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "runs", "wandb",
                                     ".pytest_cache", "bench_out", ".venv")

TINY = ["data.dataset=demo", "data.image_size=32", "data.batch_size=8", "data.train_size=64", "data.test_size=16",
        "model.steps=2", "model.width=16", "train.steps=2", "train.init_batch_size=16", "train.checkpoint_every=2",
        "train.eval_every=0", "train.sample_every=0", "train.progress=false", "optim.warmup_steps=1",
        "wandb.mode=disabled"]


def _clean_env() -> dict[str, str]:
    """This process's environment minus whatever could point Python at the checkout or make the
    run think it is one rank of a job."""
    drop = ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    return env | {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONNOUSERSITE": "1"}


def _run(cmd, cwd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_clean_env(), capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


# Exit status 0 where setuptools can build wheels: bdist_wheel is part of setuptools from 70.1 on,
# older ones need the wheel package.
BUILDS_WHEELS = ("import importlib.util as u; "
                 "raise SystemExit(not (u.find_spec('setuptools.command.bdist_wheel') or u.find_spec('wheel')))")
# The site-packages of the environment a python runs in, when that is a virtual environment.
VENV_SITES = ("import json, site, sys; "
              "print(json.dumps(site.getsitepackages([sys.prefix]) if sys.prefix != sys.base_prefix else []))")


def site_packages(python: Path) -> Path:
    return Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd="/").stdout.strip())


def make_venv(python: Path, target: Path) -> Path:
    """A venv made by ``python`` that sees what ``python`` sees; returns the venv's python.

    ``--system-site-packages`` gives it the BASE interpreter's packages only: made from inside a
    virtual environment, a venv's base is that environment's base. So where ``python`` runs in a
    venv, a .pth file adds that venv's site-packages (through ``site.addsitedir``, its own .pth
    files included) right after the new venv's own and before the base's, the order ``python``
    itself has. ``--without-pip``: the venv runs the pip it sees (ensurepip would put its own
    pip and setuptools first)."""
    _run([python, "-m", "venv", "--system-site-packages", "--without-pip", target], cwd=target.parent)
    venv_python = target / "bin" / "python"
    parent_sites = json.loads(_run([python, "-c", VENV_SITES], cwd=target.parent).stdout)
    if parent_sites:
        line = "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in parent_sites)
        (site_packages(venv_python) / "_parent_environment.pth").write_text(line + "\n")
    return venv_python


def wheel_builder() -> Path:
    """This interpreter, or else its base interpreter, whichever has a setuptools that builds
    wheels (a venv's own ensurepip setuptools may be too old). The wheel is pure Python: which
    one builds it does not change what gets installed."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in dict.fromkeys([Path(sys.executable), base]):
        if python.exists() and subprocess.run([python, "-c", BUILDS_WHEELS], env=_clean_env()).returncode == 0:
            return python
    pytest.fail("no setuptools that builds wheels here or in the base interpreter (setuptools >= 70.1, or an older "
                "one with the wheel package): pip install -e '.[test]' installs one")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """flowscale's wheel, built offline from a copy of this checkout, the copy then deleted."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    # Build from a copy: pip builds in the source tree (build/, *.egg-info), and the checkout is
    # shared with other runs; a copy also proves the install needs nothing from the checkout.
    shutil.copytree(REPO, src, symlinks=True, ignore=NOT_SOURCES)
    _run([wheel_builder(), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
          "--wheel-dir", root / "dist", src], cwd=root, timeout=600)
    shutil.rmtree(src)
    (built,) = (root / "dist").glob("flowscale-*.whl")
    return built


def install(wheel: Path, python: Path) -> None:
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel], cwd=wheel.parent, timeout=600)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv, made by the interpreter running the tests, with the wheel installed."""
    env_dir = tmp_path_factory.mktemp("install") / "venv"
    install(wheel, make_venv(Path(sys.executable), env_dir))
    return env_dir


def test_a_venv_made_inside_a_venv_sees_that_venv(wheel, tmp_path):
    """The venv route in every run: a venv made from inside another venv sees that venv's packages
    (a module placed there), the base interpreter's (torch) and its own flowscale copy, first."""
    outer = make_venv(Path(sys.executable), tmp_path / "outer")
    (site_packages(outer) / "outer_environment_probe.py").write_text("")
    inner = make_venv(outer, tmp_path / "inner")
    install(wheel, inner)
    probe = ("import json, outer_environment_probe as o, flowscale, torch; "
             "print(json.dumps([o.__file__, flowscale.__file__, torch.__file__]))")
    seen, own, torch_file = map(Path, json.loads(_run([inner, "-c", probe], cwd=tmp_path).stdout))
    assert seen.parent == site_packages(outer)
    assert own.is_relative_to(site_packages(inner)), own
    assert not torch_file.is_relative_to(tmp_path), torch_file  # the environment running the tests provides it


def test_the_venv_imports_its_own_copy(venv, tmp_path):
    probe = ("import json, flowscale, launch, flowscale.config as c; "
             "print(json.dumps([flowscale.__file__, launch.__file__, str(c.CONFIG_DIR)]))")
    files = [Path(f) for f in json.loads(_run([venv / "bin" / "python", "-c", probe], cwd=tmp_path).stdout)]
    site = next((venv / "lib").glob("python3*/site-packages"))
    for f in files:
        assert f.is_relative_to(site), f"{f} is not the venv's copy (site-packages: {site})"
        assert not f.resolve().is_relative_to(REPO.resolve())
    shipped = {p.name for p in (site / "launch" / "slurm_local").glob("*.sh")}
    assert {"common.sh", "start.sh", "stop.sh", "start_two_nodes.sh", "stop_two_nodes.sh"} <= shipped, shipped
    bundled = {p.name for p in files[2].glob("*.yaml")}
    assert bundled == {p.name for p in (REPO / "flowscale" / "configs").glob("*.yaml")}


def test_list_configs_from_another_directory(venv, tmp_path):
    out = _run([venv / "bin" / "flowscale", "train", "--list-configs"], cwd=tmp_path).stdout
    header, *rows = out.splitlines()
    assert str(venv) in header, header  # the directory it lists is the installed one
    names = {row.split()[0] for row in rows}
    assert names == {p.stem for p in (REPO / "flowscale" / "configs").glob("*.yaml")}
    assert any(row.split(None, 1)[1].startswith("Glow on ImageNet 32x32") for row in rows if "glow_imagenet32" in row)


@pytest.mark.slow
def test_train_a_bundled_config_by_name(venv, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    run_dir = tmp_path / "run"
    # The config names its ImageNet shards; the demo photos stand in for them (the manifests dropped).
    _run([venv / "bin" / "flowscale", "train", "glow_imagenet32", *TINY, "data.train_manifest=null",
          "data.test_manifest=null", f"data.cache_dir={tmp_path / 'cache'}",
          f"train.run_dir={run_dir}"], cwd=work, timeout=600)
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert (ckpt / "COMPLETE").is_file(), sorted(p.name for p in run_dir.rglob("*"))
    saved = (run_dir / "config.yaml").read_text()
    # The bundled file's values (the defaults would be adam and no learned top prior), under the overrides.
    for line in ("name: adamax", "learn_top: true", "zero_stage: 1", "steps: 2", "width: 16"):
        assert line in saved, line
    assert not (work / "runs").exists() and not list(work.iterdir()), "nothing written to the working directory"


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["jet", "tarflow"])
def test_transformer_presets_train_and_their_latents_work_from_the_install(venv, tmp_path, preset):
    """`flowscale train model.preset=jet|tarflow` on the demo, then `flowscale encode` and
    `flowscale interpolate` on real images, all from the installed copy in another directory."""
    from PIL import Image

    from flowscale.data import demo_images

    work = tmp_path / "elsewhere"
    work.mkdir()
    run_dir = tmp_path / "run"
    small = [o for o in TINY if not o.startswith(("model.steps", "model.width"))]
    _run([venv / "bin" / "flowscale", "train", f"model.preset={preset}", "model.steps=2", "model.width=16",
          "model.vit_depth=1", "model.vit_heads=2", "model.patch_size=4", *small,
          f"data.cache_dir={tmp_path / 'cache'}", f"train.run_dir={run_dir}"], cwd=work, timeout=600)
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    photos = demo_images("test", 2, 32, seed=0).permute(0, 2, 3, 1).numpy()
    for i, x in enumerate(photos):
        Image.fromarray(x).save(work / f"{i}.png")
    out = _run([venv / "bin" / "flowscale", "encode", run_dir, "0.png", "1.png", "--out", "z.pt"], cwd=work,
               timeout=600).stdout
    assert (work / "z.pt").stat().st_size > 0 and "level" in out, out
    _run([venv / "bin" / "flowscale", "interpolate", run_dir, "0.png", "1.png", "--steps", "3", "--out", "grid.png"],
         cwd=work, timeout=600)
    with Image.open(work / "grid.png") as im:
        assert im.size[0] >= 3 * 32 and im.size[1] >= 32
