"""The latent tools on real photo crops: encode -> decode reproduces the pixels for every preset
(fp32, bf16, class-conditional, any chunk size); interpolation endpoints are the inputs; a planted
attribute ("bright", labelled by mean intensity) is recovered by the direction of a trained demo
model; temperature sweeps reuse the same draws; the CLI commands write what they say and refuse
bad input with one line."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from flowscale.analysis import latent
from flowscale.cli import main as cli_main
from flowscale.config import load_config
from flowscale.data import demo_images
from flowscale.tools.latent_cli import load_directions
from helpers import small_flow

SCALES = [-1.0, -0.5, 0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def crops():
    """8 real 16x16 test-photo crops, uint8 [8, 3, 16, 16]."""
    return demo_images("test", 8, 16, seed=3)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny demo model trained for 24 steps in this process (EMA kept), shared by the module."""
    from helpers import free_port
    from flowscale.train import main as train_main

    root = tmp_path_factory.mktemp("latent_run")
    with pytest.MonkeyPatch.context() as mp:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
            mp.delenv(k, raising=False)
        mp.setenv("MASTER_ADDR", "127.0.0.1")
        mp.setenv("MASTER_PORT", str(free_port()))
        cfg = load_config(None, ["model.levels=2", "model.steps=2", "model.width=8", "data.train_size=128",
                                 "data.test_size=16", "data.batch_size=16", "train.init_batch_size=32",
                                 "train.steps=24", "train.log_every=8", "optim.warmup_steps=5", "optim.ema_decay=0.9",
                                 "train.eval_every=0", "train.sample_every=0", "train.progress=false",
                                 "wandb.mode=disabled", f"train.run_dir={root / 'run'}",
                                 f"data.cache_dir={root / 'cache'}"])
        train_main(cfg, resume=False)
    return root / "run"


def write_pngs(folder, images_uint8, prefix="img"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, x in enumerate(images_uint8):
        p = folder / f"{prefix}{i}.png"
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(p)
        paths.append(str(p))
    return paths


def read_png(path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy())


def cell(grid_px: torch.Tensor, rows: int, cols: int, r: int, c: int, size: int = 32) -> torch.Tensor:
    """Image (r, c) [3, size, size] of a labelled grid saved with zoom 1 (cells of size + 2 px,
    counted from the bottom-right corner, so the labels' width does not matter)."""
    h, w = grid_px.shape[:2]
    y0 = h - (size + 2) * (rows - r)
    x0 = w - (size + 2) * (cols - c)
    return grid_px[y0:y0 + size, x0:x0 + size].permute(2, 0, 1)


# -- library ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["nice", "realnvp", "glow", "dlf", "jet", "tarflow"])
def test_round_trip_every_preset(preset, crops):
    levels = 1 if preset in ("jet", "tarflow") else 2  # the transformer flows are one level of patch tokens
    flow = small_flow(preset, levels=levels, steps=2, width=8, size=16, dtype=torch.float32).eval()
    z, back, err = latent.reconstruct(flow, crops, 8, chunk=3)
    assert [tuple(e.shape[1:]) for e in z] == flow.latent_shapes(3, 16)
    assert all(e.dtype == torch.float32 for e in z)
    off = (back.int() - crops.int()).abs()
    # Bin centres decode back into their bins: exact up to float32 (DLF's iterative-free inverse may
    # land one 8-bit level off on a few sub-pixels).
    assert err.max() <= 1 and (off > 0).float().mean() < 0.01, (err, (off > 0).float().mean())
    # Chunking changes nothing, and the latents carry the image: the top level alone (one level: zeros) does not.
    z8 = latent.encode(flow, crops, 8, chunk=8)
    for a, b in zip(z, z8):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    zeroed = [torch.zeros_like(e) for e in z[:-1]] + [z[-1] * (0 if levels == 1 else 1)]
    assert latent.reconstruction_error(crops, latent.decode(flow, zeroed, 8), 8).min() > 8


def test_grayscale_model_images_and_grids(crops, tmp_path):
    """1 channel: the latent round trip, images read as grayscale (an RGB file converted to luma,
    as PIL's L), and a labelled grid written as a grayscale PNG."""
    from flowscale.tools.latent_cli import load_images, save_labelled_grid

    gray = torch.stack([torch.from_numpy(np.array(Image.fromarray(x.permute(1, 2, 0).numpy()).convert("L")))
                        for x in crops])[:, None]
    flow = small_flow("glow", levels=2, steps=2, width=8, channels=1, size=16, dtype=torch.float32).eval()
    z, back, err = latent.reconstruct(flow, gray, 8, chunk=3)
    assert [tuple(e.shape[1:]) for e in z] == flow.latent_shapes(1, 16) and err.max() <= 1
    Image.fromarray(gray[0, 0].numpy()).save(tmp_path / "g.png")
    Image.fromarray(crops[1].permute(1, 2, 0).numpy()).save(tmp_path / "rgb.png")
    x = load_images([str(tmp_path / "g.png"), str(tmp_path / "rgb.png")], 16, 1)
    assert x.shape == (2, 1, 16, 16) and torch.equal(x, gray[:2])
    out = save_labelled_grid(torch.cat([gray[:4], back[:4]]), 2, tmp_path / "grid.png", ["a", "b", "c", "d"],
                             ["in", "out"], zoom=1)
    with Image.open(out) as im:
        assert im.mode == "L"
        px = torch.from_numpy(np.asarray(im).copy())
    h, w = px.shape
    assert torch.equal(px[h - 18:h - 2, w - 18:w - 2], back[3, 0]), "the last cell is the last image"


def test_round_trip_bf16_and_class_conditional(crops):
    flow = small_flow("glow", levels=2, steps=2, width=8, size=16, dtype=torch.float32, num_classes=3).eval()
    y = torch.arange(len(crops)) % 3
    z, _, err = latent.reconstruct(flow, crops, 8, y=y)
    assert err.max() <= 1
    # The label is used: decoding under another class gives another image.
    assert latent.reconstruction_error(crops, latent.decode(flow, z, 8, y=(y + 1) % 3), 8).min() > 2
    with pytest.raises(ValueError, match="class-conditional"):
        latent.encode(flow, crops, 8)
    # A direction encodes each image under its own label when the batches carry labels.
    has = torch.tensor([True, False] * 4)
    d, _, _ = latent.attribute_direction(flow, [(crops[:5], has[:5], y[:5]), (crops[5:], has[5:], y[5:])], 8,
                                         per_level=True, chunk=2)
    for level in range(2):
        want = z[level][has].mean(0, keepdim=True) - z[level][~has].mean(0, keepdim=True)
        torch.testing.assert_close(d[level], want, rtol=1e-4, atol=1e-5)
    bf16 = flow.to(torch.bfloat16)
    _, _, err5 = latent.reconstruct(bf16, crops, 5, y=1)
    assert err5.max() <= 1  # 5-bit levels are wider than bf16's rounding
    _, _, err8 = latent.reconstruct(bf16, crops, 8, y=1)
    assert err8.max() <= 8


def test_interpolation_paths():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(3, 6, 4, 4, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(3, 1, 1, 1),
         torch.randn(3, 12, 2, 2, generator=g)]
    for mode in ("linear", "spherical"):
        path = latent.interpolate(z, 5, mode)
        for e, p in zip(z, path):
            p = p.view(2, 5, *e.shape[1:])
            torch.testing.assert_close(p[:, 0], e[:-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(p[:, -1], e[1:], rtol=1e-5, atol=1e-5)
    # spherical: the norm moves linearly from |a| to |b|, the direction along the great circle
    p = latent.interpolate(z, 5, "spherical")[0].view(2, 5, -1)
    na, nb = z[0][:-1].flatten(1).norm(dim=1), z[0][1:].flatten(1).norm(dim=1)
    torch.testing.assert_close(p.norm(dim=2), na[:, None] + (nb - na)[:, None] * torch.linspace(0, 1, 5))
    cos = torch.nn.functional.cosine_similarity(p[:, :-1], p[:, 1:], dim=2)
    torch.testing.assert_close(cos, cos[:, :1].expand_as(cos), rtol=1e-4, atol=1e-4)  # equal angular steps
    # fix_coarse=1: the top level stays at the first anchor along each row; finer levels still move
    fixed = latent.interpolate(z, 4, "linear", fix_coarse=1)
    assert torch.equal(fixed[1].view(2, 4, 12, 2, 2), z[1][:-1, None].expand(2, 4, 12, 2, 2))
    assert not torch.equal(fixed[0].view(2, 4, -1)[:, 0], fixed[0].view(2, 4, -1)[:, -1])


def test_temperature_sweep_uses_the_same_draws(crops):
    flow = small_flow("glow", levels=2, steps=2, width=8, size=16, dtype=torch.float32).eval()
    shapes = flow.latent_shapes(3, 16)
    every = latent.temperature_sweep(flow, shapes, 8, [0.0, 1.0], n=4, seed=1).view(2, 4, 3, 16, 16)
    assert all(torch.equal(every[0, 0], every[0, k]) for k in range(4))  # T = 0: the priors' means, one image
    assert not torch.equal(every[1, 0], every[1, 1])
    finest = latent.temperature_sweep(flow, shapes, 8, [0.0, 1.0], n=4, level=0, seed=1).view(2, 4, 3, 16, 16)
    assert torch.equal(finest[1], every[1])  # T = 1 on level 0 with the base at 1 = every level at 1
    assert not torch.equal(finest[0], every[0])  # T = 0 on the finest level only: the top still varies
    assert not torch.equal(finest[0, 0], finest[0, 1])


def test_planted_bright_attribute_is_recovered(demo_run):
    from flowscale.checkpoint import load_trained

    flow, cfg = load_trained(demo_run)
    x = demo_images("train", 64, 32, seed=11)
    m = latent.mean_intensity(x)
    bright = m > m.median()
    batches = [(x[s:s + 24], bright[s:s + 24]) for s in range(0, 64, 24)]  # streamed, uneven last batch
    direction, n_with, n_without = latent.attribute_direction(flow, batches, 8)
    assert (n_with, n_without) == (32, 32)
    assert all(float(d.abs().max()) == 0 for d in direction[:-1]) and float(direction[-1].abs().max()) > 0
    images = demo_images("test", 4, 32, seed=2)
    out = latent.decode(flow, latent.manipulate(latent.encode(flow, images, 8), direction, SCALES), 8)
    brightness = latent.mean_intensity(out).view(4, len(SCALES))
    steps = brightness[:, 1:] - brightness[:, :-1]
    assert (steps > 2).all(), brightness  # every image, every step of +0.5: brighter by > 2 of 255
    assert torch.equal(out.view(4, len(SCALES), 3, 32, 32)[:, 2], images)  # scale 0 is the image itself


# -- CLI -------------------------------------------------------------------------------------------

def test_cli_encode_interpolate(demo_run, tmp_path, capsys):
    images = demo_images("test", 3, 32, seed=5)
    files = write_pngs(tmp_path / "in", images)
    big = demo_images("test", 1, 64, seed=6)
    files += write_pngs(tmp_path / "big", big, prefix="big")
    out = tmp_path / "z.pt"
    assert cli_main(["encode", str(demo_run), *files, "--out", str(out), "--chunk", "2", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert "reconstruction error: max 0 level(s)" in cap.out
    notes = [ln for ln in cap.err.splitlines() if "note:" in ln]
    assert len(notes) == 1 and "1 of 4 image(s) are not 32x32 (big0.png 64x64)" in notes[0], cap.err
    saved = torch.load(out, weights_only=True)
    from flowscale.checkpoint import load_trained

    flow, _ = load_trained(demo_run)
    for a, b in zip(saved["latents"], latent.encode(flow, images, 8)):
        torch.testing.assert_close(a[:3], b)
    assert saved["files"] == files and saved["reconstruction_error_levels"].max() == 0

    grid = tmp_path / "grid.png"
    assert cli_main(["interpolate", str(demo_run), *files[:3], "--steps", "4", "--mode", "spherical",
                     "--zoom", "1", "--out", str(grid)]) == 0
    assert "endpoints differ from the inputs by at most 0 level(s)" in capsys.readouterr().out
    px = read_png(grid)
    assert px.shape[0] > 2 * 34 and px.shape[1] > 4 * 34  # 2 rows x 4 steps of 32 px, plus labels
    # The first and last columns of the labelled grid are the input images.
    for r in range(2):
        assert torch.equal(cell(px, 2, 4, r, 0), images[r]) and torch.equal(cell(px, 2, 4, r, 3), images[r + 1])


def test_cli_sweep(demo_run, tmp_path, capsys):
    from flowscale.checkpoint import load_trained

    grid = tmp_path / "sweep.png"
    assert cli_main(["sweep", str(demo_run), "--temperatures", "0", "1", "--level", "-1", "--n", "3", "--zoom", "1",
                     "--seed", "4", "--out", str(grid)]) == 0
    assert "level 1 only, the others at T=1" in capsys.readouterr().out
    flow, cfg = load_trained(demo_run)
    want = latent.temperature_sweep(flow, flow.latent_shapes(3, 32), 8, [0.0, 1.0], 3, level=-1, seed=4)
    px = read_png(grid)
    for k in range(6):
        assert torch.equal(cell(px, 2, 3, *divmod(k, 3)), want[k])
    assert cli_main(["sweep", str(demo_run), "--level", "2"]) == 2


def test_cli_manipulate_with_attribute_shards(demo_run, tmp_path, capsys, monkeypatch):
    # Shards with a planted attribute: demo crops labelled bright by mean intensity, through prep folder.
    x = demo_images("train", 32, 32, seed=11)
    m = latent.mean_intensity(x)
    write_pngs(tmp_path / "crops", x, prefix="c")
    rows = ["file,bright,striped"] + [f"c{i}.png,{int(m[i] > m.median())},{i % 2}" for i in range(len(x))]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    assert cli_main(["prep", "folder", str(tmp_path / "crops"), str(tmp_path / "shards"), "--attributes",
                     str(tmp_path / "labels.csv"), "--no-progress", "--workers", "1"]) == 0
    probe = write_pngs(tmp_path / "probe", demo_images("test", 2, 32, seed=2), prefix="p")
    grid = tmp_path / "man.png"
    argv = ["manipulate", str(demo_run), "--attribute", "bright", "--images", *probe, "--data",
            str(tmp_path / "shards" / "train"), "--scales", *map(str, SCALES), "--zoom", "1", "--out", str(grid)]
    capsys.readouterr()
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "computed, saved to" in out and "16 images with, 16 without" in out
    tensors, info = load_directions(demo_run)
    assert info["bright"]["n_with"] == 16 and info["bright"]["n_without"] == 16
    assert set(tensors) == {"bright/0", "bright/1"}
    # The grid's cells get brighter from left to right.
    px = read_png(grid)
    for r in range(2):
        mean = [cell(px, 2, len(SCALES), r, c).float().mean().item() for c in range(len(SCALES))]
        assert all(b > a + 2 for a, b in zip(mean, mean[1:])), mean
    # Cached the second time; W&B logging offline into the run.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    assert cli_main(argv + ["--wandb"]) == 0
    out = capsys.readouterr().out
    assert "cached in" in out and "logged latent/manipulate_bright to W&B run" in out
    assert (demo_run / "wandb_id.txt").is_file()
    # A second attribute joins the same file; the first stays.
    assert cli_main([*argv[:3], "striped", *argv[4:]]) == 0
    tensors, info = load_directions(demo_run)
    assert set(info) == {"bright", "striped"} and len(tensors) == 4
    assert info["striped"]["n_with"] == 16 and info["striped"]["data"] == str((tmp_path / "shards" / "train" /
                                                                              "manifest.json").resolve())


def test_cli_refusals(demo_run, tmp_path, capsys):
    files = write_pngs(tmp_path / "in", demo_images("test", 2, 32, seed=5))
    big = write_pngs(tmp_path / "big", demo_images("test", 1, 48, seed=5), prefix="big")
    (tmp_path / "junk.png").write_bytes(b"not an image")

    def refused(argv, code, *words):
        capsys.readouterr()
        assert cli_main(argv) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flowscale: error:"), err
        for w in words:
            assert w in err[0], (w, err[0])

    run = str(demo_run)
    refused(["encode", run, str(tmp_path / "missing.png")], 1, "missing.png does not exist")
    refused(["encode", run, str(tmp_path / "junk.png")], 3, "junk.png: not a readable image")
    refused(["encode", run, *big, "--no-resize"], 3, "big0.png: image is 48x48, the model takes 32x32")
    refused(["encode", run, *files, "--label", "1"], 2, "--label", "not class-conditional")
    refused(["encode", str(tmp_path / "norun"), *files], 1, "no complete checkpoint")
    refused(["interpolate", run, files[0]], 2, "at least two images")
    refused(["interpolate", run, *files, "--fix-coarse", "3"], 2, "--fix-coarse")
    # The demo's shards carry no attributes; an attribute not in the shards lists those they carry.
    refused(["manipulate", run, "--attribute", "Smiling", "--images", *files], 3, "carries no attributes", "--data")
    x = demo_images("train", 4, 32, seed=1)
    write_pngs(tmp_path / "crops", x, prefix="c")
    (tmp_path / "l.csv").write_text("file,bright,Young\n" + "".join(f"c{i}.png,{i % 2},1\n" for i in range(4)))
    assert cli_main(["prep", "folder", str(tmp_path / "crops"), str(tmp_path / "sh"), "--attributes",
                     str(tmp_path / "l.csv"), "--no-progress", "--workers", "1"]) == 0
    data = str(tmp_path / "sh" / "train")
    refused(["manipulate", run, "--attribute", "Smiling", "--images", *files, "--data", data], 3,
            "'Smiling' is not in", "it carries: bright, Young")
    refused(["manipulate", run, "--attribute", "Young", "--images", *files, "--data", data], 3,
            "needs images with and without", "4 with and 0 without")
