"""``main(cfg)``: the one training loop where the pieces meet.

    batches -> dequantise -> flow -> bits/dim -> optimizer step -> log / eval / sample / checkpoint

Resume is the default: if the run directory holds a checkpoint, training continues from it
with the model, optimizer, schedule, data position, step and RNG state restored, so the
continued run takes exactly the steps an uninterrupted one would have.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, load_latest, resolve_latest, save_checkpoint
from .config import Config, from_dict, to_dict, to_yaml
from .data import TensorBatches, build_datasets
from .evaluate import evaluate_bpd
from .flows.actnorm import initialize_actnorm
from .flows.models import build_flow
from .inverse_checkpoint import check_and_flag, inverse_checkpoint
from .logging import RunLogger
from .loss import flow_bpd
from .data.quantize import preprocess
from .sample import sample_grid


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def build_model(cfg: Config, device: torch.device | str = "cpu"):
    """The flow for ``cfg`` on ``device`` with the memory wrapper applied from outside."""
    flow = build_flow(cfg.model, cfg.data.channels, cfg.data.image_size).to(device)
    return inverse_checkpoint(flow, enabled=cfg.memory.inverse_recompute, levels=cfg.memory.recompute_levels)


def build_optimizer(cfg: Config, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    o = cfg.optim
    params = [p for p in params if p.requires_grad]
    if o.name == "adam":
        opt = torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    elif o.name == "adamw":
        opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.Adamax(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    total, warm = cfg.train.steps, o.warmup_steps

    def schedule(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if o.decay == "cosine":
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def train_step(flow, optimizer, scheduler, batch: torch.Tensor, cfg: Config, step: int) -> dict:
    """One optimisation step on a uint8 batch; returns scalar metrics."""
    flow.train()
    bpd, parts = flow_bpd(flow, batch, cfg.data.n_bits)
    loss = bpd.mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"non-finite bits/dim ({loss.item()}) at step {step}; lower optim.lr, raise optim.warmup_steps, "
            f"or use bounded scales (model.scale_fn). No checkpoint was written from these weights.")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm at step {step}; lower optim.lr or set optim.grad_clip")
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return {"bpd": loss.item(), "grad_norm": grad_norm.item(), "lr": lr,
            "logdet_per_dim": (parts["logdet"].mean() / batch[0].numel()).item()}


def health_metrics(flow, batch: torch.Tensor, cfg: Config) -> dict:
    """Per-level inverse reconstruction error |x - f^-1(f(x))| / |x|; flags unstable steps so
    they store activations instead of being recomputed through their inverse."""
    # Own generator: the check must not consume the training RNG (exact resume).
    x = preprocess(batch.cpu(), cfg.data.n_bits, generator=torch.Generator().manual_seed(cfg.train.seed)).to(batch.device)
    errs = check_and_flag(flow, x, cfg.memory.max_reconstruction_error)
    out = {f"recon_err/level_{i}": e for i, e in enumerate(errs["level"])}
    out["recon_unstable_steps"] = errs["flagged"]
    return out


def main(cfg: Config, resume: bool = True) -> dict:
    """Train per ``cfg``; returns the final metrics (train and test bits/dim, step)."""
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = resolve_latest(run_dir)
    if latest is not None and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints ({latest.name}); resume (the default), "
                              f"or choose a new train.run_dir; nothing was overwritten")
    (run_dir / "config.yaml").write_text(to_yaml(cfg))

    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    train_x, test_x = build_datasets(cfg.data)
    loader = TensorBatches(train_x, cfg.data.batch_size, seed=cfg.data.seed)
    flow = build_model(cfg, device)
    optimizer, scheduler = build_optimizer(cfg, flow.parameters())
    shapes = flow.latent_shapes(cfg.data.channels, cfg.data.image_size)

    step = 0
    found = load_latest(run_dir) if resume else None
    if found is not None:
        path, state = found
        try:
            flow.load_state_dict(state["model"])
        except RuntimeError as e:
            raise RuntimeError(f"checkpoint {path} does not match the configured model (was model.* changed?): {e}") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        step = state["step"]
        print(f"resumed from {path} at step {step}", flush=True)
    else:
        g = torch.Generator().manual_seed(cfg.train.seed)
        init = train_x[torch.randperm(len(train_x), generator=g)[:cfg.train.init_batch_size]].to(device)
        n = initialize_actnorm(flow, preprocess(init, cfg.data.n_bits, generator=g))
        print(f"initialised {n} ActNorm layers from {len(init)} images", flush=True)

    n_params = sum(p.numel() for p in flow.parameters())
    print(f"model: {cfg.model.preset} L={cfg.model.levels} K={cfg.model.steps} width={cfg.model.width} "
          f"params={n_params / 1e6:.2f}M device={device} run_dir={run_dir}", flush=True)
    log = RunLogger(run_dir, cfg.train.steps, start_step=step, progress=cfg.train.progress)

    def save(step: int) -> None:
        save_checkpoint(run_dir, step, {
            "model": flow.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(), "rng": {"torch": torch.get_rng_state()}, "step": step,
            "config": to_dict(cfg)}, cfg.train.keep_last)

    def evaluate_and_sample(step: int, final: bool) -> dict:
        out = {}
        t = cfg.train
        if final or (t.eval_every and step % t.eval_every == 0):
            out["test_bpd"] = evaluate_bpd(flow, test_x, cfg.data.n_bits, cfg.data.batch_size, device, seed=cfg.train.seed)
        if final or (t.sample_every and step % t.sample_every == 0):
            flow.eval()
            path = sample_grid(flow, shapes, cfg.data.n_bits, t.temperatures, run_dir / "samples" / f"step_{step:08d}.png",
                               seed=cfg.train.seed, device=device)
            out["samples"] = str(path)
        return out

    metrics: dict = {}
    t0, seen = time.time(), 0
    start_step = step
    while step < cfg.train.steps:
        batch = next(loader).to(device)
        # Checked at the first step of every (re)start too: the unstable-step flags are runtime state.
        if cfg.memory.check_every and (step % cfg.memory.check_every == 0 or step == start_step):
            log.log(step, health_metrics(flow, batch[:cfg.memory.check_batch_size], cfg), echo=False)
        metrics = train_step(flow, optimizer, scheduler, batch, cfg, step)
        step += 1
        seen += len(batch)
        log.advance(bpd=metrics["bpd"])
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            metrics["images_per_s"] = seen / (time.time() - t0)
            t0, seen = time.time(), 0
            log.log(step, metrics)
        extra = evaluate_and_sample(step, final=step == cfg.train.steps)
        if extra:
            log.log(step, extra)
            metrics.update(extra)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            save(step)
    log.close()
    if not metrics:  # resumed a finished run: report its final state without training
        metrics = evaluate_and_sample(step, final=True)
    return {"step": step, **metrics}


def load_trained(ckpt: str | Path, device: torch.device | str = "cpu"):
    """(flow in eval mode, Config) from a checkpoint file or a run directory (its latest)."""
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        found = load_latest(ckpt)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt / 'checkpoints'}; train first or pass a .pt file")
        ckpt, state = found
    else:
        state = load_checkpoint(ckpt)
    cfg = from_dict(state["config"])
    flow = build_model(cfg, device)
    flow.load_state_dict(state["model"])
    flow.eval()
    return flow, cfg
