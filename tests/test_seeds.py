"""Named random streams (flowscale.seeds): deterministic, distinct by name and index, and
without the collisions of multiplier schemes."""

import pytest
import torch

from flowscale import seeds


def test_streams_are_deterministic_and_distinct():
    a = seeds.generator(7, "dequant", 0)
    b = seeds.generator(7, "dequant", 0)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    draws = {(name, i): seeds.derive(7, name, i) for name in seeds.STREAMS for i in range(4)}
    assert len(set(draws.values())) == len(draws), "two (stream, index) pairs share a seed"
    assert seeds.derive(7, "flip", 1, 2) != seeds.derive(7, "flip", 2, 1), "the index is ordered"
    assert seeds.derive(7, "flip", 1) != seeds.derive(8, "flip", 1)


def test_no_collisions_where_multipliers_collide():
    # The old scheme seed * 1000 + rank gave seed 0 / rank 1000 the stream of seed 1 / rank 0.
    assert seeds.derive(0, "dequant", 1000) != seeds.derive(1, "dequant", 0)
    assert 0 <= seeds.derive(2 ** 40, "dequant", 3) < 2 ** 63


def test_numpy_and_torch_streams():
    r1, r2 = seeds.numpy_rng(3, "data_order", 5), seeds.numpy_rng(3, "data_order", 5)
    assert (r1.permutation(50) == r2.permutation(50)).all()
    assert not (seeds.numpy_rng(3, "data_order", 5).permutation(50) ==
                seeds.numpy_rng(3, "data_order", 6).permutation(50)).all()


def test_unknown_stream_is_an_error():
    with pytest.raises(KeyError, match="unknown random stream 'dequant_noise'"):
        seeds.derive(0, "dequant_noise")
