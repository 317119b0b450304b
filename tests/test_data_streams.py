"""Canonical streams (data.streams): global batch t -- which images, in which order, flipped or
not -- is the same for every number of ranks and loader workers that divides the streams, and
a position saved by one topology resumes on another, exactly. Real demo shards, real DataLoader
worker processes; the ranks are separate loaders in one process (the loader itself runs no
collective)."""

from __future__ import annotations

import pytest
import torch

from flowscale.config import ConfigError, DataConfig
from flowscale.data import build_train_loader
from flowscale.data.order import check_sharing, choose_streams

STREAMS = 8


def _cfg(workers: int, **kw) -> DataConfig:
    base = dict(dataset="demo", image_size=16, train_size=72, test_size=8, batch_size=16, num_workers=workers,
                shuffle_buffer=8, random_flip=True, streams=STREAMS, seed=3)
    return DataConfig(**{**base, **kw})


def _global_batches(world: int, workers: int, n: int, states=None, **kw) -> tuple[list[torch.Tensor], list]:
    loaders = [build_train_loader(_cfg(workers, **kw), rank=r, world_size=world) for r in range(world)]
    try:
        if states is not None:
            for ld in loaders:
                ld.load_state_dict(states)
        out = [torch.cat([next(ld)[0] for ld in loaders]) for _ in range(n)]
        for ld in loaders:  # what the trainer does before a save: every rank learns every stream's place
            ld.adopt_positions([other.stream_positions() for other in loaders])
        return out, [ld.state_dict() for ld in loaders]
    finally:
        for ld in loaders:
            ld.close()


@pytest.fixture(scope="module")
def reference():
    # 20 steps of 16 = 320 images, over 4 epochs of the 72-image split: epoch ends and reshuffles included
    return _global_batches(1, 0, 20)[0]


@pytest.mark.parametrize("world,workers", [(2, 0), (4, 0), (1, 2), (2, 2), (8, 0)])
def test_global_batches_do_not_depend_on_ranks_or_workers(reference, world, workers):
    got, _ = _global_batches(world, workers, 20)
    for t, (a, b) in enumerate(zip(reference, got)):
        assert torch.equal(a, b), f"global batch {t} differs on {world} rank(s) x {workers} worker(s)"


def test_flips_and_order_are_in_play(reference):
    # the check above would be empty if every batch were the same or nothing were flipped
    assert len({b.numpy().tobytes() for b in reference}) == len(reference), "every global batch differs"
    plain, _ = _global_batches(1, 0, 4, random_flip=False)
    assert any(not torch.equal(a, b) for a, b in zip(reference[:4], plain))


@pytest.mark.parametrize("first,second", [((2, 0), (1, 2)), ((1, 2), (4, 0)), ((4, 0), (2, 1))])
def test_a_position_saved_on_one_topology_resumes_on_another(reference, first, second):
    _, states = _global_batches(*first, 7)
    assert all(s == states[0] for s in states), "after the exchange every rank holds the same state"
    got, _ = _global_batches(*second, 13, states=states[0])
    for t, (a, b) in enumerate(zip(reference[7:], got)):
        assert torch.equal(a, b), f"batch {7 + t} after switching {first} -> {second}"


def test_topologies_that_do_not_divide_the_streams_are_refused():
    with pytest.raises(ConfigError, match="data.streams"):
        build_train_loader(_cfg(0, batch_size=24), rank=0, world_size=3)
    with pytest.raises(ConfigError, match="data.streams"):
        build_train_loader(_cfg(3), rank=0, world_size=1)
    with pytest.raises(ConfigError, match="data.streams"):
        _cfg(0, batch_size=12)
    legacy = build_train_loader(_cfg(0, streams=0), rank=0, world_size=1)
    with pytest.raises(ValueError, match="does not fit"):  # a legacy position is not a streams position
        build_train_loader(_cfg(0), rank=0, world_size=1).load_state_dict(legacy.state_dict())


def test_batches_held_by_the_caller_stay_the_canonical_ones(reference):
    """With workers the rank's batch is written by all of them into one slot of a shared ring; a
    caller holding every batch (the ring full, workers sending their parts instead) or a sliding
    window of them still gets exactly the canonical batches."""
    for window in (20, 2, 5):
        loader = build_train_loader(_cfg(2), rank=0, world_size=1)
        try:
            held, got = [], []
            for _ in range(20):
                held.append(next(loader)[0])
                if len(held) > window:
                    got.append(held.pop(0))
            got += held
        finally:
            loader.close()
        for t, (a, b) in enumerate(zip(reference, got)):
            assert torch.equal(a, b), f"global batch {t}, holding {window} batches"


# -- data.streams=null: the streams a new run chooses ---------------------------------------------

@pytest.mark.parametrize("batch,shards,world,workers,want", [
    (32, 8, 1, 0, 8),        # the demo's default: 8 shards of 1024, batch 32 -> 8 (serves 1, 2, 4, 8)
    (32, 8, 2, 0, 8),        # the same choice on 2 ranks: 1 and 2 ranks train alike
    (8, 1, 1, 0, 8),         # fewer shards than the floor: still 8, the shard split in 8 parts
    (256, 100, 8, 8, 64),    # at most the shard count: 128 would share shards
    (256, 1000, 8, 8, 256),  # plenty of shards: the whole batch, one sample per stream and step
    (12, 16, 1, 0, 12),      # not a power of two: 12 serves 1, 2, 3, 4, 6, 12
    (32, 8, 2, 8, 16),       # 16 loader processes, more than the shards: the fewest streams they allow
    (32, 4, 1, 3, 0),        # 3 workers divide no divisor of 32: off, the per-rank order
])
def test_the_streams_a_new_run_chooses(batch, shards, world, workers, want):
    counts = [64] * shards
    S, why = choose_streams(batch, counts, world, workers)
    assert S == want, why
    if S:  # what the loader will demand of it
        assert batch % S == 0 and S % (world * max(1, workers)) == 0
        check_sharing(counts, S, 1, "split")
        assert f"dividing {S} can resume it" in why
    else:
        assert why.startswith("off:") and "data.num_workers" in why


def test_the_choice_leaves_streams_with_samples():
    # 1 shard of 3 samples split into 8 or 4 parts would leave parts empty: 2 streams, each part non-empty
    assert choose_streams(8, [3], 1, 0)[0] == 2
    assert choose_streams(8, [3], 4, 0)[0] == 0  # 4 ranks need 4 streams of samples that are not there


def test_a_loader_without_data_streams_reads_the_chosen_streams(reference):
    """streams=None (a library caller; flowscale train resolves it before): the loader applies the
    rule, and on 1 rank and 2 ranks x 2 workers it reads the same global batches as the streams it chose."""
    assert choose_streams(16, [72], 1, 0)[0] == STREAMS == choose_streams(16, [72], 2, 2)[0]
    for world, workers in ((1, 0), (2, 2)):
        got, _ = _global_batches(world, workers, 6, streams=None)
        assert all(torch.equal(a, b) for a, b in zip(reference, got)), (world, workers)
