"""The streaming loader's promises, on real shards written at test time: ranks x workers see
disjoint samples covering the split each epoch; resume continues with exactly the batches an
uninterrupted run yields (workers, mid-shard, flips, epoch boundaries) without decoding what
was already delivered; eval reads a split once across ranks; the demo goes through shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowscale.config import DataConfig
from flowscale.data import DataError, build_train_loader, eval_split, iter_eval_batches
from flowscale.data.order import shuffle_buffer_order

from helpers import data_cfg, image_id, tagged_image, write_split


def ids(x: torch.Tensor) -> list[int]:
    return [image_id(img) for img in x]


def test_shuffle_buffer_is_a_permutation_and_shuffles():
    rng = np.random.default_rng(0)
    order = shuffle_buffer_order(500, 32, rng)
    assert sorted(order.tolist()) == list(range(500))
    assert (order != np.arange(500)).mean() > 0.9
    assert shuffle_buffer_order(50, 0, rng).tolist() == list(range(50))


def test_two_ranks_two_workers_disjoint_and_covering(tmp_path):
    """8 shards x 12 samples, 2 ranks x 2 DataLoader workers: each worker reads 2 shards = 24
    samples = 6 batches of 4 per epoch, so a rank's first 12 batches are exactly epoch 0."""
    write_split(tmp_path / "train", [12] * 8)
    cfg = data_cfg(tmp_path / "train", batch_size=8, num_workers=2)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank=rank, world_size=2)
        batches = [next(loader) for _ in range(12)]
        for x, y in batches:
            assert x.dtype == torch.uint8 and x.shape == (4, 3, 8, 8) and y.dtype == torch.int64
            assert ids(x) == y.tolist()  # labels travel with their images
            for img, i in zip(x, y.tolist()):  # pixels are the stored ones
                assert torch.equal(img, torch.from_numpy(tagged_image(i)).permute(2, 0, 1))
        seen.append([i for _, y in batches for i in y.tolist()])
        assert loader.state_dict()["positions"] == [[0, 24], [0, 24]]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(96))
    # Epoch 1 covers the split again, in a different order.
    loader = build_train_loader(cfg, rank=0, world_size=2)
    for _ in range(12):
        next(loader)
    nxt = [i for _ in range(12) for i in next(loader)[1].tolist()]
    assert nxt != seen[0] and len(set(nxt)) == 48


def epoch_samples(cfg, world_size: int, epoch: int = 0, seed: int = 0) -> list[tuple[int, int, int, torch.Tensor]]:
    """Every sample that the production loaders of ``world_size`` ranks deliver in ``epoch``, as
    (rank, worker, id, image [C, H, W]). ``cfg.batch_size`` must equal ``world_size``: one sample
    per batch, so each batch belongs to one epoch of one worker, which the loader's state tells
    (the worker whose position the batch moved, and the epoch it ended in)."""
    assert cfg.batch_size == world_size
    got = []
    for rank in range(world_size):
        loader = build_train_loader(cfg, rank=rank, world_size=world_size, seed=seed)
        before = loader.state_dict()["positions"]
        while not all(e > epoch for e, _ in before):
            x, y = next(loader)
            after = loader.state_dict()["positions"]
            (w,) = [w for w, (a, b) in enumerate(zip(before, after)) if a != b]
            if after[w][0] == epoch:
                got.append((rank, w, y.item(), x[0].clone()))  # x is a slot of the loader's ring: copied
            before = after
        loader.close()
    return got


@pytest.mark.parametrize("counts", [[10, 10, 10], [40]])
def test_fewer_shards_than_ranks_x_workers_share_shards(tmp_path, counts):
    """3 shards (or 1) for 2 ranks x 2 workers: shards are split into interleaved parts; an epoch
    gives every worker some of them and every sample once."""
    write_split(tmp_path / "train", counts)
    cfg = data_cfg(tmp_path / "train", batch_size=2, num_workers=2, shuffle_buffer=4)
    got = epoch_samples(cfg, world_size=2)
    assert {(rank, w) for rank, w, _, _ in got} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert sorted(i for _, _, i, _ in got) == list(range(sum(counts)))


def test_flips_do_not_depend_on_ranks_or_workers(tmp_path):
    """Which images are flipped in an epoch is a function of (seed, epoch, sample): one process
    and 2 ranks x 2 workers flip the same ones; another epoch or seed flips others."""
    write_split(tmp_path / "train", [10, 10, 10])

    def flipped(seed: int, world_size: int, workers: int, epoch: int = 0) -> dict[int, bool]:
        cfg = data_cfg(tmp_path / "train", batch_size=world_size, num_workers=workers, random_flip=True)
        got = epoch_samples(cfg, world_size, epoch, seed)
        out = {i: not torch.equal(x, torch.from_numpy(tagged_image(i)).permute(2, 0, 1)) for _, _, i, x in got}
        assert len(got) == 30 and sorted(out) == list(range(30))
        return out

    one = flipped(0, 1, 0)
    assert one == flipped(0, 2, 2) and 0 < sum(one.values()) < 30
    assert one != flipped(0, 1, 0, epoch=1) and one != flipped(1, 1, 0)


def test_too_few_samples_for_the_workers_is_a_clear_error(tmp_path):
    write_split(tmp_path / "train", [2])
    with pytest.raises(DataError, match="cannot feed 2 rank"):
        build_train_loader(data_cfg(tmp_path / "train", batch_size=2, num_workers=2), rank=0, world_size=2)


@pytest.mark.parametrize("workers,flip", [(0, True), (2, True), (2, False)])
def test_resume_gives_identical_next_batches(tmp_path, workers, flip):
    """Save mid-shard and mid-epoch (and again across the epoch boundary); a fresh loader with
    the saved state yields exactly the batches the uninterrupted loader yields next."""
    write_split(tmp_path / "train", [13, 9, 11, 7], encoding="png")
    cfg = data_cfg(tmp_path / "train", num_workers=workers, shuffle_buffer=6, random_flip=flip)
    ref = build_train_loader(cfg, seed=3)
    for _ in range(5):
        next(ref)
    state = ref.state_dict()
    expected = [next(ref) for _ in range(12)]  # 17 batches x 4 > 40 samples: crosses into epoch 1
    assert ref.epoch > 0
    resumed = build_train_loader(cfg, seed=3)
    resumed.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, (next(resumed) for _ in range(12))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert resumed.state_dict() == ref.state_dict()
    if flip:
        flipped = [not torch.equal(img, torch.from_numpy(tagged_image(i)).permute(2, 0, 1))
                   for x, y in expected for img, i in zip(x, y.tolist())]
        assert 0 < sum(flipped) < len(flipped)


def test_resume_does_not_decode_delivered_samples(tmp_path):
    """Corrupt samples that were already delivered: a resumed loader never reads them, so
    even with bad_data=error it continues without a complaint (and identically)."""
    write_split(tmp_path / "train", [16], encoding="png")
    cfg = data_cfg(tmp_path / "train", shuffle_buffer=0)
    ref = build_train_loader(cfg)
    assert ids(next(ref)[0]) == [0, 1, 2, 3]
    state = ref.state_dict()
    expected = [next(ref) for _ in range(3)]
    path = tmp_path / "train" / "t-train-000000.tar"
    raw = bytearray(path.read_bytes())
    first_png = raw.find(b"\x89PNG")
    raw[first_png + 16:first_png + 40] = b"\xff" * 24  # same size: the manifest's size check passes
    path.write_bytes(bytes(raw))
    resumed = build_train_loader(cfg)
    resumed.load_state_dict(state)
    for (xa, _), (xb, _) in zip(expected, (next(resumed) for _ in range(3))):
        assert torch.equal(xa, xb)
    with pytest.raises(DataError, match="s000000"):  # a fresh start does decode it
        next(build_train_loader(cfg))


def test_workers_never_collect_what_they_inherit(tmp_path):
    """A gloo process group left as garbage in this process (as an in-process training run leaves
    one) must not be collected in a forked worker: its finalizer waits for threads a fork does not
    copy, and the worker would hang until the DataLoader timeout."""
    import gc

    import torch.distributed as dist

    write_split(tmp_path / "train", [12] * 4)
    loader = build_train_loader(data_cfg(tmp_path / "train", num_workers=2, worker_timeout_s=30))
    gc.collect()
    cycle = [dist.ProcessGroupGloo(dist.HashStore(), 0, 1)]
    cycle.append(cycle)  # garbage only the cycle collector frees: young, so a worker's first collection would
    del cycle
    assert sorted(i for _ in range(12) for i in next(loader)[1].tolist()) == list(range(48))


def test_order_depends_on_seed_only(tmp_path):
    write_split(tmp_path / "train", [20, 20])
    cfg = data_cfg(tmp_path / "train")
    a = [ids(next(build_train_loader(cfg, seed=s))[0]) for s in (0, 0, 1)]
    assert a[0] == a[1] and a[0] != a[2]


def test_state_from_another_layout_is_refused(tmp_path):
    write_split(tmp_path / "train", [20, 20])
    state = build_train_loader(data_cfg(tmp_path / "train")).state_dict()
    with pytest.raises(ValueError, match="workers"):
        build_train_loader(data_cfg(tmp_path / "train", num_workers=2)).load_state_dict(state)


def test_eval_split_read_once_across_ranks(tmp_path):
    write_split(tmp_path / "test", [7, 7, 6], split="test")
    cfg = data_cfg(tmp_path / "test")
    per_rank = [[i for x, y in iter_eval_batches(cfg, "test", r, 3, batch_size=4) for i in y.tolist()] for r in range(3)]
    assert sorted(sum(per_rank, [])) == list(range(20))
    assert per_rank[0] == [0, 1, 2, 3, 12, 13, 14, 15]  # global batches 0 and 3
    starts = [s for s, _, _ in eval_split(cfg, "test").batches(4, 1, 3)]
    assert starts == [4, 16]


def test_evaluate_bpd_same_on_tensor_and_shards(tmp_path):
    from helpers import small_flow

    from flowscale.evaluate import evaluate_bpd

    write_split(tmp_path / "test", [6, 5], split="test", labels=False)
    cfg = data_cfg(tmp_path / "test")
    images = torch.stack([torch.from_numpy(tagged_image(i)).permute(2, 0, 1) for i in range(11)])
    flow = small_flow(size=8)
    a = evaluate_bpd(flow, images, 8, 4, seed=1, dtype=torch.float64)
    b = evaluate_bpd(flow, eval_split(cfg, "test"), 8, 4, seed=1, dtype=torch.float64)
    assert a == b and 0 < a < 20


def test_demo_goes_through_shards(tmp_path):
    from flowscale.data import demo_images

    kw = dict(image_size=8, train_size=40, test_size=24, batch_size=8, num_workers=0, shuffle_buffer=0)
    cfg = DataConfig(cache_dir=str(tmp_path / "a"), **kw)
    loader = build_train_loader(cfg)
    got = torch.cat([next(loader)[0] for _ in range(5)])
    want = demo_images("train", 40, 8, 0)
    assert sorted(map(bytes, got.numpy())) == sorted(map(bytes, want.numpy()))
    root_a = next((tmp_path / "a").glob("demo-*"))
    build_train_loader(DataConfig(cache_dir=str(tmp_path / "b"), **kw))
    root_b = next((tmp_path / "b").glob("demo-*"))
    files = sorted(p.relative_to(root_a) for p in root_a.rglob("*") if p.is_file())
    assert files and all((root_a / f).read_bytes() == (root_b / f).read_bytes() for f in files)


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds

    write_split(tmp_path / "train", [5, 5], encoding="png")
    urls = [str(p) for p in sorted((tmp_path / "train").glob("*.tar"))]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert keys == [f"s{i:06d}" for i in range(10)]


def _ignored_signals(pid: int) -> int:
    """The SigIgn mask of a live process (bit n-1 set: signal n is ignored)."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)


def test_workers_live_through_the_job_signals(tmp_path):
    """Slurm signals every process of a task (SIGTERM at the time limit or a preemption, SIGUSR1/2
    ahead of it) and the main process saves a checkpoint then, so its workers must live on: real
    signals sent to the real worker processes, and the loader goes on with exactly the batches of an
    unsignalled one. Every worker must make new batches after the signals (24 batches of 4 = two
    epochs; a DataLoader holds at most 2 x 2 ahead), so a worker they had ended fails the test."""
    import multiprocessing
    import os
    import signal

    write_split(tmp_path / "train", [12] * 4)
    cfg = data_cfg(tmp_path / "train", num_workers=2, worker_timeout_s=60)
    ref = build_train_loader(cfg)
    expected = [next(ref) for _ in range(24)]
    ref.close()
    loader = build_train_loader(cfg)
    before = set(multiprocessing.active_children())
    got = [next(loader) for _ in range(2)]
    workers = [w for w in multiprocessing.active_children() if w not in before]
    assert len(workers) == 2
    job_signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    for w in workers:
        assert all(_ignored_signals(w.pid) >> (s - 1) & 1 for s in job_signals)
        for s in job_signals:
            os.kill(w.pid, s)
    got += [next(loader) for _ in range(22)]
    assert all(w.is_alive() for w in workers)
    for (xa, ya), (xb, yb) in zip(expected, got):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    loader.close()  # the loader stops its workers itself
    assert not any(w.is_alive() for w in workers)


def _in_ring(loader, x: torch.Tensor) -> bool:
    """x is a view of one of the loader's BatchRing slots (not a tensor a worker sent of its own)."""
    ring = loader._ring.x
    return ring.data_ptr() <= x.data_ptr() < ring.data_ptr() + ring.numel()


@pytest.mark.parametrize("streams", [0, 4])
def test_batches_in_the_ring_stay_valid_while_held(tmp_path, streams):
    """Workers write batches into a ring of shared-memory slots; a slot is reused only once the
    batch in it is let go. Reading batch by batch (each dropped at the next call, as training
    does), every batch comes from the ring; holding them (more than the ring has slots, and
    windows of held batches that free slots while the workers run ahead) gives the same pixels
    and labels, which a slot written under a held batch would change."""
    write_split(tmp_path / "train", [12] * 4)
    cfg = data_cfg(tmp_path / "train", batch_size=8, num_workers=2, shuffle_buffer=6, random_flip=True,
                   streams=streams)
    n = 30  # 60 samples per rank over a 48-sample split: an epoch boundary and a new shuffle included
    loader = build_train_loader(cfg)
    expected, from_ring = [], []
    for _ in range(n):
        x, y = next(loader)
        from_ring.append(_in_ring(loader, x))
        expected.append((x.clone(), y.clone()))
        del x, y
    loader.close()
    assert all(from_ring), f"batches not written into the ring: {[t for t, r in enumerate(from_ring) if not r]}"
    assert len({x.numpy().tobytes() for x, _ in expected}) == n
    for window in (n, 3, 6, 9):
        loader = build_train_loader(cfg)
        held, got = [], []
        for _ in range(n):
            held.append(next(loader))
            if len(held) > window:
                got.append(held.pop(0))
        got += held
        for t, ((xa, ya), (xb, yb)) in enumerate(zip(expected, got)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb), f"batch {t}, holding {window} batches"
        del held, got, xa, ya, xb, yb
        # once let go, every slot serves again (after the batches the workers made while they were held)
        after = []
        for _ in range(12):
            x, _ = next(loader)
            after.append(_in_ring(loader, x))
            del x
        loader.close()
        assert all(after[-4:]), f"holding {window} batches: after it, from the ring: {after}"
