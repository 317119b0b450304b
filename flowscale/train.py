"""``main(cfg)``: the one training loop where the pieces meet.

    shards -> loader -> (x uint8, y) -> objective: dequantise, flow, bits/dim (+ penalty)
           -> engine.train_step (DeepSpeed: micro-batches, veto, step) -> EMA -> log / eval / sample / checkpoint

The same function runs as a single process, under ``torchrun``, under the ``deepspeed``
launcher and under Slurm (rank and rendezvous come from the environment, see
:mod:`flowscale.distributed`). Resume is the default: if the run directory holds a complete
checkpoint, training continues from it with model, optimizer, LR schedule, EMA, data
position, step and every rank's RNG restored, so the continued run takes exactly the steps
an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from . import resume as resume_io
from . import seeds
from .audit import BATCHES, record_batch, rewind_batches
from .build import build_training, pick_device
from .config import Config, to_dict, to_yaml
from .data import build_train_loader, eval_split, first_images
from .distributed import (DistInfo, all_equal, all_gather_objects, barrier, cleanup, cpu_threads, init_distributed,
                          max_over_ranks, rank0_decides, rng_state, set_rng_state)
from .engine import train_step
from .evaluate import evaluate_bpd
from .inverse_checkpoint import UnstableSteps, reconstruction_tolerance
from .lipschitz import logdet_stats
from .lock import acquire, release
from .logging import RunLogger
from .loss import sample_noise, training_loss
from .preemption import PreemptionGuard
from .data.quantize import preprocess
from .data.splits import resolve_split
from .sample import sample_grid


def health_metrics(flow, batch: torch.Tensor, cfg: Config, dtype: torch.dtype, unstable: UnstableSteps,
                   step: int) -> tuple[dict, str | None]:
    """Per-level inverse reconstruction error |x - f^-1(f(x))| / |x| (flags the steps that then
    store their activations instead of being recomputed, the same on every rank; see
    :class:`UnstableSteps`), and per-level statistics of each step's log-det per dimension
    (``logdet_step/level_i/{mean,min,max}``). Collective. Returns (metrics, a line to log or None)."""
    # Its own stream: the check must not consume the training RNG (exact resume).
    x = preprocess(batch.cpu(), cfg.data.n_bits, generator=seeds.generator(cfg.train.seed, "health"))
    param = next(flow.parameters())
    x = x.to(param.device, dtype)
    out, line = unstable.check(flow, x, step, reduce=max_over_ranks)
    out.update(logdet_stats(flow, x))  # per-level volume change per step
    return out, line


def main(cfg: Config, resume: bool = True, resume_from: str | Path | None = None,
         trust_checkpoint: bool = False) -> dict:
    """Train per ``cfg`` on this process's rank; returns the final metrics (bits/dim, step).

    ``resume``: continue from the newest complete checkpoint of ``train.run_dir`` (the default).
    ``resume_from``: continue from this checkpoint (a ``step_XXXXXXXX`` directory, or a run
    directory meaning its newest). DeepSpeed checkpoints are pickles, so one from outside
    ``train.run_dir`` is only loaded with ``trust_checkpoint=True``.
    """
    chosen = _check_resume_from(cfg, resume, resume_from, trust_checkpoint)
    pick_device(cfg.train.device)  # a device that is not there is refused before anything starts
    info = init_distributed(cfg.engine.backend, cfg.train.device)
    log = RunLogger(cfg.train.run_dir, cfg.train.steps, is_main=info.is_main, progress=cfg.train.progress,
                    wandb_cfg=cfg.wandb, config_dict=to_dict(cfg))
    lock, threads_before = None, torch.get_num_threads()
    try:
        threads, why = cpu_threads(cfg.engine.threads, cfg.data.num_workers)
        torch.set_num_threads(threads)  # several tasks on one node must not each take every core
        log.info(f"threads per process: {threads} ({why})")
        # Checked on every rank from the files alone, before anything is written.
        ckpt = chosen if chosen is not None else (ckpt_io.resolve_latest(cfg.train.run_dir) if resume else None)
        changes = resume_io.resume_changes(ckpt, to_dict(cfg), info.world_size) if ckpt is not None else []
        if changes:
            log.info(f"resuming {ckpt.name} with changed settings: {', '.join(changes)}")
        universal = ckpt is not None and resume_io.needs_universal(ckpt, cfg.engine.zero_stage, info.world_size)
        written_by = resume_io.written_by(ckpt) if ckpt is not None else info.world_size
        if written_by != info.world_size or universal:  # allowed by resume_changes
            log.info(f"resuming {ckpt.name} written by {written_by} rank(s) (ZeRO-{resume_io.saved_stage(ckpt)}) on "
                     f"{info.world_size} (ZeRO-{cfg.engine.zero_stage}): optimizer state "
                     f"{'resharded (universal checkpoint)' if universal else 'whole (ZeRO-0)'}, "
                     f"every data stream's position kept")
        for split in ("train", "test"):  # data unlike the config (channels, size) is refused before any write
            resolve_split(cfg.data, split)
        if info.is_main:
            lock = _prepare_run_dir(cfg, resume, chosen, log)
        barrier()
        return _train(cfg, info, log, resume, chosen, universal_from=ckpt if universal else None)
    finally:
        log.close()
        release(lock)
        cleanup()
        torch.set_num_threads(threads_before)


def _check_resume_from(cfg: Config, resume: bool, resume_from, trust: bool) -> Path | None:
    """The explicitly chosen checkpoint, refused before any work if it is not to be trusted."""
    if resume_from is None:
        return None
    if not resume:
        raise ValueError("--resume PATH and --no-resume contradict each other; give one of them")
    ckpt = ckpt_io.resolve(resume_from).resolve()
    own = Path(cfg.train.run_dir).resolve() in ckpt.parents
    if not own and not trust:
        raise PermissionError(
            f"{ckpt} is a DeepSpeed checkpoint from outside train.run_dir ({cfg.train.run_dir}); its files are "
            f"pickles, and unpickling runs code. Pass --trust-checkpoint if you trust whoever wrote it, or use its "
            f"model.safetensors (flowscale sample/eval read only safetensors). Nothing was written.")
    return ckpt


def _prepare_run_dir(cfg: Config, resume: bool, chosen: Path | None, log: RunLogger):
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = acquire(run_dir, log=log.info)
    if chosen is not None:
        moved = ckpt_io.set_aside_newer(run_dir, int(chosen.name.split("_")[1]))
        if moved is not None:  # kept, out of resolve_latest's sight, so a later restart continues this branch
            log.info(f"resuming from {chosen}: this run's newer checkpoints were moved to {moved}")
    gone = ckpt_io.remove_partial(run_dir)
    if gone:  # a save or prune that a crash interrupted: never resumable, only taking space
        log.info(f"removed {len(gone)} unfinished checkpoint director{'y' if len(gone) == 1 else 'ies'} "
                 f"left by an interrupted run: {', '.join(gone)}")
    latest = ckpt_io.resolve_latest(run_dir)
    if latest is not None and not resume:
        release(lock)
        raise FileExistsError(f"{run_dir} already holds checkpoints ({latest.name}); resume (the default), "
                              f"or choose a new train.run_dir; nothing was overwritten")
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return lock


def _train(cfg: Config, info: DistInfo, log: RunLogger, resume: bool, chosen: Path | None = None,
           universal_from: Path | None = None) -> dict:
    run_dir = Path(cfg.train.run_dir)
    device = pick_device(cfg.train.device, info.local_rank)
    loader = build_train_loader(cfg.data, rank=info.rank, world_size=info.world_size, seed=cfg.data.seed)
    test_x = eval_split(cfg.data, "test")  # streamed from its shards at every eval
    init = first_images(cfg.data, cfg.train.init_batch_size)  # ActNorm's data init; resume overwrites it
    if not cfg.data.streams:  # each rank initialises from its share (data.streams: all from all, see build)
        init = init.chunk(info.world_size)[info.rank] if len(init) >= info.world_size else init
    if universal_from is not None:  # ZeRO state on another layout: DeepSpeed's universal checkpoint, made once
        _, took = resume_io.to_universal(universal_from, info.rank)
        if took:
            log.info(f"converted {universal_from.name} to DeepSpeed's universal checkpoint in {took:.1f} s")
    run = build_training(cfg, info, init, device, load_universal=universal_from is not None and cfg.engine.zero_stage > 0)
    engine, module, ema, dtype, layout = run.engine, run.module, run.ema, run.dtype, run.layout
    shapes = module.latent_shapes(cfg.data.channels, cfg.data.image_size)

    step, bad_in_row, skipped_total = 0, 0, 0
    if universal_from is not None:  # the checkpoint resume_changes checked, through its universal copy
        found = (universal_from, *ckpt_io.load(engine, universal_from, info.rank, universal=True))
    elif chosen is not None:  # picked by the user: no silent fallback to another one
        found = (chosen, *ckpt_io.load(engine, chosen, info.rank))
    else:
        found = ckpt_io.load_latest(engine, run_dir, info.rank, warn=lambda m: warnings.warn(m)) if resume else None
    if found is not None:
        path, client, rank_state = found
        step, bad_in_row, skipped_total = client["step"], client["bad_in_row"], client["skipped_total"]
        loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        if ema is not None:
            ema.load_state_dict(ckpt_io.load_ema(path, client))
        log.info(f"resumed from {path} at step {step}")
    else:
        images = len(init) if cfg.data.streams else len(init) * info.world_size  # streams: every rank, the whole batch
        log.info(f"initialised {run.n_actnorm} ActNorm layers from {images} images")
    # Records past the step training continues from (a crash after the last checkpoint, or an
    # older checkpoint chosen) are moved aside: every step appears once in metrics.jsonl.
    moved = log.rewind(step if found is not None else -1)
    if moved:
        log.info(f"{moved} metrics records after step {step} (not in the checkpoint) moved to {log.superseded_path.name}")
    if info.is_main and (run_dir / BATCHES).is_dir():  # train.record_batches: the same for the batch records
        rewind_batches(run_dir, step if found is not None else -1)
    log.info(f"model: {cfg.model.preset} L={cfg.model.levels} K={cfg.model.steps} "
             f"width={cfg.model.widths or cfg.model.width} params={run.n_params / 1e6:.2f}M | ranks={info.world_size} "
             f"global batch={layout['global']} micro-batch={layout['micro']} x accum={layout['accum']} | "
             f"ZeRO-{cfg.engine.zero_stage} {cfg.engine.precision} | device={device} run_dir={run_dir}")
    log.begin(step)
    if cfg.train.bound_images and found is None and info.is_main:
        from .bound import dataset_bound  # the floor of any linear flow, logged once beside bits/dim

        bound = dataset_bound(cfg.data, "train", cfg.train.bound_images, seed=cfg.train.seed)
        log.log(step, {"linear_bound_bpd": bound["bpd"], "linear_bound_bpd_population": bound["bpd_population"]})

    def save(step: int) -> Path:
        if cfg.data.streams:  # every rank's file then holds every stream's place: any topology can resume
            loader.adopt_positions(all_gather_objects(loader.stream_positions()))
        client = {"step": step, "bad_in_row": bad_in_row, "skipped_total": skipped_total, "config": to_dict(cfg)}
        return ckpt_io.save(engine, run_dir, step, info.rank, {"loader": loader.state_dict(), "rng": rng_state()},
                            client, to_yaml(cfg), cfg.train.keep_last, ema.state_dict() if ema is not None else None,
                            warn=lambda m: log.info(f"warning: {m}"))

    def evaluate_and_sample(step: int, final: bool) -> dict:
        t, out = cfg.train, {}
        want_eval = final or (t.eval_every and step % t.eval_every == 0)
        want_samples = final or (t.sample_every and step % t.sample_every == 0)
        if not (want_eval or want_samples):
            return out
        with ema.swapped_in(module) if ema is not None else contextlib.nullcontext():
            if want_eval:  # every rank scores its share of the test split
                out["test_bpd"] = evaluate_bpd(module, test_x, cfg.data.n_bits, layout["micro"], device,
                                               seed=cfg.train.seed, rank=info.rank, world_size=info.world_size,
                                               dtype=dtype)
            if want_samples:  # every rank runs it (ZeRO-3 gathers parameters collectively)
                module.eval()
                path = run_dir / "samples" / f"step_{step:08d}.png"
                sample_grid(module, shapes, cfg.data.n_bits, t.temperatures, path, seed=cfg.train.seed,
                            device=device, write=info.is_main, dtype=dtype, denoise_std=cfg.data.noise_std,
                            num_classes=cfg.model.num_classes)
                out["samples"] = str(path)
                log.images(step, {"samples": str(path)})
        return out

    # What is optimised: bits/dim of the dequantised batch, plus the 1x1-conv L2 penalty when set.
    loss_fn = training_loss(cfg, device, dtype)
    tolerance = reconstruction_tolerance(cfg.memory.max_reconstruction_error, dtype)
    why = f" ({cfg.engine.precision}: max(1e-3, 4 eps))" if cfg.memory.max_reconstruction_error is None else ""
    unstable = UnstableSteps(tolerance, cfg.memory.on_unstable, layout["micro"], cfg.memory.inverse_recompute, why)
    metrics: dict = {}
    t0, seen, start_step, last_save = time.time(), 0, step, time.time()
    saved_step = step if found is not None else -1
    with PreemptionGuard() as guard:  # SIGTERM/USR1/USR2 -> save at the next step boundary
        while step < cfg.train.steps:
            if guard.requested(device):  # a signal reached some rank: save this step on all, then stop
                path = save(step) if saved_step != step else ckpt_io.checkpoint_dir(run_dir) / ckpt_io.tag_for(step)
                log.info(f"preempted: saved step {step} in {path} after {guard.names()}; handing over")
                guard.hand_over(step, path)  # submitit requeues; otherwise Preempted (exit code 75)
            x, y = next(loader)  # uint8 [B, C, H, W]; labels int64 [B] when the shards have them, else None
            # Checked at the first step of every (re)start too: the unstable-step flags are runtime state.
            if cfg.memory.check_every and (step % cfg.memory.check_every == 0 or step == start_step):
                health, line = health_metrics(module, x[:cfg.memory.check_batch_size], cfg, dtype, unstable, step)
                log.log(step, health, echo=False)
                if line:
                    log.info(f"step {step}: {line}")
            # data.streams: the noise of each sample is a function of its place in the global batch
            noise = sample_noise(cfg.train.seed, step, range(info.rank * len(x), (info.rank + 1) * len(x)),
                                 tuple(x.shape[1:]), cfg.data.noise_std) if cfg.data.streams else (None, None)
            metrics = train_step(engine, (x, y, *noise), loss_fn)  # loss = bits/dim (+ penalty), backward, step
            step += 1
            if cfg.train.record_batches:
                record_batch(run_dir, info.rank, step, x)
            if metrics["skipped"]:
                bad_in_row, skipped_total = bad_in_row + 1, skipped_total + 1
                log.log(step, {"skipped_steps": skipped_total})
                if bad_in_row >= cfg.engine.max_bad_steps:
                    raise FloatingPointError(
                        f"non-finite loss or gradient in {bad_in_row} steps in a row (last at step {step}); lower optim.lr, raise "
                        f"optim.warmup_steps, or use bounded scales (model.scale_fn). No checkpoint was written from these weights.")
                continue
            bad_in_row = 0
            if ema is not None:
                ema.update(module)
            seen += len(x) * info.world_size
            log.advance(bpd=metrics["bpd"])
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                metrics["images_per_s"] = seen / (time.time() - t0)
                metrics["mem_gb"] = _memory_gb(device)
                metrics["epoch"] = loader.epoch
                if cfg.data.bad_data == "skip":  # distinct bad samples/shards met by any rank (collective: all log here)
                    loader.merge_bad_keys(all_gather_objects(loader.bad_keys))  # run-wide count, limit and ledger
                    metrics["data_skipped"] = loader.skipped
                t0, seen = time.time(), 0
                log.log(step, {k: v for k, v in metrics.items() if k != "loss" or cfg.optim.invconv_l2})
            extra = evaluate_and_sample(step, final=step == cfg.train.steps)
            if extra:
                log.log(step, extra)
                metrics.update(extra)
            due_time = cfg.train.checkpoint_minutes > 0 and time.time() - last_save > 60 * cfg.train.checkpoint_minutes
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or rank0_decides(due_time):
                save(step)
                saved_step, last_save = step, time.time()
    if info.world_size > 1:
        agree = ranks_agree(engine)
        log.log(step, {"ranks_agree": int(agree)})
        if not agree:
            warnings.warn("model replicas differ across ranks at the end of training")
    if not metrics:  # resumed a finished run: report its final state without training
        metrics = evaluate_and_sample(step, final=True)
    return {"step": step, **metrics}


def _memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocated on a GPU, process max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def ranks_agree(engine) -> bool:
    """Collective: True when every rank holds bit-identical full model weights."""
    state = ckpt_io.consolidated_state_dict(engine)
    digest = torch.tensor([sum(float(v.double().sum()) + float((v.double() ** 2).sum()) * 1e-3
                               for v in state.values() if v.is_floating_point())], dtype=torch.float64)
    return all_equal(digest)
