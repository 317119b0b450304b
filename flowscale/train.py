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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from . import faults
from . import resume as resume_io
from . import seeds
from .analysis.audit import BATCHES, record_batch, rewind_batches
from .build import build_training, pick_device
from .config import Config, to_dict, to_yaml
from .data import build_train_loader, eval_split, first_images
from .divergence import DivergenceWatch, Rollback, rollback_target
from .distributed import (DistInfo, all_equal, all_gather_objects, barrier, cleanup, cpu_threads, init_distributed,
                          max_over_ranks, rank0_decides, rng_state, set_rng_state)
from .engine import scale_lr, train_step
from .evaluate import evaluate_bpd
from .inverse_checkpoint import UnstableSteps, reconstruction_tolerance
from .analysis.lipschitz import logdet_stats
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


@dataclass
class TrainState:
    """What the loop itself carries from step to step and across a resume (saved in client.pt)."""
    step: int = 0
    """Optimizer steps taken (applied or vetoed)."""
    bad_in_row: int = 0
    """Vetoed (non-finite) steps in a row, up to the last one."""
    skipped_total: int = 0
    """Vetoed steps over the whole run."""
    divergence: DivergenceWatch = field(default_factory=DivergenceWatch)
    """The divergence watch: running statistics, current streak, rollbacks so far."""

    def state_dict(self) -> dict:
        return {"step": self.step, "bad_in_row": self.bad_in_row, "skipped_total": self.skipped_total,
                "divergence": self.divergence.state_dict(), "healthy": self.healthy}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.bad_in_row, self.skipped_total = d["step"], d["bad_in_row"], d["skipped_total"]
        self.divergence = DivergenceWatch()  # checkpoints from before the watch start it afresh
        self.divergence.load_state_dict(d.get("divergence", {}))

    @property
    def healthy(self) -> bool:
        """No step of a running streak was flagged or vetoed: a checkpoint now may be rolled back to."""
        return self.divergence.healthy and self.bad_in_row == 0

    def count(self, skipped: bool) -> None:
        """Account for the step just taken."""
        self.bad_in_row = self.bad_in_row + 1 if skipped else 0
        self.skipped_total += int(skipped)


class Diverged(FloatingPointError):
    """The run diverged and was stopped (train.on_divergence=abort, or no rollback allowed)."""


ADVICE = ("lower optim.lr, raise optim.warmup_steps, or use bounded scales (model.scale_fn); to tune the watch "
          "see README: Divergence. No checkpoint was written from these weights.")


def _written_healthy(ckpt: Path) -> bool:
    """The ``healthy`` flag of a checkpoint's client state (checkpoints from before the flag: True)."""
    return bool(torch.load(ckpt / "client.pt", map_location="cpu", weights_only=True).get("healthy", True))


class Trainer:
    """Build (data, model, engine), restore, then :meth:`train`: the loop, one job per line."""

    def __init__(self, cfg: Config, info: DistInfo, log: RunLogger):
        self.cfg, self.info, self.log = cfg, info, log
        self.run_dir = Path(cfg.train.run_dir)
        self.device = pick_device(cfg.train.device, info.local_rank)
        self.state = TrainState()
        self.health: dict | None = None  # the health check's numbers for the step about to run

    # -- build and restore --------------------------------------------------------------------------

    def build(self, universal_from: Path | None) -> None:
        cfg, info = self.cfg, self.info
        self.loader = build_train_loader(cfg.data, rank=info.rank, world_size=info.world_size, seed=cfg.data.seed)
        self.test_x = eval_split(cfg.data, "test")  # streamed from its shards at every eval
        init = first_images(cfg.data, cfg.train.init_batch_size)  # ActNorm's data init; resume overwrites it
        if not cfg.data.streams:  # each rank initialises from its share (data.streams: all from all, see build)
            init = init.chunk(info.world_size)[info.rank] if len(init) >= info.world_size else init
        self.init_images = len(init) if cfg.data.streams else len(init) * info.world_size
        if universal_from is not None:  # ZeRO state on another layout: DeepSpeed's universal checkpoint, made once
            _, took = resume_io.to_universal(universal_from, info.rank)
            if took:
                self.log.info(f"converted {universal_from.name} to DeepSpeed's universal checkpoint in {took:.1f} s")
        self.run = build_training(cfg, info, init, self.device,
                                  load_universal=universal_from is not None and cfg.engine.zero_stage > 0)
        self.loss_fn = training_loss(cfg, self.device, self.run.dtype)  # bits/dim (+ the 1x1-conv penalty)
        tolerance = reconstruction_tolerance(cfg.memory.max_reconstruction_error, self.run.dtype)
        why = f" ({cfg.engine.precision}: max(1e-3, 4 eps))" if cfg.memory.max_reconstruction_error is None else ""
        self.unstable = UnstableSteps(tolerance, cfg.memory.on_unstable, self.run.layout["micro"],
                                      cfg.memory.inverse_recompute, why)

    def restore(self, resume: bool, chosen: Path | None, universal_from: Path | None) -> bool:
        """Load the checkpoint to continue from, if any (every rank); True when one was loaded."""
        info, engine = self.info, self.run.engine
        if universal_from is not None:  # the checkpoint resume_changes checked, through its universal copy
            found = (universal_from, *ckpt_io.load(engine, universal_from, info.rank, universal=True))
        elif chosen is not None:  # picked by the user: no silent fallback to another one
            found = (chosen, *ckpt_io.load(engine, chosen, info.rank))
        else:
            found = ckpt_io.load_latest(engine, self.run_dir, info.rank, warn=lambda m: warnings.warn(m)) if resume else None
        if found is not None:
            path, client, rank_state = found
            self.state.load_state_dict(client)
            self.loader.load_state_dict(rank_state["loader"])
            set_rng_state(rank_state["rng"])
            if self.run.ema is not None:
                self.run.ema.load_state_dict(ckpt_io.load_ema(path, client))
            self.log.info(f"resumed from {path} at step {self.state.step}")
        else:
            self.log.info(f"initialised {self.run.n_actnorm} ActNorm layers from {self.init_images} images")
        # Records past the step training continues from (a crash after the last checkpoint, or an
        # older checkpoint chosen) are moved aside: every step appears once in metrics.jsonl.
        step = self.state.step if found is not None else -1
        moved = self.log.rewind(step)
        if moved:
            self.log.info(f"{moved} metrics records after step {step} (not in the checkpoint) moved to "
                          f"{self.log.superseded_path.name}")
        if info.is_main and (self.run_dir / BATCHES).is_dir():  # train.record_batches: the same for the batch records
            rewind_batches(self.run_dir, step)
        return found is not None

    # -- the jobs of the loop -----------------------------------------------------------------------

    def health_due(self, start_step: int) -> bool:
        every = self.cfg.memory.check_every
        # Checked at the first step of every (re)start too: the unstable-step flags are runtime state.
        return bool(every) and (self.state.step % every == 0 or self.state.step == start_step)

    def check_health(self, x: torch.Tensor) -> None:
        health, line = health_metrics(self.run.module, x[:self.cfg.memory.check_batch_size], self.cfg, self.run.dtype,
                                      self.unstable, self.state.step)
        self.log.log(self.state.step, health, echo=False)
        self.health = health
        if line:
            self.log.info(f"step {self.state.step}: {line}")

    def noise(self, x: torch.Tensor) -> tuple:
        """data.streams: the dequantisation noise of each sample is a function of its place in the
        global batch (the same on any number of ranks); otherwise drawn from the rank's RNG in the loss."""
        if not self.cfg.data.streams:
            return None, None
        rank = self.info.rank
        return sample_noise(self.cfg.train.seed, self.state.step, range(rank * len(x), (rank + 1) * len(x)),
                            tuple(x.shape[1:]), self.cfg.data.noise_std)

    def log_train(self, metrics: dict, throughput: "Throughput") -> None:
        t, step = self.cfg.train, self.state.step
        if metrics["skipped"]:
            self.log.log(step, {"skipped_steps": self.state.skipped_total})
            return
        self.log.advance(bpd=metrics["bpd"])
        if step % t.log_every and step != t.steps:
            return
        metrics.update(images_per_s=throughput.rate(), mem_gb=_memory_gb(self.device), epoch=self.loader.epoch)
        if self.cfg.data.bad_data == "skip":  # distinct bad samples/shards met by any rank (collective: all log here)
            self.loader.merge_bad_keys(all_gather_objects(self.loader.bad_keys))  # run-wide count, limit and ledger
            metrics["data_skipped"] = self.loader.skipped
        self.log.log(step, {k: v for k, v in metrics.items() if k != "loss" or self.cfg.optim.invconv_l2})

    def evaluate_and_sample(self, final: bool) -> dict:
        """Test bits/dim and a sample grid when due (every rank: both are collective), with EMA
        weights swapped in."""
        t, step, run, out = self.cfg.train, self.state.step, self.run, {}
        want_eval = final or (t.eval_every and step % t.eval_every == 0)
        want_samples = final or (t.sample_every and step % t.sample_every == 0)
        if not (want_eval or want_samples):
            return out
        with run.ema.swapped_in(run.module) if run.ema is not None else contextlib.nullcontext():
            if want_eval:  # every rank scores its share of the test split
                out["test_bpd"] = evaluate_bpd(run.module, self.test_x, self.cfg.data.n_bits, run.layout["micro"],
                                               self.device, seed=t.seed, rank=self.info.rank,
                                               world_size=self.info.world_size, dtype=run.dtype)
            if want_samples:  # every rank runs it (ZeRO-3 gathers parameters collectively)
                run.module.eval()
                path = self.run_dir / "samples" / f"step_{step:08d}.png"
                shapes = run.module.latent_shapes(self.cfg.data.channels, self.cfg.data.image_size)
                sample_grid(run.module, shapes, self.cfg.data.n_bits, t.temperatures, path, seed=t.seed,
                            device=self.device, write=self.info.is_main, dtype=run.dtype,
                            denoise_std=self.cfg.data.noise_std, num_classes=self.cfg.model.num_classes)
                out["samples"] = str(path)
                self.log.images(step, {"samples": str(path)})
        if out:
            self.log.log(step, out)
        return out

    def diverged(self, metrics: dict) -> bool:
        """The step's flags, agreed over ranks (one all-reduce), into the divergence watch; on
        divergence abort (raises :class:`Diverged`) or roll back. True after a rollback."""
        d, state = self.cfg.divergence, self.state
        local = torch.tensor(state.divergence.flags(d, metrics, self.health), device=self.device)
        self.health = None
        why = state.divergence.observe(d, state.step, max_over_ranks(local).tolist(), metrics, state.bad_in_row,
                                       self.cfg.engine.max_bad_steps)
        if why is None:
            return False
        self.roll_back(why)
        return True

    def roll_back(self, why: str) -> None:
        """Restore the newest checkpoint written while healthy before the streak began (through
        :meth:`restore`), keep the data position (the diverged window's batches are not replayed),
        lower the LR for divergence.lr_steps steps and record the rollback (in the watch's state,
        so in every later checkpoint, and in metrics.jsonl / W&B). Every rank, the same decision."""
        cfg, state, watch = self.cfg, self.state, self.state.divergence
        at, first_bad = state.step, watch.first_bad
        line = f"diverged at step {at}: {why}"
        if cfg.train.on_divergence == "abort":
            raise Diverged(f"{line} (last at step {at}); stopped (train.on_divergence=abort). {ADVICE}")
        target = rollback_target(ckpt_io.list_complete(self.run_dir), _written_healthy, first_bad)
        to = int(target.name.split("_")[1]) if target is not None else -1
        refused = (f"no checkpoint written while healthy at step <= {first_bad - 2} to roll back to "
                   f"(train.checkpoint_every={cfg.train.checkpoint_every})" if target is None
                   else watch.refusal(cfg.divergence, to))
        if refused:
            raise Diverged(f"{line} (last at step {at}); not rolled back: {refused}. {ADVICE}")
        batches = at - to
        record = Rollback(at_step=at, to_step=to, first_bad=first_bad, reason=why, skipped_batches=batches,
                          skipped_samples=batches * self.run.layout["global"], lr_factor=cfg.divergence.lr_factor,
                          lr_until=to + cfg.divergence.lr_steps)
        history = [*watch.rollbacks, asdict(record)]
        position = self.loader.state_dict()  # past the diverged window
        if self.info.is_main:  # the diverged trajectory's checkpoints: kept aside, never "latest"
            ckpt_io.set_aside_newer(self.run_dir, to)
        barrier()
        self.restore(True, target, None)
        self.loader.load_state_dict(position)
        self.state.divergence.rollbacks = history
        self.log.info(f"{line}; rollback {len(history)}/{cfg.divergence.max_rollbacks}: restored {target.name}, "
                      f"skipping the data of steps {to + 1}-{at} ({record.skipped_samples} samples), LR x"
                      f"{record.lr_factor:g} until step {record.lr_until}")
        self.log.log(to, {"rollback": len(history), "rollback_from_step": at, "rollback_first_bad": first_bad,
                          "rollback_skipped_samples": record.skipped_samples, "rollback_lr_factor": record.lr_factor},
                     echo=False)

    def save_due(self, last_save: float) -> bool:
        t, step = self.cfg.train, self.state.step
        due_time = t.checkpoint_minutes > 0 and time.time() - last_save > 60 * t.checkpoint_minutes
        return step % t.checkpoint_every == 0 or step == t.steps or rank0_decides(due_time)

    def save(self) -> Path:
        """A checkpoint of this step (collective: every rank writes its part)."""
        cfg, info, run = self.cfg, self.info, self.run
        if cfg.data.streams:  # every rank's file then holds every stream's place: any topology can resume
            self.loader.adopt_positions(all_gather_objects(self.loader.stream_positions()))
        client = {**self.state.state_dict(), "config": to_dict(cfg)}  # with "healthy": a rollback target?
        return ckpt_io.save(run.engine, self.run_dir, self.state.step, info.rank,
                            {"loader": self.loader.state_dict(), "rng": rng_state()}, client, to_yaml(cfg),
                            cfg.train.keep_last, run.ema.state_dict() if run.ema is not None else None,
                            warn=lambda m: self.log.info(f"warning: {m}"))

    def describe(self) -> None:
        cfg, run, info = self.cfg, self.run, self.info
        layout = run.layout
        self.log.info(f"model: {cfg.model.preset} L={cfg.model.levels} K={cfg.model.steps} "
                      f"width={cfg.model.widths or cfg.model.width} params={run.n_params / 1e6:.2f}M | "
                      f"ranks={info.world_size} global batch={layout['global']} micro-batch={layout['micro']} x "
                      f"accum={layout['accum']} | ZeRO-{cfg.engine.zero_stage} {cfg.engine.precision} | "
                      f"device={self.device} run_dir={self.run_dir}")

    def log_bound(self) -> None:
        """train.bound_images: the floor of any linear flow, logged once beside bits/dim."""
        if self.cfg.train.bound_images and self.info.is_main:
            from .analysis.bound import dataset_bound

            bound = dataset_bound(self.cfg.data, "train", self.cfg.train.bound_images, seed=self.cfg.train.seed)
            self.log.log(self.state.step, {"linear_bound_bpd": bound["bpd"],
                                           "linear_bound_bpd_population": bound["bpd_population"]})

    # -- the loop ----------------------------------------------------------------------------------

    def train(self, resumed: bool) -> dict:
        """The loop from the restored step to train.steps. ``resumed``: the current step is a
        checkpoint already (a preemption right away need not save it again)."""
        cfg, state, engine, loader = self.cfg, self.state, self.run.engine, self.loader
        start_step, last_save, metrics = state.step, time.time(), {}
        saved_step = state.step if resumed else -1
        throughput = Throughput(self.info.world_size)
        with PreemptionGuard() as guard:  # SIGTERM/USR1/USR2 -> save at the next step boundary
            while state.step < cfg.train.steps:
                if guard.requested(self.device):  # a signal reached some rank: save this step on all, then stop
                    path = self.save() if saved_step != state.step else ckpt_io.checkpoint_dir(self.run_dir) / \
                        ckpt_io.tag_for(state.step)
                    self.log.info(f"preempted: saved step {state.step} in {path} after {guard.names()}; handing over")
                    guard.hand_over(state.step, path)  # submitit requeues; otherwise Preempted (exit code 75)
                x, y = next(loader)  # uint8 [B, C, H, W]; labels int64 [B] when the shards have them, else None
                if self.health_due(start_step):
                    self.check_health(x)
                loss_fn = faults.loss_at(state.step + 1, self.info.rank, self.loss_fn, loader.batches)  # the fault point
                scale_lr(engine, state.divergence.lr_factor(state.step + 1))  # lowered after a rollback, else 1
                metrics = train_step(engine, (x, y, *self.noise(x)), loss_fn)  # bits/dim, backward, step (or veto)
                state.step += 1
                if cfg.train.record_batches:
                    record_batch(self.run_dir, self.info.rank, state.step, x)
                state.count(bool(metrics["skipped"]))
                if not metrics["skipped"]:
                    if self.run.ema is not None:
                        self.run.ema.update(self.run.module)
                    throughput.add(len(x))
                self.log_train(metrics, throughput)
                if self.diverged(metrics):  # abort: raises; rollback: back at a healthy checkpoint, past this data
                    saved_step = state.step
                    continue
                metrics.update(self.evaluate_and_sample(final=state.step == cfg.train.steps))
                if self.save_due(last_save):
                    self.save()
                    saved_step, last_save = state.step, time.time()
        if self.info.world_size > 1:
            agree = ranks_agree(engine)
            self.log.log(state.step, {"ranks_agree": int(agree)})
            if not agree:
                warnings.warn("model replicas differ across ranks at the end of training")
        if not metrics:  # resumed a finished run: report its final state without training
            metrics = self.evaluate_and_sample(final=True)
        return {"step": state.step, **metrics, "rollbacks": list(state.divergence.rollbacks)}


class Throughput:
    """Images per second over the applied steps since the last read (all ranks)."""

    def __init__(self, world_size: int):
        self.world_size, self.t0, self.seen = world_size, time.time(), 0

    def add(self, images: int) -> None:
        self.seen += images * self.world_size

    def rate(self) -> float:
        now = time.time()
        rate = self.seen / max(now - self.t0, 1e-9)
        self.t0, self.seen = now, 0
        return rate


def _train(cfg: Config, info: DistInfo, log: RunLogger, resume: bool, chosen: Path | None = None,
           universal_from: Path | None = None) -> dict:
    trainer = Trainer(cfg, info, log)
    trainer.build(universal_from)
    resumed = trainer.restore(resume, chosen, universal_from)
    trainer.describe()
    log.begin(trainer.state.step)
    if not resumed:
        trainer.log_bound()
    return trainer.train(resumed)


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
