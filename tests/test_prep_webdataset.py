"""Foreign webdataset shards, written with webdataset's own ShardWriter at test time: converted by
`flowscale prep webdataset` (img2dataset and HF/timm layouts, jpg/png/webp/npy members, .cls and
.json labels, local and pipe: sources, bad inputs) and trained; and, unconverted, refused by
training with one line that gives the command which converts them."""

from __future__ import annotations

import functools
import http.server
import io
import json
import re
import shlex
import tarfile
import threading

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_prep.cli import main as prep
from flowscale.cli import main as cli_main
from flowscale.data import DataError, build_train_loader, eval_split, first_images
from flowscale.data.manifest import Manifest, ShardEntry, sha256_file, write_manifest

from data_files import data_cfg


def photo(i: int, w: int = 12, h: int = 10) -> np.ndarray:
    """uint8 [h, w, 3]: a smooth gradient (JPEG keeps it recognisable) offset by i."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 20 + i * 7) % 256, (yy * 25 + i * 11) % 256, ((xx + yy) * 9 + i * 3) % 256],
                    axis=2).astype(np.uint8)


def encoded(x: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, x)
    else:
        Image.fromarray(x).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def expected(data: bytes, size: int) -> np.ndarray:
    """What the converter must store, computed here with PIL alone: decode, center square, box filter."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(img.resize((size, size), Image.BOX))


def stored(split_dir) -> dict[str, tuple[np.ndarray, int | None]]:
    """{key: (HWC pixels, label)} of a converted split, read back through the training reader."""
    m = json.loads((split_dir / "manifest.json").read_text())
    keys = []
    for e in m["shards"]:
        with tarfile.open(split_dir / e["name"]) as tf:
            keys.extend(dict.fromkeys(n.split(".")[0] for n in tf.getnames()))
    cfg = data_cfg(split_dir, image_size=m["resolution"])
    xs, ys = [], []
    for _, x, y in eval_split(cfg, "train").batches(64):
        xs.append(x)
        ys.extend([None] * len(x) if y is None else y.tolist())
    x = torch.cat(xs).permute(0, 2, 3, 1).numpy()
    assert len(keys) == len(x) == m["num_samples"]
    return {k: (img, y) for k, img, y in zip(keys, x, ys)}


def img2dataset_layout(root, n: int = 7) -> dict[str, tuple[bytes, int]]:
    """img2dataset's output: 00000.tar ... with <9-digit key>.jpg/.txt/.json, and <shard>_stats.json."""
    root.mkdir()
    src = {}
    with wds.ShardWriter(str(root / "%05d.tar"), maxcount=4, verbose=0) as sink:
        for i in range(n):
            key, jpg = f"{i:09d}", encoded(photo(i, 12, 10), "JPEG")
            sink.write({"__key__": key, "jpg": jpg, "txt": f"a photo, number {i}",
                        "json": {"key": key, "status": "success", "caption": f"a photo, number {i}", "width": 12,
                                 "height": 10, "label": i % 3}})
            src[key] = jpg, i % 3
    for k in range(2):
        (root / f"{k:05d}_stats.json").write_text(json.dumps({"count": 4, "successes": 4, "failed_to_download": 0}))
    return src


def hf_layout(root) -> dict[str, tuple[bytes, int]]:
    """HF/timm ImageNet wds: imagenet1k-{train,validation}-NNNN.tar with .jpg (here also .png, .webp,
    .npy) + .cls + .json, and _info.json; every split in one folder."""
    root.mkdir()
    src = {}
    fmts = ["JPEG", "PNG", "WEBP", "npy"]
    for split, n in (("train", 8), ("validation", 3)):
        with wds.ShardWriter(str(root / f"imagenet1k-{split}-%04d.tar"), maxcount=5, verbose=0) as sink:
            for i in range(n):
                key, fmt = f"n0144_{split}_{i:04d}", fmts[i % 4]
                data = encoded(photo(i + 50, 10, 10), fmt)
                ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "npy": "npy"}[fmt]
                sink.write({"__key__": key, ext: data, "cls": i % 3,
                            "json": {"filename": f"{key}.JPEG", "label": i % 3, "class_name": f"class {i % 3}"}})
                if split == "train":
                    src[key] = data, i % 3
    (root / "_info.json").write_text(json.dumps({"name": "imagenet-1k", "splits": {"train": {"num_samples": 8},
                                                                                    "validation": {"num_samples": 3}}}))
    return src


def pixels_of(data: bytes, size: int) -> np.ndarray:
    if data[:6] == b"\x93NUMPY":  # .npy: raw pixels, cropped and box-filtered like the images
        x = np.load(io.BytesIO(data))
        return expected(encoded(x, "PNG"), size)
    return expected(data, size)


def test_img2dataset_and_hf_layouts_convert_and_train(tmp_path, capsys, single_process_env):
    from flowscale.config import load_config
    from flowscale.logging import read_metrics
    from flowscale.train import main as train_main

    laion, hf = img2dataset_layout(tmp_path / "laion"), hf_layout(tmp_path / "hf")
    out = tmp_path / "shards"
    # img2dataset: 12x10 jpgs center-cropped and resized, labels from the json field, captions left out
    assert prep(["webdataset", str(tmp_path / "laion"), str(out / "laion"), "--resolution", "8", "--label-field",
                 "label", "--split", "test", "--workers", "2", "--no-progress"]) == 0
    m = json.loads((out / "laion" / "test" / "manifest.json").read_text())
    assert m["labels"] and m["num_classes"] == 3 and m["num_samples"] == 7
    assert [s["count"] for s in m["shards"]] == [4, 3]
    assert m["source"]["layout"].startswith("img2dataset") and m["source"]["members_left_out"] == {"txt": 7}
    got = stored(out / "laion" / "test")
    assert list(got) == list(laion)  # the source's order
    for k, (jpg, label) in laion.items():
        np.testing.assert_array_equal(got[k][0], expected(jpg, 8))
        assert got[k][1] == label

    # HF/timm: one folder holds both splits, so the folder alone is refused with the patterns to use instead.
    assert prep(["webdataset", str(tmp_path / "hf"), str(out / "hf"), "--no-progress"]) == 1
    assert f"'{tmp_path}/hf/imagenet1k-train-{{0000..0001}}.tar'" in capsys.readouterr().err
    assert prep(["webdataset", f"{tmp_path}/hf/imagenet1k-train-{{0000..0001}}.tar", str(out / "hf"),
                 "--resolution", "8", "--num-classes", "3", "--workers", "1", "--no-progress"]) == 0
    m = json.loads((out / "hf" / "train" / "manifest.json").read_text())
    assert m["source"]["labels"] == ".cls" and m["num_classes"] == 3 and m["source"]["layout"].startswith("HF")
    got = stored(out / "hf" / "train")
    assert list(got) == list(hf)
    for k, (data, label) in hf.items():  # jpg, png, lossless webp and npy members
        np.testing.assert_array_equal(got[k][0], pixels_of(data, 8))
        assert got[k][1] == label

    run_dir = tmp_path / "run"  # train on one, evaluate on the other, class-conditional on the kept labels
    cfg = load_config(None, ["data.dataset=shards", f"data.train_manifest={out / 'hf' / 'train'}",
                             f"data.test_manifest={out / 'laion' / 'test'}", "data.image_size=8", "data.batch_size=4",
                             "data.num_workers=0", "model.levels=1", "model.steps=1", "model.width=8",
                             "model.num_classes=3", "train.steps=2", "train.log_every=1", "train.init_batch_size=8",
                             "train.progress=false", "wandb.mode=disabled", f"train.run_dir={run_dir}"])
    result = train_main(cfg)
    assert result["step"] == 2 and np.isfinite(result["test_bpd"])
    assert [r["step"] for r in read_metrics(run_dir) if "bpd" in r] == [1, 2]
    assert (run_dir / "samples" / "step_00000002.png").is_file()


def test_pipe_and_http_sources_and_bad_inputs(tmp_path, capsys):
    good = {f"s{i:03d}": encoded(photo(i, 8, 8), "PNG") for i in range(6)}
    corrupt = encoded(photo(9, 8, 8), "JPEG")[:40] + b"\x00" * 50  # a JPEG header, then nothing decodable
    (tmp_path / "src").mkdir()
    with wds.ShardWriter(str(tmp_path / "src" / "part-%02d.tar"), maxcount=5, verbose=0) as sink:
        for i, (k, png) in enumerate(good.items()):
            sink.write({"__key__": k, "png": png, "cls": i})
            if i == 1:
                sink.write({"__key__": "bad-jpg", "jpg": corrupt, "cls": 1})
                sink.write({"__key__": "no-image", "txt": "caption only", "cls": 1})
                sink.write({"__key__": "bad-label", "png": png, "cls": "cat"})
    src = f"pipe:cat {tmp_path}/src/part-{{00..01}}.tar"
    assert prep(["webdataset", src, str(tmp_path / "a"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"data_prep: error: cannot convert pipe:cat .*part-00\.tar, sample 'bad-jpg': "
                                      r".*--bad-input skip", err[0]), err
    assert not (tmp_path / "a" / "train" / "manifest.json").exists()

    assert prep(["webdataset", src, str(tmp_path / "b"), "--bad-input", "skip", "--no-progress"]) == 0
    m = json.loads((tmp_path / "b" / "train" / "manifest.json").read_text())
    assert m["num_samples"] == 6 and m["resolution"] == 8 and m["source"]["resize"] == "none"
    assert m["source"]["skipped_inputs"] == 3 and m["num_classes"] == 6
    reasons = " | ".join(m["source"]["skipped_examples"])
    for words in ("'bad-jpg'", "'no-image': no image member", "'bad-label': .cls label is 'cat'"):
        assert words in reasons
    got = stored(tmp_path / "b" / "train")
    assert list(got) == list(good) and [y for _, y in got.values()] == list(range(6))
    for k, png in good.items():
        np.testing.assert_array_equal(got[k][0], np.asarray(Image.open(io.BytesIO(png))))
    # The same shards over http (a local server): byte-identical output.
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "src"))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/part-{{00..01}}.tar"
            assert prep(["webdataset", url, str(tmp_path / "c"), "--bad-input", "skip", "--no-progress"]) == 0
        finally:
            server.shutdown()
    for name in ("wds-train-000000.tar", "wds-train-000001.tar"):
        assert (tmp_path / "c" / "train" / name).read_bytes() == (tmp_path / "b" / "train" / name).read_bytes()
    # Re-running resumes (nothing to do, same manifest); other options in the same folder are refused.
    before = (tmp_path / "b" / "train" / "manifest.json").read_bytes()
    assert prep(["webdataset", src, str(tmp_path / "b"), "--bad-input", "skip", "--no-progress"]) == 0
    assert (tmp_path / "b" / "train" / "manifest.json").read_bytes() == before
    assert prep(["webdataset", src, str(tmp_path / "b"), "--bad-input", "skip", "--no-labels", "--no-progress"]) == 1


def test_grayscale_shards_stay_one_channel(tmp_path):
    gray = {f"g{i}": photo(i, 8, 8)[:, :, 0] for i in range(4)}  # [8, 8] uint8
    (tmp_path / "src").mkdir()
    with wds.ShardWriter(str(tmp_path / "src" / "%02d.tar"), maxcount=10, verbose=0) as sink:
        for i, (k, x) in enumerate(gray.items()):  # mode L PNGs and [H, W] .npy arrays
            sink.write({"__key__": k, "png" if i % 2 else "npy": encoded(x, "PNG") if i % 2 else encoded(x, "npy"),
                        "cls": i})
    assert prep(["webdataset", str(tmp_path / "src"), str(tmp_path / "g"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "g" / "train" / "manifest.json").read_text())
    assert m["channels"] == 1 and m["source"]["channels"].startswith("auto: 1") and m["source"]["conversions"] == {}
    cfg = data_cfg(tmp_path / "g" / "train", channels=1)
    x = torch.cat([b for _, b, _ in eval_split(cfg, "train").batches(8)])
    np.testing.assert_array_equal(x[:, 0].numpy(), np.stack(list(gray.values())))
    assert prep(["webdataset", str(tmp_path / "src"), str(tmp_path / "rgb"), "--channels", "3", "--no-progress"]) == 0
    m = json.loads((tmp_path / "rgb" / "train" / "manifest.json").read_text())
    assert m["channels"] == 3 and m["source"]["conversions"] == {"L->RGB": 4}


def foreign_split(root) -> None:
    """jpg+txt+json webdataset shards under a hand-written flowscale manifest (as a user would try)."""
    root.mkdir()
    with wds.ShardWriter(str(root / "%05d.tar"), maxcount=3, verbose=0) as sink:
        for i in range(5):
            sink.write({"__key__": f"{i:09d}", "jpg": encoded(photo(i, 8, 8), "JPEG"), "txt": "x", "json": {"i": i}})
    entries = [ShardEntry(p.name, c, p.stat().st_size, sha256_file(p)) for p, c in
               zip(sorted(root.glob("*.tar")), (3, 2))]
    write_manifest(Manifest("mine", "mine", "train", 8, 3, "png", 5, False, shards=entries), root)


def test_foreign_shards_in_training_say_how_to_convert_them(tmp_path):
    from flowscale.evaluate import evaluate_bpd
    from helpers import small_flow

    foreign_split(tmp_path / "wds")
    with pytest.raises(DataError) as e:
        first_images(data_cfg(tmp_path / "wds"), 4)
    msg = str(e.value)
    assert "'000000000'" in msg and "a .jpg image" in msg and "not a flowscale shard" in msg
    assert "bad_data=skip" not in msg and "\n" not in msg
    cmd = re.search(r"run `(flowscale prep webdataset [^`]+)`", msg).group(1)
    assert f"'{tmp_path}/wds/{{00000..00001}}.tar'" in cmd and "--resolution 8" in cmd
    # bad_data=skip cannot help: every reader ends in one line, not a traceback or an endless loop.
    for read in (lambda cfg: first_images(cfg, 4), lambda cfg: next(build_train_loader(cfg)),
                 lambda cfg: evaluate_bpd(small_flow(levels=1, steps=1, size=8, dtype=torch.float32),
                                          eval_split(cfg, "test"), 8, 4)):
        with pytest.raises(DataError, match=r"yielded no usable image.*sample '0000000\d\d'.*a \.jpg image.*"
                                            r"flowscale prep webdataset") as e:
            read(data_cfg(tmp_path / "wds", bad_data="skip", shuffle_buffer=0))
        assert "\n" not in str(e.value)
    # The command it gives works as given.
    args = shlex.split(cmd)[2:]
    assert prep(args + ["--no-progress"]) == 0
    out = re.search(r"at (\S+)$", msg).group(1)
    assert len(first_images(data_cfg(out), 5)) == 5


def test_tar_as_manifest_is_one_line_before_anything_is_written(tmp_path, capsys, single_process_env):
    foreign_split(tmp_path / "wds")
    run_dir = tmp_path / "run"
    code = cli_main(["train", "data.dataset=shards", f"data.train_manifest={tmp_path}/wds/00000.tar",
                     f"data.test_manifest={tmp_path}/wds", "data.image_size=8", "model.levels=1", "model.steps=1",
                     "model.width=8", "train.steps=1", "train.progress=false", "wandb.mode=disabled",
                     f"train.run_dir={run_dir}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowscale: error")]
    assert code != 0 and len(err) == 1 and not run_dir.exists()
    assert "00000.tar is a tar shard, not a manifest" in err[0]
    assert f"flowscale prep webdataset '{tmp_path}/wds/{{00000..00001}}.tar'" in err[0]
    assert "set data.train_manifest=" in err[0]
