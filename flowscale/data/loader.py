"""Batches over an in-memory uint8 image tensor, reshuffled each epoch from (seed, epoch).

The position (epoch, offset) is the loader's whole state: ``load_state_dict`` continues with
exactly the next batch an uninterrupted run would have drawn.
"""

from __future__ import annotations

import torch

from .demo import demo_images


class TensorBatches:
    """Infinite iterator of [batch_size, C, H, W] uint8 batches (the last partial batch of an
    epoch is dropped so every step sees the same batch size)."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if len(images) < batch_size:
            raise ValueError(f"dataset has {len(images)} images, fewer than data.batch_size={batch_size}")
        if batch_size % world_size:
            raise ValueError(f"data.batch_size={batch_size} must be divisible by the world size {world_size}")
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.offset = 0, 0

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.images), generator=g)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.offset + self.batch_size > len(self.images):
            self.epoch, self.offset = self.epoch + 1, 0
        idx = self._order()[self.offset:self.offset + self.batch_size]
        self.offset += self.batch_size
        per_rank = self.batch_size // self.world_size  # every rank draws the same global batch, keeps its slice
        return self.images[idx[self.rank * per_rank:(self.rank + 1) * per_rank]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with data.seed={state['seed']}, this run has {self.seed}")
        self.epoch, self.offset = state["epoch"], state["offset"]


def build_datasets(data_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) uint8 image tensors for ``data_cfg``."""
    if data_cfg.dataset == "demo":
        if data_cfg.channels != 3:
            raise ValueError(f"data.channels={data_cfg.channels}, but the demo photos are RGB: set data.channels=3")
        train = demo_images("train", data_cfg.train_size, data_cfg.image_size, data_cfg.seed)
        test = demo_images("test", data_cfg.test_size, data_cfg.image_size, data_cfg.seed)
        return train, test
    raise ValueError(f"unknown data.dataset {data_cfg.dataset!r}")
