"""``main(cfg)``: the one training loop where the pieces meet.

    shards -> loader -> (x uint8, y) -> objective: dequantise, flow, bits/dim (+ penalty)
           -> engine.train_step (DeepSpeed: micro-batches, veto, step) -> EMA -> log / eval / sample / checkpoint

The same function runs as a single process, under ``torchrun``, under the ``deepspeed``
launcher and under Slurm (rank and rendezvous come from the environment, or from the caller,
see :mod:`flowscale.distributed`). Resume is the default: if the run directory holds a complete
checkpoint, training continues from it with model, optimizer, LR schedule, EMA, data
position, step and every rank's RNG restored, so the continued run takes exactly the steps
an uninterrupted one would have.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from . import faults
from .analysis.audit import record_batch
from .build import build_training, pick_device
from .config import Config, to_dict
from .data import build_train_loader, eval_split, first_images
from .data.splits import resolve_split
from .divergence import Rollback, decide as decide_rollback
from .deepspeed_universal import check_version
from .distributed import (DistInfo, all_gather_objects, barrier, bit_identical_on_ranks, cleanup, init_distributed,
                          max_over_ranks, rank0_decides, topology)
from .engine import scale_lr, train_step
from .evaluate import PeriodicEval
from .health import HealthCheck
from .lock import release
from .threads import cpu_threads
from .logging import RunLogger
from .loss import sample_noise, training_loss
from .preemption import PreemptionGuard
from .restore import RestorePlan, plan_restore, prepare_run_dir
from .state import RankState


def main(cfg: Config, resume: bool = True, resume_from: str | Path | None = None,
         trust_checkpoint: bool = False, rendezvous: DistInfo | None = None) -> dict:
    """Train per ``cfg`` on this process's rank; returns the final metrics (bits/dim, step).

    ``resume``: continue from the newest complete checkpoint of ``train.run_dir`` (the default).
    ``resume_from``: continue from this checkpoint (a ``step_XXXXXXXX`` directory, or a run
    directory meaning its newest). DeepSpeed checkpoints are pickles, so one from outside
    ``train.run_dir`` is only loaded with ``trust_checkpoint=True``. (See :mod:`flowscale.restore`.)
    ``rendezvous``: this process's place in the job, from a launcher that knows it (``flowscale
    submit``); by default read from the environment (:func:`flowscale.distributed.dist_env`).
    """
    check_version()  # the DeepSpeed whose checkpoint layout flowscale.deepspeed_universal knows
    pick_device(cfg.train.device)  # a device that is not there is refused before anything starts
    info = init_distributed(cfg.engine.backend, cfg.train.device, rendezvous)
    config = to_dict(cfg)  # W&B's copy of the config (filled in below with the resolved data.streams)
    log = RunLogger(cfg.train.run_dir, cfg.train.steps, is_main=info.is_main, progress=cfg.train.progress,
                    wandb_cfg=cfg.wandb, config_dict=config)
    lock, threads_before = None, torch.get_num_threads()
    try:
        # Decided on every rank from the files alone, before anything is written.
        plan = plan_restore(cfg, info.world_size, resume=resume, resume_from=resume_from, trust=trust_checkpoint)
        threads, why = cpu_threads(cfg.engine.threads, cfg.data.num_workers)
        torch.set_num_threads(threads)  # several tasks on one node must not each take every core
        log.info(f"threads per process: {threads} ({why})")
        config["data"]["streams"] = cfg.data.streams  # resolved by plan_restore when it was null
        for line in plan.notes():
            log.info(line)
        for split in ("train", "test"):  # data unlike the config (channels, size) is refused before any write
            resolve_split(cfg.data, split)
        if info.is_main:
            lock = prepare_run_dir(plan, cfg, log)
        barrier()
        return _train(cfg, info, log, plan)
    finally:
        log.close()
        release(lock)
        cleanup()
        torch.set_num_threads(threads_before)


class Trainer:
    """Build (data, model, engine), restore, then :meth:`train`: the loop, one job per line."""

    def __init__(self, cfg: Config, info: DistInfo, log: RunLogger):
        self.cfg, self.info, self.log = cfg, info, log
        self.run_dir = Path(cfg.train.run_dir)
        self.device = pick_device(cfg.train.device, info.local_rank)

    # -- build and restore --------------------------------------------------------------------------

    def build(self, plan: RestorePlan) -> None:
        cfg, info = self.cfg, self.info
        self.loader = build_train_loader(cfg.data, rank=info.rank, world_size=info.world_size, seed=cfg.data.seed)
        self.test_x = eval_split(cfg.data, "test")  # streamed from its shards at every eval
        init = first_images(cfg.data, cfg.train.init_batch_size)  # ActNorm's data init; resume overwrites it
        if not cfg.data.streams:  # each rank initialises from its share (data.streams: all from all, see build)
            init = init.chunk(info.world_size)[info.rank] if len(init) >= info.world_size else init
        self.init_images = len(init) if cfg.data.streams else len(init) * info.world_size
        self.run = build_training(cfg, info, init, self.device,
                                  load_universal=plan.universal and cfg.engine.zero_stage > 0)
        self.loss_fn = training_loss(cfg, self.device, self.run.dtype)  # bits/dim (+ the 1x1-conv penalty)
        self.health = HealthCheck(cfg, self.run.dtype, self.run.layout["micro"], self.log)
        self.periodic_eval = PeriodicEval(cfg, self.run, self.test_x, info, self.log)

    def restore(self, plan: RestorePlan) -> bool:
        """Carry out the restore plan (every rank); True when a checkpoint was loaded."""
        self.state, resumed = plan.apply(self.run.engine, self.loader, self.run.ema, self.log,
                                         rank=self.info.rank, is_main=self.info.is_main)
        if not resumed:
            self.log.info(f"initialised {self.run.n_actnorm} ActNorm layers from {self.init_images} images")
        return resumed

    # -- the jobs of the loop -----------------------------------------------------------------------

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
        # "loss" is bits/dim itself unless a penalty is added; "skipped" is 0 here (vetoes log skipped_steps above).
        self.log.log(step, {k: v for k, v in metrics.items()
                            if k != "skipped" and (k != "loss" or self.cfg.optim.invconv_l2)})

    def diverged(self, metrics: dict) -> bool:
        """The step's flags, agreed over ranks (one all-reduce), into the divergence watch; on
        divergence abort (raises :class:`~flowscale.divergence.Diverged`) or roll back. True after a rollback."""
        d, state = self.cfg.divergence, self.state
        local = torch.tensor(state.divergence.flags(d, metrics, self.health.take()), device=self.device)
        why = state.divergence.observe(d, state.step, max_over_ranks(local).tolist(), metrics, state.bad_in_row,
                                       self.cfg.engine.max_bad_steps)
        if why is None:
            return False
        self.roll_back(*decide_rollback(self.cfg, state.divergence, state.step, why, ckpt_io.list_complete(self.run_dir),
                                        ckpt_io.written_healthy, self.run.layout["global"]))
        return True

    def roll_back(self, target: Path, record: Rollback) -> None:
        """Restore ``target`` (through :meth:`restore`), keep the data position (the diverged
        window's batches are not replayed) and record the rollback (in the watch's state, so in
        every later checkpoint, and in metrics.jsonl / W&B); the LR follows the record."""
        history = [*self.state.divergence.rollbacks, asdict(record)]
        position = self.loader.state_dict()  # past the diverged window
        if self.info.is_main:  # the diverged trajectory's checkpoints: kept aside, never "latest"
            ckpt_io.set_aside_newer(self.run_dir, record.to_step)
        barrier()
        self.restore(RestorePlan(run_dir=self.run_dir, world_size=self.info.world_size,
                                 zero_stage=self.cfg.engine.zero_stage, resume=True, checkpoint=target, chosen=True))
        self.loader.load_state_dict(position)
        self.state.divergence.rollbacks = history
        self.log.info(record.line(len(history), self.cfg.divergence.max_rollbacks))
        self.log.log(record.to_step, record.metrics(len(history)), echo=False)

    def save_due(self, last_save: float) -> bool:
        t, step = self.cfg.train, self.state.step
        due_time = t.checkpoint_minutes > 0 and time.time() - last_save > 60 * t.checkpoint_minutes
        return step % t.checkpoint_every == 0 or step == t.steps or rank0_decides(due_time)

    def save(self) -> Path:
        """A checkpoint of this step (collective: every rank writes its part)."""
        run = self.run
        return ckpt_io.save(run.engine, run_dir=self.run_dir, train_state=self.state,
                            rank_state=RankState.capture(self.loader, gather_streams=bool(self.cfg.data.streams)),
                            config=self.cfg, ema=run.ema.state_dict() if run.ema is not None else None,
                            keep_last=self.cfg.train.keep_last, rank=self.info.rank,
                            warn=lambda m: self.log.info(f"warning: {m}"))

    def hand_over(self, guard: PreemptionGuard, saved: bool) -> None:
        """Preempted: save this step (unless it is a checkpoint already), then requeue through
        submitit, or raise Preempted (exit code 75)."""
        path = ckpt_io.checkpoint_dir(self.run_dir) / ckpt_io.tag_for(self.state.step) if saved else self.save()
        self.log.info(f"preempted: saved step {self.state.step} in {path} after {guard.names()}; handing over")
        guard.hand_over(self.state.step, path)

    def describe(self) -> dict:
        """Say what runs where, in two lines; returns the parameter count and the topology (for the
        W&B run config). Collective (the topology is gathered from every rank)."""
        cfg, run, info = self.cfg, self.run, self.info
        layout, topo = run.layout, topology(info)
        self.log.info(f"model: {cfg.model.preset} L={cfg.model.levels} K={cfg.model.steps} "
                      f"width={cfg.model.widths or cfg.model.width} params={run.n_params / 1e6:.2f}M | "
                      f"ranks={info.world_size} ({topo['nodes']} node(s) x {topo['ranks_per_node']}) global "
                      f"batch={layout['global']} micro-batch={layout['micro']} x accum={layout['accum']} | "
                      f"ZeRO-{cfg.engine.zero_stage} {cfg.engine.precision} | device={self.device} run_dir={self.run_dir}")
        d, train_split = cfg.data, self.loader.split
        source = "demo photos (scikit-image)" if d.dataset == "demo" else "shards"
        self.log.info(f"data: {source}, train {train_split.manifest.num_samples} images ({train_split.where}), test "
                      f"{len(self.test_x)} images ({self.test_x.split.where}) | {d.channels}x{d.image_size}x"
                      f"{d.image_size} {d.n_bits}-bit")
        return {"params": run.n_params, "topology": {**topo, "zero_stage": cfg.engine.zero_stage,
                                                    "precision": cfg.engine.precision}}


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
        last_save, metrics = time.time(), {}
        saved_step = state.step if resumed else -1
        throughput = Throughput(self.info.world_size)
        with PreemptionGuard() as guard:  # SIGTERM/USR1/USR2 -> save at the next step boundary
            while state.step < cfg.train.steps:
                if guard.requested(self.device):  # a signal reached some rank: save this step on all, then stop
                    self.hand_over(guard, saved=saved_step == state.step)
                x, y = next(loader)  # uint8 [B, C, H, W]; labels int64 [B] when the shards have them, else None
                self.health(self.run.module, x, state.step)  # when due: reconstruction error, log-det statistics
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
                    state = self.state
                    saved_step = state.step
                    continue
                metrics.update(self.periodic_eval(state.step, final=state.step == cfg.train.steps))
                if self.save_due(last_save):
                    self.save()
                    saved_step, last_save = state.step, time.time()
        if self.info.world_size > 1:
            agree = ranks_agree(engine)
            self.log.log(state.step, {"ranks_agree": int(agree)})
            if not agree:
                warnings.warn("model replicas differ across ranks at the end of training")
        if not metrics:  # resumed a finished run: report its final state without training
            metrics = self.periodic_eval(state.step, final=True)
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


def _train(cfg: Config, info: DistInfo, log: RunLogger, plan: RestorePlan) -> dict:
    trainer = Trainer(cfg, info, log)
    trainer.build(plan)
    resumed = trainer.restore(plan)
    log.begin(trainer.state.step, run_info=trainer.describe())
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
    return bit_identical_on_ranks({k: v for k, v in state.items() if v.is_floating_point()})
