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

from helpers import data_cfg


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
    for k, got in enumerate((4, n - 4)):  # img2dataset tried 4 urls per shard; the tar holds the successes
        (root / f"{k:05d}_stats.json").write_text(json.dumps({"count": 4, "successes": got,
                                                              "failed_to_download": 4 - got}))
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
    info = {split: {"name": split, "num_samples": n, "filenames": [f"imagenet1k-{split}-{k:04d}.tar" for k in
                                                                  range(-(-n // 5))],
                    "shard_lengths": [min(5, n - 5 * k) for k in range(-(-n // 5))]}
            for split, n in (("train", 8), ("validation", 3))}
    (root / "_info.json").write_text(json.dumps({"name": "imagenet-1k", "splits": info}))  # timm's form
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
    assert "warning" not in capsys.readouterr().err  # the counts match the _stats.json successes
    m = json.loads((out / "laion" / "test" / "manifest.json").read_text())
    assert m["labels"] and m["num_classes"] == 3 and m["num_samples"] == 7 and m["classes"] == ["0", "1", "2"]
    assert m["source"]["stated_samples"] == {"by": "img2dataset's *_stats.json successes", "source_shards": 2,
                                             "samples": 7}
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
    assert "warning" not in capsys.readouterr().err  # the counts match _info.json's shard_lengths
    m = json.loads((out / "hf" / "train" / "manifest.json").read_text())
    assert m["source"]["labels"] == ".cls" and m["num_classes"] == 3 and m["source"]["layout"].startswith("HF")
    assert m["source"]["stated_samples"]["samples"] == 8
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
    assert [r["step"] for r in read_metrics(run_dir) if "train/bpd" in r] == [1, 2]
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
    # Following the error's advice in its folder works; going back to `error` over skipped inputs is the same error.
    assert prep(["webdataset", src, str(tmp_path / "a"), "--bad-input", "skip", "--no-progress"]) == 0
    assert (tmp_path / "a" / "train" / "manifest.json").read_bytes() == before
    capsys.readouterr()
    assert prep(["webdataset", src, str(tmp_path / "b"), "--no-progress"]) == 1
    assert re.match(r"data_prep: error: cannot convert pipe:cat .*part-00\.tar, sample 'bad-jpg': .*--bad-input skip",
                    capsys.readouterr().err)


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


def named_shards(root, labels: list, per_shard: int = 4) -> dict[str, object]:
    """Shards of 8x8 PNGs whose .json field 'label' is labels[i] (HF datasets store class names so);
    returns {key: label}."""
    root.mkdir()
    with wds.ShardWriter(str(root / "%02d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, y in enumerate(labels):
            sink.write({"__key__": f"k{i:03d}", "png": encoded(photo(i, 8, 8), "PNG"),
                        "json": {"label": y, "caption": f"photo {i}"}})
    return {f"k{i:03d}": y for i, y in enumerate(labels)}


def labels_of(split_dir) -> dict[str, int]:
    return {k: y for k, (_, y) in stored(split_dir).items()}


def test_class_name_labels_are_indexed_alike_by_every_worker_and_split(tmp_path, capsys):
    fish = ["tench", "goldfish", "great white shark", "tiger shark"]  # ImageNet's order, not sorted
    train = named_shards(tmp_path / "train", [fish[i * 3 % 4] for i in range(10)] + [3, "7"])  # 2 indices: mixed
    args = ["--label-field", "label", "--bad-input", "skip", "--no-progress"]
    assert prep(["webdataset", str(tmp_path / "train"), str(tmp_path / "a"), "--workers", "2"] + args) == 0
    assert "the labels are class names; reading the labels of all 3 source shards" in capsys.readouterr().err
    m = json.loads((tmp_path / "a" / "train" / "manifest.json").read_text())
    assert m["classes"] == sorted(fish) and m["num_classes"] == 4 and m["num_samples"] == 10
    assert m["source"]["labels"] == ".json field 'label' (class names, indexed in sorted order of the names found)"
    assert labels_of(tmp_path / "a" / "train") == {k: sorted(fish).index(y) for k, y in train.items() if y in fish}
    assert [e.split(": ", 1)[1] for e in m["source"]["skipped_examples"]] == [
        ".json field 'label' is 3, a class index where the labels are class names (the first label is a name)",
        ".json field 'label' is '7', a class index where the labels are class names (the first label is a name)"]
    # One worker writes the same bytes (the indices were fixed before any shard was converted).
    assert prep(["webdataset", str(tmp_path / "train"), str(tmp_path / "b"), "--workers", "1"] + args) == 0
    for f in ("manifest.json", "wds-train-000000.tar", "wds-train-000002.tar"):
        assert (tmp_path / "b" / "train" / f).read_bytes() == (tmp_path / "a" / "train" / f).read_bytes()
    assert prep(["verify", str(tmp_path / "a"), "--no-progress"]) == 0

    # A test split holding some of the classes, indexed as the train split: --classes OUT/train.
    named_shards(tmp_path / "test", ["tiger shark", "tench", "koi", "tench"])
    cmd = ["webdataset", str(tmp_path / "test"), str(tmp_path / "a"), "--split", "test", "--label-field", "label",
           "--classes", str(tmp_path / "a" / "train"), "--no-progress"]
    capsys.readouterr()
    assert prep(cmd) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"sample 'k002': .json field 'label' is 'koi', not one of the 4 class names of " \
                              f"--classes {tmp_path / 'a' / 'train'}" in err[0], err
    assert prep(cmd + ["--bad-input", "skip"]) == 0
    m = json.loads((tmp_path / "a" / "test" / "manifest.json").read_text())
    assert m["classes"] == sorted(fish) and m["num_classes"] == 4
    assert labels_of(tmp_path / "a" / "test") == {"k000": 3, "k001": 2, "k003": 2}

    # A names file fixes the order (ImageNet's): line i is class i - 1.
    (tmp_path / "fish.txt").write_text("\n".join(fish) + "\n\n")
    assert prep(["webdataset", str(tmp_path / "train"), str(tmp_path / "c"), "--classes", str(tmp_path / "fish.txt"),
                 "--workers", "1"] + args) == 0
    assert "reading the labels" not in capsys.readouterr().err  # no pass over the labels
    m = json.loads((tmp_path / "c" / "train" / "manifest.json").read_text())
    assert m["classes"] == fish and m["source"]["labels"].endswith(f"indexed by --classes {tmp_path / 'fish.txt'})")
    assert labels_of(tmp_path / "c" / "train") == {k: fish.index(y) for k, y in train.items() if y in fish}
    # ... and names index labels; a label beyond it, a negative one or a float is bad input.
    named_shards(tmp_path / "idx", ["0", 2, " 1", 3, 5, -1, 1.5], per_shard=10)
    assert prep(["webdataset", str(tmp_path / "idx"), str(tmp_path / "d"), "--classes", str(tmp_path / "fish.txt"),
                 "--workers", "1"] + args) == 0
    m = json.loads((tmp_path / "d" / "train" / "manifest.json").read_text())
    assert m["classes"] == fish and m["num_classes"] == 4 and labels_of(tmp_path / "d" / "train") == {
        "k000": 0, "k001": 2, "k002": 1, "k003": 3}
    assert [e.split(": ", 1)[1] for e in m["source"]["skipped_examples"]] == [
        f"label 5 is not below the 4 names of --classes {tmp_path / 'fish.txt'}",
        ".json field 'label' is -1, not a class index (an integer >= 0)",
        ".json field 'label' is 1.5, neither a class index (an integer >= 0) nor a class name (a string)"]
    assert prep(["webdataset", str(tmp_path / "idx"), str(tmp_path / "e"), "--workers", "1"] + args) == 0
    m = json.loads((tmp_path / "e" / "train" / "manifest.json").read_text())
    assert m["classes"] == ["0", "1", "2", "3", "4", "5"] and m["num_classes"] == 6  # without names: "0".."N-1"
    # Lists that cannot be right are one line before anything is written.
    (tmp_path / "dup.txt").write_text("tench\ngoldfish\ntench\n")
    for extra, words in ((["--classes", str(tmp_path / "dup.txt")], "line 3: 'tench' is also on line 1"),
                         (["--num-classes", "3"], "--num-classes 3, but the labels name 4 classes")):
        capsys.readouterr()
        assert prep(["webdataset", str(tmp_path / "train"), str(tmp_path / "f" / extra[0][2:]), "--workers", "1"]
                    + args + extra) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and words in err[0], err
        assert not (tmp_path / "f" / extra[0][2:] / "train" / "manifest.json").exists()


def test_all_bad_source_shard_leaves_no_gap_and_stated_counts_are_checked(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    good = {}
    with wds.ShardWriter(str(tmp_path / "src" / "%05d.tar"), maxcount=2, verbose=0) as sink:  # img2dataset-named
        for i in range(6):
            key, bad = f"{i:09d}", i in (2, 3)  # the whole second shard is undecodable
            data = encoded(photo(i, 8, 8), "JPEG")[:40] + b"\x00" * 50 if bad else encoded(photo(i, 8, 8), "PNG")
            sink.write({"__key__": key, "jpg" if bad else "png": data, "txt": "a caption"})
            if not bad:
                good[key] = data
    for k in range(3):  # what img2dataset saw: 2 successful downloads per shard (one shard's were not images)
        (tmp_path / "src" / f"{k:05d}_stats.json").write_text(json.dumps({"count": 2, "successes": 2}))
    split = tmp_path / "out" / "train"
    assert prep(["webdataset", str(tmp_path / "src"), str(tmp_path / "out"), "--bad-input", "skip", "--workers", "2",
                 "--no-progress"]) == 0
    warn = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warn == ["data_prep: warning: img2dataset's *_stats.json successes give 6 samples for these 3 source "
                    "shards, 4 were converted (2 skipped as bad input); shards that differ (stated vs converted): "
                    "00001.tar 2 vs 0"]
    m = json.loads((split / "manifest.json").read_text())
    assert [s["name"] for s in m["shards"]] == ["wds-train-000000.tar", "wds-train-000001.tar"]
    assert [s["first_key"] for s in m["shards"]] == ["000000000", "000000004"]
    assert m["source"]["empty_source_shards"] == [str(tmp_path / "src" / "00001.tar")]
    assert m["source"]["stated_samples"]["samples"] == 6 and "4 were converted" in m["source"]["stated_samples"]["differs"]
    assert sorted(p.name for p in split.glob("*.tar")) == ["wds-train-000000.tar", "wds-train-000001.tar"]
    # One brace pattern names the output, as data.train_shards.
    cfg = data_cfg(split, train_shards=f"{split}/wds-train-{{000000..000001}}.tar")
    x = first_images(cfg, 4).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(x, np.stack([np.asarray(Image.open(io.BytesIO(d))) for d in good.values()]))
    # An output shard lost after the numbering is converted again, under its number; the rest is kept.
    before = {p.name: p.read_bytes() for p in split.glob("*.tar")} | {"manifest.json": (split / "manifest.json").read_bytes()}
    (split / "wds-train-000001.tar").unlink()
    (split / "manifest.json").unlink()
    assert prep(["webdataset", str(tmp_path / "src"), str(tmp_path / "out"), "--bad-input", "skip", "--workers", "1",
                 "--no-progress"]) == 0
    assert {p.name: p.read_bytes() for p in split.glob("*.tar")} | {
        "manifest.json": (split / "manifest.json").read_bytes()} == before
    assert prep(["verify", str(split), "--no-progress"]) == 0

    # HF/timm's _info.json with only num_samples per split: compared with the split named in the shard names.
    hf_layout(tmp_path / "hf")
    (tmp_path / "hf" / "_info.json").write_text(json.dumps({"splits": {"train": {"num_samples": 9},
                                                                       "validation": {"num_samples": 3}}}))
    capsys.readouterr()
    assert prep(["webdataset", f"{tmp_path}/hf/imagenet1k-train-{{0000..0001}}.tar", str(tmp_path / "hfout"),
                 "--workers", "1", "--no-progress"]) == 0
    warn = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warn == ["data_prep: warning: _info.json's num_samples of split 'train' give 9 samples for these 2 source "
                    "shards, 8 were converted"]


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
