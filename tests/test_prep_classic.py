"""The classic benchmarks' official formats (MNIST-family IDX files, CIFAR python batches),
written by the test byte for byte as distributed, converted by `prep` and read back; Debian's
Fashion-MNIST package when installed; and a grayscale dataset trained end to end (1 channel
from prep through the loader, the model, bits/dim and the sample grid)."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.cli import main as prep
from helpers import write_mnist
from flowscale.config import ConfigError, DataConfig, load_config
from flowscale.data import demo_images, eval_split

FASHION = Path("/usr/share/datasets/fashion-mnist")


def read_back(split_dir: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, int]]:
    """(manifest, {key: [H, W, C] pixels}, {key: label}) through the loader's evaluation path."""
    m = json.loads((split_dir / "manifest.json").read_text())
    cfg = DataConfig(dataset="shards", train_manifest=str(split_dir), test_manifest=str(split_dir),
                     image_size=m["resolution"], channels=m["channels"])
    keys = []
    for e in m["shards"]:
        with tarfile.open(split_dir / e["name"]) as tf:
            keys.extend(dict.fromkeys(n.split(".")[0] for n in tf.getnames()))
    xs, ys = [], []
    for _, x, y in eval_split(cfg, "train").batches(64):
        xs.append(x)
        ys.extend(y.tolist())
    x = torch.cat(xs).permute(0, 2, 3, 1).numpy()
    assert len(keys) == len(x) == m["num_samples"]
    return m, dict(zip(keys, x)), dict(zip(keys, ys))


# -- MNIST family --------------------------------------------------------------------------------

def test_idx_files_as_shipped_gz_and_raw(tmp_path):
    want = write_mnist(tmp_path / "mnist")
    head = gzip.decompress((tmp_path / "mnist" / "train-images-idx3-ubyte.gz").read_bytes())[:16]
    assert struct.unpack(">IIII", head) == (0x00000803, 20, 28, 28)  # the official header
    assert (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").read_bytes()[:8] == struct.pack(">II", 0x00000801, 8)
    assert prep(["mnist", str(tmp_path / "mnist"), str(tmp_path / "out"), "--samples-per-shard", "8",
                 "--workers", "2", "--no-progress"]) == 0
    for split, (x, y) in want.items():
        m, px, lab = read_back(tmp_path / "out" / split)
        assert (m["channels"], m["resolution"], m["dataset"], m["variant"]) == (1, 28, "mnist", "mnist")
        assert m["labels"] and m["classes"] == [str(c) for c in range(10)] and m["source"]["conversions"] == {}
        assert sorted(px) == [f"{split}_{i:05d}" for i in range(len(x))]
        for i in range(len(x)):
            np.testing.assert_array_equal(px[f"{split}_{i:05d}"][:, :, 0], x[i])
            assert lab[f"{split}_{i:05d}"] == y[i]
    assert list(px) == sorted(px), "test keeps the official order"
    train_keys = list(read_back(tmp_path / "out" / "train")[1])
    assert train_keys != sorted(train_keys), "train is stored shuffled (with --seed)"


def test_idx_pad_to_and_limit(tmp_path):
    want = write_mnist(tmp_path / "mnist", gz_test=True)
    assert prep(["fashion-mnist", str(tmp_path / "mnist"), str(tmp_path / "out"), "--pad-to", "32",
                 "--limit", "5", "--encoding", "png", "--no-progress", "--workers", "1"]) == 0
    m, px, _ = read_back(tmp_path / "out" / "test")
    assert (m["resolution"], m["variant"], m["encoding"], m["num_samples"]) == (32, "fashion-mnist-pad32", "png", 5)
    assert "not comparable" in m["source"]["pad"] and m["source"]["limit"] == 5 and "--limit" in m["split_rule"]
    assert m["classes"][0] == "T-shirt/top"
    x = px["test_00003"][:, :, 0]
    np.testing.assert_array_equal(x[2:30, 2:30], want["test"][0][3])
    assert x[:2].sum() == x[30:].sum() == x[:, :2].sum() == x[:, 30:].sum() == 0
    with tarfile.open(next((tmp_path / "out" / "test").glob("*.tar"))) as tf:
        png = tf.extractfile(next(n for n in tf.getnames() if n.endswith(".png")))
        assert Image.open(png).mode == "L", "1-channel PNGs are grayscale, not RGB"


def test_idx_damage_is_one_line(tmp_path, capsys):
    write_mnist(tmp_path / "mnist", gz_train=False)
    p = tmp_path / "mnist" / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    assert prep(["mnist", str(tmp_path / "mnist"), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train-images-idx3-ubyte" in err and "truncated" in err
    p.write_bytes(b"\x00\x00\x0d\x03" + p.read_bytes()[4:])  # float IDX, not MNIST
    assert prep(["mnist", str(tmp_path / "mnist"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "unsigned bytes" in capsys.readouterr().err
    assert prep(["mnist", str(tmp_path), str(tmp_path / "out2"), "--no-progress"]) == 1  # no IDX files here
    assert "train-images-idx3-ubyte" in capsys.readouterr().err


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason=f"Debian's dataset-fashion-mnist is not installed ({FASHION}); `apt-get install "
                           f"dataset-fashion-mnist` (.ci/run does as root)")
def test_debian_fashion_mnist_package(tmp_path):
    """The real files: a part of each split converted (--limit) and compared with the IDX bytes."""
    assert prep(["fashion-mnist", str(FASHION), str(tmp_path / "out"), "--limit", "64", "--no-progress",
                 "--workers", "1"]) == 0
    raw = gzip.decompress((FASHION / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert struct.unpack(">IIII", raw[:16]) == (0x00000803, 10000, 28, 28)
    labels = gzip.decompress((FASHION / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:]
    m, px, lab = read_back(tmp_path / "out" / "test")
    assert (m["num_samples"], m["channels"], m["num_classes"]) == (64, 1, 10)
    for i in (0, 17, 63):
        np.testing.assert_array_equal(px[f"test_{i:05d}"][:, :, 0],
                                      np.frombuffer(raw, np.uint8, 784, 16 + 784 * i).reshape(28, 28))
        assert lab[f"test_{i:05d}"] == labels[i]
    train = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert train["num_samples"] == 64 and "of 60000" in train["split_rule"]


# -- CIFAR ---------------------------------------------------------------------------------------

def write_cifar(root: Path, dataset: str, per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """CIFAR python batches as the official download holds them: pickled dicts with bytes keys,
    b'data' uint8 [N, 3072] (R plane, G plane, B plane of each 32x32 image) and b'labels' (CIFAR-10)
    or b'fine_labels' + b'coarse_labels' (CIFAR-100); plus the meta file of class names."""
    root.mkdir(parents=True)
    rgb = demo_images("train", 6 * per_batch, 32, seed=3).permute(0, 2, 3, 1).numpy()
    if dataset == "cifar10":
        batches = {f"data_batch_{k}": ("train", k - 1) for k in range(1, 6)} | {"test_batch": ("test", 5)}
        meta, names = "batches.meta", {b"label_names": [f"c10_{c}".encode() for c in range(10)]}
    else:
        batches = {"train": ("train", 0), "test": ("test", 5)}
        meta, names = "meta", {b"fine_label_names": [f"c100_{c}".encode() for c in range(100)],
                               b"coarse_label_names": [f"super_{c}".encode() for c in range(20)]}
    want: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for name, (split, b) in batches.items():
        n = per_batch * (5 if dataset == "cifar100" and split == "train" else 1)
        x = rgb[b * per_batch:b * per_batch + n] if n == per_batch else rgb[:n]
        y = [(b * 31 + i * 13) % (10 if dataset == "cifar10" else 100) for i in range(n)]
        d = {b"batch_label": f"{name} of 1".encode(), b"data": x.transpose(0, 3, 1, 2).reshape(n, 3072).copy(),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        if dataset == "cifar10":
            d[b"labels"] = y
        else:
            d[b"fine_labels"], d[b"coarse_labels"] = y, [v // 5 for v in y]
        (root / name).write_bytes(pickle.dumps(d, protocol=2))
        want[split][0].extend(x)
        want[split][1].extend(y)
    (root / meta).write_bytes(pickle.dumps(names, protocol=2))
    return {s: (np.stack(x), y) for s, (x, y) in want.items()}


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_python_batches_folder_and_tar(tmp_path, dataset):
    folder = tmp_path / "src" / ("cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python")
    want = write_cifar(folder, dataset)
    tgz = tmp_path / f"{dataset}-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    for src, out in ((tmp_path / "src", "from_dir"), (tgz, "from_tar")):
        assert prep([dataset, str(src), str(tmp_path / out), "--samples-per-shard", "7", "--no-progress",
                     "--workers", "2"]) == 0
    for split, (x, y) in want.items():
        m, px, lab = read_back(tmp_path / "from_dir" / split)
        assert (m["channels"], m["resolution"], m["variant"], m["num_samples"]) == (3, 32, dataset, len(x))
        n_classes = 10 if dataset == "cifar10" else 100
        assert m["classes"] == [f"c{n_classes}_{c}" for c in range(n_classes)], "names from the meta file"
        for i in range(len(x)):
            np.testing.assert_array_equal(px[f"{split}_{i:05d}"], x[i])
            assert lab[f"{split}_{i:05d}"] == y[i]
        tar_m = json.loads((tmp_path / "from_tar" / split / "manifest.json").read_text())
        assert [s["sha256"] for s in tar_m["shards"]] == [s["sha256"] for s in m["shards"]], \
            "the .tar.gz and the extracted folder give the same shards"


def test_cifar_refuses_what_is_not_a_batch(tmp_path, capsys):
    import collections

    write_cifar(tmp_path / "c", "cifar10")
    (tmp_path / "c" / "data_batch_3").write_bytes(pickle.dumps(collections.OrderedDict(a=1)))
    assert prep(["cifar10", str(tmp_path / "c"), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data_batch_3" in err and "not a CIFAR python batch" in err
    (tmp_path / "c" / "data_batch_3").unlink()
    assert prep(["cifar10", str(tmp_path / "c"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "missing data_batch_3" in capsys.readouterr().err


# -- grayscale end to end --------------------------------------------------------------------------

@pytest.mark.usefixtures("single_process_env")
def test_grayscale_prep_then_train(tmp_path):
    """1-channel MNIST-format data: prep -> shards (channels 1) -> a few training steps of a
    2-level Glow at 28x28 -> test bits/dim over D = 784 and a grayscale sample grid; data.channels=3
    on the same shards is refused before anything is written."""
    from flowscale.logging import read_metrics
    from flowscale.train import main as train_main

    write_mnist(tmp_path / "mnist", n_train=32, n_test=16)
    assert prep(["mnist", str(tmp_path / "mnist"), str(tmp_path / "shards"), "--no-progress", "--workers", "1"]) == 0
    base = ["data.dataset=shards", f"data.train_manifest={tmp_path / 'shards' / 'train'}",
            f"data.test_manifest={tmp_path / 'shards' / 'test'}", "data.image_size=28", "data.batch_size=8",
            "data.shuffle_buffer=0", "model.preset=glow", "model.levels=2", "model.steps=1", "model.width=8",
            "train.init_batch_size=8", "train.progress=false", "wandb.mode=disabled", "train.log_every=1"]
    with pytest.raises(ConfigError) as e:
        train_main(load_config(None, base + [f"train.run_dir={tmp_path / 'rgb'}", "train.steps=1"]))
    msg = str(e.value)
    assert "data.channels" in msg and str(tmp_path / "shards" / "train" / "manifest.json") in msg
    assert "set data.channels=1" in msg and "\n" not in msg
    assert not (tmp_path / "rgb").exists(), "refused before anything was written"

    cfg = load_config(None, base + ["data.channels=1", f"train.run_dir={tmp_path / 'run'}", "train.steps=4",
                                    "train.eval_every=4", "train.sample_every=4", "train.checkpoint_every=4"])
    result = train_main(cfg)
    assert np.isfinite(result["test_bpd"]) and 0 < result["test_bpd"] < 16
    rows = [r for r in read_metrics(cfg.train.run_dir) if "train/bpd" in r]
    assert len(rows) == 4 and all(np.isfinite(r["train/bpd"]) for r in rows)
    with Image.open(tmp_path / "run" / "samples" / "step_00000004.png") as im:
        assert im.mode == "L" and im.size[0] > 28
