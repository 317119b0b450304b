"""Bad data, each case with real broken files: a clear error naming shard and sample
(data.bad_data=error) or a counted skip (data.bad_data=skip); never a silent change or a hang."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data_files import data_cfg, image_id, tagged_image, write_split
from flowscale.config import ConfigError
from flowscale.data import DataError, build_train_loader, eval_split


def png(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def replace_sample(bad: int, new_members):
    return lambda i, key, ms: [(f"{key}.{ext}", data) for ext, data in new_members(key)] + \
        [m for m in ms if m[0].endswith(".cls")] if i == bad else ms


def cmyk_jpeg(key):
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(buf, format="JPEG")
    return [("png", buf.getvalue())]


BAD_SAMPLES = {  # sample 5 of 12 is replaced by ...
    "not-an-image": (lambda key: [("png", b"this is text, not a PNG")], "not a decodable image"),
    "no-image-member": (lambda key: [("txt", b"hello")], "no image member"),
    "wrong-resolution": (lambda key: [("png", png(tagged_image(5, 16)))], "16x16"),
    "grayscale": (lambda key: [("png", png(tagged_image(5)[:, :, 0]))], "grayscale"),
    "cmyk": (cmyk_jpeg, "CMYK"),
    "16-bit": (lambda key: [("png", png(tagged_image(5)[:, :, 0].astype(np.uint16) * 257))], "16-bit"),
    "npy-uint16": (lambda key: [("npy", _npy(tagged_image(5).astype(np.uint16)))], "uint16"),
}


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def run(cfg, batches):
    loader = build_train_loader(cfg)
    return loader, [next(loader) for _ in range(batches)]


def both_readers_raise(cfg, match: str) -> None:
    """Training and evaluation read shards through the same checks: both stop with ``match``."""
    with pytest.raises(DataError, match=match):
        run(cfg, 4)
    with pytest.raises(DataError, match=match):
        list(eval_split(cfg, "train").batches(4))


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_error_names_shard_and_sample_or_counted_skip(tmp_path, case):
    make, words = BAD_SAMPLES[case]
    write_split(tmp_path / "train", [12], encoding="png", members=replace_sample(5, make))
    with pytest.raises(DataError, match=rf"t-train-000000\.tar, sample 's000005'.*{words}"):
        run(data_cfg(tmp_path / "train", shuffle_buffer=0), 3)
    loader, batches = run(data_cfg(tmp_path / "train", shuffle_buffer=0, bad_data="skip"), 3)
    got = [image_id(img) for x, _ in batches for img in x]
    assert got == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 0] and loader.skipped == 1
    ev = eval_split(data_cfg(tmp_path / "train", bad_data="skip"), "train")
    assert sum(len(x) for _, x, _ in ev.batches(4)) == 11 and ev.skipped == 1
    with pytest.raises(DataError, match="s000005"):
        list(eval_split(data_cfg(tmp_path / "train"), "train").batches(4))


def _pipe_cfg(tmp_path, n_shards, **kw):
    """Shards read through a 'pipe:' URL: no local size check, the reader must catch it."""
    pattern = f"pipe:cat {tmp_path}/train/t-train-{{000000..{n_shards - 1:06d}}}.tar"
    return data_cfg(tmp_path / "train", train_shards=pattern, shuffle_buffer=0, **kw)


def test_truncated_tar(tmp_path):
    write_split(tmp_path / "train", [6, 6])
    path = tmp_path / "train" / "t-train-000000.tar"
    path.write_bytes(path.read_bytes()[:3000])  # samples are 2048 bytes: the cut is inside sample 1
    with pytest.raises(DataError, match="size|bytes"):  # local: the manifest's size check
        build_train_loader(data_cfg(tmp_path / "train"))
    both_readers_raise(_pipe_cfg(tmp_path, 2), r"t-train-000000\.tar.*truncated")
    loader, batches = run(_pipe_cfg(tmp_path, 2, bad_data="skip"), 2)
    got = [image_id(img) for x, _ in batches for img in x]
    assert set(got) == {0, *range(6, 12)} and len(got) == 8  # shard 1 whole, shard 0 up to the cut; into epoch 1
    assert loader.skipped == 5 and loader.bad_keys == {("t-train-000000.tar", 1): 5}
    ev = eval_split(_pipe_cfg(tmp_path, 2, bad_data="skip"), "train")
    for _ in range(2):  # eval reads in stored order: shard 0 up to the cut, then shard 1 whole; counted once
        got = [image_id(img) for _, x, _ in ev.batches(4) for img in x]
        assert got == [0, *range(6, 12)] and ev.skipped == 5


def test_corrupt_tar_header(tmp_path):
    write_split(tmp_path / "train", [6])
    path = tmp_path / "train" / "t-train-000000.tar"
    raw = bytearray(path.read_bytes())
    second = raw.find(b"s000002.npy")
    raw[second + 124:second + 130] = b"777777"  # size field garbage: header checksum breaks
    path.write_bytes(bytes(raw))
    both_readers_raise(data_cfg(tmp_path / "train", shuffle_buffer=0), "corrupt tar header")


def test_missing_shard(tmp_path):
    write_split(tmp_path / "train", [6, 6])
    (tmp_path / "train" / "t-train-000001.tar").unlink()
    with pytest.raises(DataError, match=r"t-train-000001\.tar.*missing"):
        build_train_loader(data_cfg(tmp_path / "train"))
    loader, batches = run(data_cfg(tmp_path / "train", bad_data="skip", shuffle_buffer=0), 3)
    assert sorted({image_id(img) for x, _ in batches for img in x}) == list(range(6))
    assert loader.skipped == 6  # 12 good samples take two epochs; the shard's 6 are counted once


def _edit_manifest(split_dir, fn):
    p = split_dir / "manifest.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def test_manifest_that_does_not_match(tmp_path):
    write_split(tmp_path / "train", [6, 6])
    _edit_manifest(tmp_path / "train", lambda d: d["shards"][0].update(bytes=d["shards"][0]["bytes"] + 512))
    with pytest.raises(DataError, match=r"t-train-000000\.tar is \d+ bytes but manifest"):
        build_train_loader(data_cfg(tmp_path / "train"))

    write_split(tmp_path / "b", [6, 6])  # fewer samples than the shard holds
    _edit_manifest(tmp_path / "b", lambda d: (d["shards"][0].update(count=5), d.update(num_samples=11)))
    both_readers_raise(data_cfg(tmp_path / "b", shuffle_buffer=0), "more samples than the 5")

    write_split(tmp_path / "c", [6, 6])  # a shard swapped for another
    _edit_manifest(tmp_path / "c", lambda d: d["shards"][1].update(first_key="s999999"))
    both_readers_raise(data_cfg(tmp_path / "c", shuffle_buffer=0), "starts with sample 's000006'")

    write_split(tmp_path / "e", [6, 6])  # the manifest counts more than the shard holds (sizes match: reading finds out)
    _edit_manifest(tmp_path / "e", lambda d: (d["shards"][0].update(count=7), d.update(num_samples=13)))
    both_readers_raise(data_cfg(tmp_path / "e", shuffle_buffer=0), r"t-train-000000\.tar.*shard ends after 6 samples")

    write_split(tmp_path / "d", [6, 6])  # counts that do not add up
    _edit_manifest(tmp_path / "d", lambda d: d.update(num_samples=13))
    with pytest.raises(DataError, match="sum to 12"):
        build_train_loader(data_cfg(tmp_path / "d"))


def test_manifest_resolution_must_match_config(tmp_path):
    write_split(tmp_path / "train", [6])
    with pytest.raises(ConfigError, match="data.image_size"):
        build_train_loader(data_cfg(tmp_path / "train", image_size=16))


def test_skip_limit_stops_a_dataset_of_garbage(tmp_path):
    write_split(tmp_path / "train", [12], members=lambda i, key, ms: [(f"{key}.txt", b"x")])
    with pytest.raises(DataError, match="max_skipped=3"):
        run(data_cfg(tmp_path / "train", bad_data="skip", max_skipped=3), 1)


def test_worker_errors_reach_the_training_process(tmp_path):
    write_split(tmp_path / "train", [12, 12], members=replace_sample(3, BAD_SAMPLES["not-an-image"][0]))
    with pytest.raises(DataError, match="s000003"):
        run(data_cfg(tmp_path / "train", num_workers=2, shuffle_buffer=0), 8)


@pytest.mark.usefixtures("single_process_env")
def test_training_logs_the_skip_count(tmp_path):
    # bad_data=skip in a real training run: the count reaches the logged metrics (and W&B), not only stderr.
    from flowscale.config import load_config
    from flowscale.logging import read_metrics
    from flowscale.train import main

    bad = {3, 9}
    write_split(tmp_path / "train", [16], encoding="png",
                members=lambda i, key, ms: [(f"{key}.png", b"not a png")] if i in bad else ms)
    write_split(tmp_path / "test", [8], split="test")
    run_dir = tmp_path / "run"
    cfg = load_config(None, ["data.dataset=shards", f"data.train_manifest={tmp_path / 'train'}",
                             f"data.test_manifest={tmp_path / 'test'}", "data.image_size=8", "data.batch_size=4",
                             "data.num_workers=0", "data.shuffle_buffer=0", "data.bad_data=skip",
                             "model.levels=1", "model.steps=1", "model.width=8", "train.steps=5", "train.log_every=1",
                             "train.eval_every=0", "train.sample_every=0", "train.init_batch_size=4",
                             "train.progress=false", "wandb.mode=disabled", f"train.run_dir={run_dir}"])
    main(cfg)
    logged = [(r["step"], r["data_skipped"]) for r in read_metrics(run_dir) if "data_skipped" in r]
    # 4 images per step from 16 with ids 3 and 9 bad: step 1 reads ids 0-4, step 3 reaches id 9, and the
    # second epoch (from step 4 on) meets id 3 again at step 5: already counted, the count stays.
    assert logged == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
    assert all(r["epoch"] >= 0 for r in read_metrics(run_dir) if "epoch" in r)
