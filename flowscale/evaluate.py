"""Test bits/dim: nats and dimensions are summed over the whole split, divided once at the end.
:class:`PeriodicEval`: test bits/dim and sample grids during training, with EMA weights swapped in."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from . import seeds
from .data import TensorSplit
from .distributed import all_reduce_sum_
from .loss import objective


@torch.no_grad()
def evaluate_bpd(flow, images, n_bits: int, batch_size: int, device="cpu", seed: int = 0,
                 labels: torch.Tensor | None = None, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32) -> float:
    """Mean bits/dim of uint8 ``images`` [N, C, H, W] (dequantisation noise drawn from ``seed``).
    ``images`` is a tensor or a split streamed from shards (:func:`flowscale.data.eval_split`).

    With several ranks each scores every world_size-th batch; bits and dimensions are summed
    over ranks, then divided once. Every rank runs the same number of forward passes (a rank
    without a batch left runs a dummy one) so ZeRO-3's collective parameter gathers line up.
    """
    was_training = flow.training
    flow.eval()
    total = torch.zeros(2, dtype=torch.float64)
    split = TensorSplit(images, labels) if isinstance(images, torch.Tensor) else images
    rounds = math.ceil(split.num_batches(batch_size) / world_size)
    mine_batches = split.batches(batch_size, rank, world_size)
    dummy = (0, torch.zeros((1, *split.image_shape), dtype=torch.uint8),
             torch.zeros(1, dtype=torch.int64) if split.has_labels else None)
    for r in range(rounds):
        s, x, y = next(mine_batches, None) or dummy
        mine = len(x) > 0 and x is not dummy[1]
        if not mine:  # no batch left for this rank, or all its samples were skipped (bad_data=skip)
            _, x, y = dummy
        # Noise from the eval stream of the batch's first index: the number depends on neither
        # the device nor the number of ranks.
        bpd = objective(flow, x, n_bits, y, noise=seeds.generator(seed, "eval_noise", s), device=device, dtype=dtype).bpd
        if mine:
            total += torch.tensor([bpd.double().sum().item() * x[0].numel(), x.shape[0] * x[0].numel()],
                                  dtype=torch.float64)
    if world_size > 1:
        all_reduce_sum_(total)
    flow.train(was_training)
    if total[1] == 0:  # every image of the split was skipped as bad data (bad_data=skip)
        raise split.no_usable_image()
    result = (total[0] / total[1]).item()
    if not math.isfinite(result):
        raise FloatingPointError("non-finite test bits/dim: the model produced inf/NaN on the test split")
    return result


class PeriodicEval:
    """During training: test bits/dim every ``train.eval_every`` steps and a sample grid every
    ``train.sample_every`` (both at the last step), with the EMA weights swapped in when there are
    any. Decided by the step number alone. Every rank calls it: both are collective (every rank
    scores its share of the test split; ZeRO-3 gathers parameters collectively to sample)."""

    def __init__(self, cfg, run, test_x, info, log):
        self.cfg, self.run, self.test_x, self.info, self.log = cfg, run, test_x, info, log

    def __call__(self, step: int, final: bool) -> dict:
        """{"test_bpd", "samples"} of what was due at ``step`` (``final``: both), logged."""
        from .sample import sample_grid

        t, run, cfg, out = self.cfg.train, self.run, self.cfg, {}
        want_eval = final or (t.eval_every and step % t.eval_every == 0)
        want_samples = final or (t.sample_every and step % t.sample_every == 0)
        if not (want_eval or want_samples):
            return out
        with run.ema.swapped_in(run.module) if run.ema is not None else contextlib.nullcontext():
            if want_eval:
                out["test_bpd"] = evaluate_bpd(run.module, self.test_x, cfg.data.n_bits, run.layout["micro"],
                                               run.device, seed=t.seed, rank=self.info.rank,
                                               world_size=self.info.world_size, dtype=run.dtype)
            if want_samples:
                run.module.eval()
                path = Path(t.run_dir) / "samples" / f"step_{step:08d}.png"
                shapes = run.module.latent_shapes(cfg.data.channels, cfg.data.image_size)
                sample_grid(run.module, shapes, cfg.data.n_bits, t.temperatures, path, seed=t.seed,
                            device=run.device, write=self.info.is_main, dtype=run.dtype,
                            denoise_std=cfg.data.noise_std, num_classes=cfg.model.num_classes)
                out["samples"] = str(path)
                self.log.images(step, {"samples": str(path)})
        if out:
            self.log.log(step, out)
        return out
