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

from flowscale.config import ConfigError
from flowscale.data import DataError, build_train_loader, eval_split

from helpers import data_cfg, image_id, tagged_image, write_split


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
    logged = [(r["step"], r["data/skipped_samples"]) for r in read_metrics(run_dir) if "data/skipped_samples" in r]
    # 4 images per step from 16 with ids 3 and 9 bad: step 1 reads ids 0-4, step 3 reaches id 9, and the
    # second epoch (from step 4 on) meets id 3 again at step 5: already counted, the count stays.
    assert logged == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
    assert all(r["data/epoch"] >= 0 for r in read_metrics(run_dir) if "data/epoch" in r)


# -- a long run: bad data is named and counted once, and the count survives a resume ------------------

def rot(path, key: str) -> None:
    """Real bit rot: bytes inside the sample's PNG overwritten in place (tar headers and size unchanged)."""
    raw = path.read_bytes()
    data = raw.find(f"{key}.png".encode()) + 512  # the member's data follows its 512-byte header
    assert raw[data:data + 4] == b"\x89PNG"
    with open(path, "r+b") as f:
        f.seek(data + 16)  # inside IHDR: the image no longer decodes
        f.write(b"\xff" * 24)
    assert len(path.read_bytes()) == len(raw)


def named(err: str, what: str) -> int:
    """How many skip reports name ``what``."""
    return sum(1 for line in err.splitlines() if line.startswith("flowscale data: skipped") and what in line)


def drain(loader, n: int) -> list[int]:
    return [image_id(img) for _ in range(n) for img in next(loader)[0]]


@pytest.mark.parametrize("workers", [0, 2])
def test_one_rotten_sample_is_counted_once_over_many_epochs(tmp_path, capfd, workers):
    """The issue's case: with max_skipped=1 a single rotten sample stopped the run in its second
    epoch (counted again every epoch). With 2 workers the shard holding it is read by both (the
    shard order is permuted per epoch): still one bad sample, named once."""
    from flowscale.data.order import worker_units

    write_split(tmp_path / "train", [6, 6], encoding="png")
    rot(tmp_path / "train" / "t-train-000000.tar", "s000003")
    cfg = data_cfg(tmp_path / "train", batch_size=1, num_workers=workers, shuffle_buffer=4, bad_data="skip",
                   max_skipped=1)
    loader = build_train_loader(cfg)
    got = drain(loader, 12 * 11)  # 11 good samples an epoch: 12 epochs' worth
    assert 3 not in got and sorted(set(got)) == [i for i in range(12) if i != 3]
    assert min(e for e, _ in loader.positions) >= 10
    assert loader.skipped == 1 and loader.bad_keys == {("t-train-000000.tar", 3): 1}
    assert named(capfd.readouterr().err, "'s000003'") == 1
    if workers:  # the premise: shard 0 went to both workers in these epochs
        assert {g for e in range(10) for g in range(2) if worker_units([6, 6], e, cfg.seed, g, 2)[0][0] == 0} == {0, 1}


def test_two_distinct_bad_samples_exceed_max_skipped_1(tmp_path):
    write_split(tmp_path / "train", [12], encoding="png")
    for key in ("s000003", "s000009"):
        rot(tmp_path / "train" / "t-train-000000.tar", key)
    with pytest.raises(DataError, match=r"more than data.max_skipped=1 distinct .*'s000009'"):
        run(data_cfg(tmp_path / "train", shuffle_buffer=0, bad_data="skip", max_skipped=1), 3)
    # The report: max_skipped=2 stopped the run in epoch 3. Ten epochs now.
    loader = build_train_loader(data_cfg(tmp_path / "train", batch_size=2, bad_data="skip", max_skipped=2))
    assert sorted(set(drain(loader, 10 * 5))) == [i for i in range(12) if i not in (3, 9)]
    assert loader.skipped == 2 and loader.epoch >= 9


@pytest.mark.parametrize("workers", [0, 2])
def test_the_count_survives_resume(tmp_path, capfd, workers):
    """The ledger of bad data is in the loader state: a resumed loader knows the rotten sample it had
    met (counted, not named again, not held twice against max_skipped=1) and yields exactly the
    batches the uninterrupted one does."""
    write_split(tmp_path / "train", [6, 6], encoding="png")
    rot(tmp_path / "train" / "t-train-000000.tar", "s000003")
    cfg = data_cfg(tmp_path / "train", batch_size=1, num_workers=workers, shuffle_buffer=4, random_flip=True,
                   bad_data="skip", max_skipped=1)
    ref = build_train_loader(cfg)
    drain(ref, 14)  # more than an epoch: every worker has met its shards once
    state = ref.state_dict()
    assert ref.skipped == 1 and state["bad"] == [["t-train-000000.tar", 3, 1]]
    expected = [next(ref) for _ in range(33)]
    resumed = build_train_loader(cfg)
    resumed.load_state_dict(state)
    assert resumed.skipped == 1 and resumed.bad_keys == ref.bad_keys  # before its first batch
    for (xa, ya), (xb, yb) in zip(expected, (next(resumed) for _ in range(33))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert resumed.state_dict() == ref.state_dict() and resumed.skipped == 1
    assert named(capfd.readouterr().err, "'s000003'") == 1  # by ref; the resumed loader knew it
    # A state saved before the ledger existed ((epoch, t, skipped) per worker) still resumes exactly.
    old = {k: v for k, v in state.items() if k != "bad"}
    old["positions"] = [[*p, 7] for p in state["positions"]]
    again = build_train_loader(cfg)
    again.load_state_dict(old)
    assert all(torch.equal(x, next(again)[0]) for x, _ in expected[:6])


def test_ranks_merge_what_they_met(tmp_path):
    """Shards move between ranks across epochs, so two ranks meet the same rotten sample. Merged as
    the trainer merges the all-gathered ledgers, it is one bad sample on every rank and in every
    rank's saved state; one more, met by another rank, exceeds max_skipped=1 on every rank alike."""
    write_split(tmp_path / "train", [6, 6], encoding="png")
    rot(tmp_path / "train" / "t-train-000000.tar", "s000003")
    cfg = data_cfg(tmp_path / "train", batch_size=2, bad_data="skip", max_skipped=1)
    loaders = [build_train_loader(cfg, rank=r, world_size=2) for r in range(2)]
    for loader in loaders:
        drain(loader, 30)  # 5 or 6 samples an epoch per rank: 5 epochs or more
        assert loader.bad_keys == {("t-train-000000.tar", 3): 1}  # both met it
    ledgers = [loader.bad_keys for loader in loaders]
    for loader in loaders:
        loader.merge_bad_keys(ledgers)
        assert loader.skipped == 1 and loader.state_dict()["bad"] == [["t-train-000000.tar", 3, 1]]
    for loader in loaders:
        with pytest.raises(DataError, match="max_skipped=1"):
            loader.merge_bad_keys([{("t-train-000001.tar", 2): 1}])


@pytest.mark.usefixtures("single_process_env")
def test_training_run_and_resume_count_a_rotten_sample_once(tmp_path, capfd):
    # flowscale.train.main with max_skipped=1: 2 steps, then resumed to step 20 (over five epochs).
    from flowscale.config import load_config
    from flowscale.logging import read_metrics
    from flowscale.train import main

    write_split(tmp_path / "train", [16], encoding="png")
    rot(tmp_path / "train" / "t-train-000000.tar", "s000003")
    write_split(tmp_path / "test", [8], split="test")
    run_dir = tmp_path / "run"

    def cfg(steps):
        return load_config(None, ["data.dataset=shards", f"data.train_manifest={tmp_path / 'train'}",
                                  f"data.test_manifest={tmp_path / 'test'}", "data.image_size=8", "data.batch_size=4",
                                  "data.num_workers=0", "data.shuffle_buffer=0", "data.bad_data=skip",
                                  "data.max_skipped=1", "model.levels=1", "model.steps=1", "model.width=8",
                                  f"train.steps={steps}", "train.log_every=1", "train.checkpoint_every=2",
                                  "train.eval_every=0", "train.sample_every=0", "train.init_batch_size=4",
                                  "train.progress=false", "wandb.mode=disabled", f"train.run_dir={run_dir}"])

    main(cfg(2))
    assert named(capfd.readouterr().err, "'s000003'") == 1
    main(cfg(20))
    logged = {r["step"]: r["data/skipped_samples"] for r in read_metrics(run_dir) if "data/skipped_samples" in r}
    # Step 1 meets id 3; steps 3 and 4 do not (without the saved ledger they would log 0), step 5 meets it again.
    assert logged == {s: 1 for s in range(1, 21)}
    assert named(capfd.readouterr().err, "'s000003'") == 0


# -- a shard unlike its manifest -----------------------------------------------------------------------

COUNTS = [6, 6, 6]  # shard 1 holds ids 6..11


def _rewrite_shard(split_dir, k: int, members) -> None:
    """Shard k written again with its members changed by ``members``, over the old file; the manifest
    still describes the old one."""
    alt = split_dir.parent / "alt"
    write_split(alt, COUNTS, members=members)
    shutil.copyfile(alt / f"t-train-{k:06d}.tar", split_dir / f"t-train-{k:06d}.tar")
    shutil.rmtree(alt)


SHARD_FAULTS = {  # done to shard 1 of COUNTS, each leaves a local file whose size differs from the manifest's
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:5000]),
    "extra-member": lambda path: _rewrite_shard(path.parent, 1, lambda i, key, ms: ms + [(f"{key}.txt", b"x")]
                                                if i == 8 else ms),
    "dropped-member": lambda path: _rewrite_shard(path.parent, 1, lambda i, key, ms: ms[:1] if i == 8 else ms),
    "zero-bytes": lambda path: path.write_bytes(b""),
    "not-a-tar": lambda path: path.write_bytes(png(tagged_image(0))),
    "missing": lambda path: path.unlink(),
}


@pytest.mark.parametrize("fault", sorted(SHARD_FAULTS))
def test_shard_unlike_its_manifest_stops_before_the_first_step_or_is_left_out(tmp_path, capfd, fault):
    d = tmp_path / "train"
    write_split(d, COUNTS)
    SHARD_FAULTS[fault](d / "t-train-000001.tar")
    with pytest.raises(DataError, match=r"t-train-000001\.tar"):  # error: before any batch
        build_train_loader(data_cfg(d))
    with pytest.raises(DataError, match=r"t-train-000001\.tar"):
        eval_split(data_cfg(d), "train")
    cfg = data_cfg(d, bad_data="skip", max_skipped=1)  # a bad shard counts one against the limit
    loader = build_train_loader(cfg)
    assert loader.bad_keys == {("t-train-000001.tar", 0): 6} and loader.skipped == 6  # counted at the start
    good = [*range(6), *range(12, 18)]
    for _ in range(5):  # 12 good samples an epoch, 3 batches of 4: the run goes on, epoch after epoch
        assert sorted(drain(loader, 3)) == good
    assert loader.skipped == 6 and loader.positions == [(4, 18)]  # the end of epoch 4
    ev = eval_split(cfg, "train")
    for _ in range(2):
        assert [image_id(img) for _, x, _ in ev.batches(4) for img in x] == good and ev.skipped == 6
    assert named(capfd.readouterr().err, "t-train-000001.tar") == 2  # once by the loader, once by the eval split


def _swap_in_shard_2(path):
    shutil.copyfile(path.parent / "t-train-000002.tar", path)  # the same size: only reading finds out


def _rot_header(path):
    raw = path.read_bytes()
    at = raw.find(b"s000008.npy")  # sample 2's header; the look-ahead from sample 1 reads it
    with open(path, "r+b") as f:
        f.seek(at + 124)
        f.write(b"777777")  # its size field: the header checksum no longer matches


READ_FAULTS = {  # done to shard 1 of COUNTS: (fault, read through 'pipe:' (no size check), first sample lost)
    "truncated-pipe": (lambda path: path.write_bytes(path.read_bytes()[:5000]), True, 2),  # 2048-byte samples
    "zero-bytes-pipe": (lambda path: path.write_bytes(b""), True, 0),
    "not-a-tar-pipe": (lambda path: path.write_bytes(png(tagged_image(0))), True, 0),
    "missing-pipe": (lambda path: path.unlink(), True, 0),
    "swapped": (_swap_in_shard_2, False, 0),
    "header-rot": (_rot_header, False, 1),
}


@pytest.mark.parametrize("fault", sorted(READ_FAULTS))
def test_shard_found_broken_while_reading(tmp_path, capfd, fault):
    """Faults the split's load cannot see (a URL, or the right size): the shard breaks at a sample
    that depends on its bytes alone; under skip it yields what comes before, every epoch, and the
    rest is counted once; under error the run stops with the shard named."""
    make, pipe, k = READ_FAULTS[fault]
    d = tmp_path / "train"
    write_split(d, COUNTS)
    make(d / "t-train-000001.tar")

    def cfg(**kw):
        return _pipe_cfg(tmp_path, 3, **kw) if pipe else data_cfg(d, **kw)

    with pytest.raises(DataError, match=r"t-train-000001\.tar"):
        run(cfg(), 5)  # 18 samples: within the first epoch
    loader = build_train_loader(cfg(bad_data="skip", max_skipped=1, batch_size=1))
    good = [*range(6), *range(6, 6 + k), *range(12, 18)]
    got = drain(loader, 4 * len(good))  # four epochs
    assert sorted(got) == sorted(good * 4)
    assert loader.bad_keys == {("t-train-000001.tar", k): 6 - k} and loader.positions[0][0] == 3
    ev = eval_split(cfg(bad_data="skip"), "train")
    for _ in range(2):
        assert [image_id(img) for _, x, _ in ev.batches(4) for img in x] == good and ev.skipped == 6 - k
    assert named(capfd.readouterr().err, "t-train-000001.tar") == 2  # once by the loader, once by the eval split
