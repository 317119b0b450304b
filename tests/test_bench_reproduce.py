"""`flowscale bench reproduce`: the per-pixel histogram baseline against a brute-force count, and a
tiny real run on Fashion-MNIST (Debian's package, converted by `prep`; IDX files the test writes
where the package is absent) that writes the table, the JSON and the plot."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.cli import main as prep
from data_prep.classic import idx_array
from flowscale.tools.bench.reproduce import PUBLISHED, histogram_bpd
from flowscale.cli import main as cli_main

FASHION = Path("/usr/share/datasets/fashion-mnist")


def brute_force_bpd(train: np.ndarray, test: np.ndarray, n_bits: int) -> float:
    """The add-one-smoothed independent categorical per dimension, pixel by pixel with Counters."""
    k = 2 ** n_bits
    tr = (train.reshape(len(train), -1) >> (8 - n_bits)).tolist()
    te = (test.reshape(len(test), -1) >> (8 - n_bits)).tolist()
    bits = 0.0
    for d in range(len(tr[0])):
        counts = Counter(row[d] for row in tr)
        for row in te:
            bits -= math.log2((counts[row[d]] + 1) / (len(tr) + k))
    return bits / (len(te) * len(te[0]))


@pytest.mark.parametrize("channels,n_bits", [(1, 8), (3, 8), (3, 3)])
def test_histogram_baseline_matches_brute_force(channels, n_bits):
    rng = np.random.default_rng(channels * 10 + n_bits)
    # few distinct values per pixel, so counts differ from 0/1 and the smoothing matters
    train = rng.choice([0, 7, 64, 200, 255], size=(23, channels, 4, 5)).astype(np.uint8)
    test = rng.choice([0, 7, 64, 130, 255], size=(9, channels, 4, 5)).astype(np.uint8)
    batches = lambda a, n: [torch.from_numpy(a[i:i + n]) for i in range(0, len(a), n)]  # noqa: E731
    got = histogram_bpd(batches(train, 5), batches(test, 4), n_bits)
    assert got["bpd"] == pytest.approx(brute_force_bpd(train, test, n_bits), rel=1e-12)
    assert (got["train_images"], got["test_images"], got["dims"], got["values"]) == (23, 9, channels * 20, 2 ** n_bits)
    # a value never seen in training costs log2(N + K) bits, one seen everywhere log2((N + K) / (N + 1))
    same = histogram_bpd([torch.full((4, 1, 2, 2), 9, dtype=torch.uint8)], [torch.full((2, 1, 2, 2), 9, dtype=torch.uint8)], 8)
    assert same["bpd"] == pytest.approx(math.log2((4 + 256) / 5))
    unseen = histogram_bpd([torch.zeros((4, 1, 2, 2), dtype=torch.uint8)], [torch.ones((2, 1, 2, 2), dtype=torch.uint8)], 8)
    assert unseen["bpd"] == pytest.approx(math.log2(4 + 256))


def test_published_figures_name_their_table():
    assert [p.bpd for p in PUBLISHED["mnist"]] == [1.06, 1.05, 0.99, 0.97]
    assert all("Table" in p.source for rows in PUBLISHED.values() for p in rows)


def fashion_or_written_idx(root: Path) -> Path:
    """Debian's Fashion-MNIST when installed, else MNIST-format IDX files of real grayscale photo
    crops written here (the official format, byte for byte)."""
    if (FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        return FASHION
    from helpers import write_mnist

    write_mnist(root, n_train=300, n_test=200)
    return root


def test_tiny_reproduction_run(tmp_path, capsys, single_process_env):
    src = fashion_or_written_idx(tmp_path / "idx")
    shards = tmp_path / "shards"
    assert prep(["fashion-mnist", str(src), str(shards), "--limit", "300", "--samples-per-shard", "100",
                 "--no-progress", "--workers", "1"]) == 0
    out = tmp_path / "out"
    overrides = ["model.levels=2", "model.steps=2", "model.width=16", "data.batch_size=32", "optim.name=adam",
                 "optim.warmup_steps=2", "optim.lr=2e-3", "optim.ema_decay=0", "train.init_batch_size=64", "engine.threads=1"]
    assert cli_main(["bench", "reproduce", "glow_fashion_mnist", *overrides, "--train-manifest", str(shards / "train"),
                     "--test-manifest", str(shards / "test"), "--steps", "12", "--eval-every", "6",
                     "--eval-batch-size", "128", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "reproduce.json").read_text())
    md = (out / "reproduce.md").read_text()
    assert (out / "reproduce.png").stat().st_size > 10_000
    assert "per-pixel histogram, add-one smoothing" in md and md.strip() in printed

    # the baseline on the converted shards equals the brute-force count on the IDX arrays themselves
    want = {s: idx_array(str(next(src.glob(f"{p}-images-idx3-ubyte*"))))[:300] for s, p in (("train", "train"), ("test", "t10k"))}
    assert report["histogram"]["bpd"] == pytest.approx(brute_force_bpd(want["train"], want["test"], 8), rel=1e-9)
    assert (report["histogram"]["train_images"], report["histogram"]["test_images"]) == tuple(map(len, want.values()))

    curve = report["curve"]
    assert [p["step"] for p in curve] == [0, 6, 12] and report["steps"] == 12
    assert all(math.isfinite(p["test_bpd"]) for p in curve)
    assert curve[-1]["test_bpd"] < min(8.0, curve[0]["test_bpd"]), "a few steps must improve on the untrained model"
    assert curve[-1]["wall_s"] > 0 and report["train_s"] == pytest.approx(curve[-1]["wall_s"])
    variant = report["variant"]
    assert report["published"] == [vars(p) for p in PUBLISHED.get(variant, ())]
    if variant == "fashion-mnist":
        assert "No published" in md
    assert f"{curve[-1]['test_bpd']:.4f}" in md
    assert ", 1 threads;" in report["header"] or torch.cuda.is_available(), "the header names the threads the run used"


def test_reproduce_refuses_bad_input_in_one_line_before_writing(tmp_path, capsys):
    assert cli_main(["bench", "reproduce", "glow_fashion_mnist"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--steps" in err and "--minutes" in err
    out = tmp_path / "out"
    missing = tmp_path / "nowhere" / "test"
    assert cli_main(["bench", "reproduce", "glow_fashion_mnist", "--steps", "5", "--train-manifest", str(missing),
                     "--test-manifest", str(missing), "--out", str(out)]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "flowscale prep" in err
    assert not out.exists(), "nothing is written before the data is found"
