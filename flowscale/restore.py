"""The one restore path: every decision about continuing a run, and putting its state back.

Two steps, so that a launcher can ask the same questions without starting anything:

    plan = plan_restore(cfg, world_size, resume=..., resume_from=..., trust=...)
        files only (config.yaml and COMPLETE, never a pickle), every rank, before anything is
        written; ``flowscale submit`` calls it too, before queueing a job. Decides:
        - which checkpoint: the newest complete one of ``train.run_dir`` (:func:`flowscale.checkpoint.
          resolve_latest`), or the one ``--resume PATH`` names, refused when it is outside the run
          directory and not trusted (DeepSpeed's files are pickles);
        - what may change between its config and this one (:func:`resume_changes`: the model, the
          data stream and its order, the precision and, without ``data.streams``, the number of
          ranks and workers may not; the rest is listed and printed);
        - whether the optimizer state goes through DeepSpeed's universal checkpoint (another ZeRO
          layout: :func:`needs_universal`) and which rank file each rank reads (:func:`rank_file`).
    lock = prepare_run_dir(plan, cfg, log)       main rank: lock, set newer checkpoints aside,
                                                 remove partial ones, refuse --no-resume on a run
    state, resumed = plan.apply(engine, loader, ema, log, rank=, is_main=)
        every rank, after the engine is built: converts to the universal layout (once, collective),
        loads DeepSpeed's state (the newest loadable checkpoint, falling back past an unreadable one,
        unless one was chosen), then rewinds the loader position, RNG streams, EMA, the step
        counters, metrics.jsonl and the batch audit to the checkpoint's step.

The DeepSpeed-version-specific file rewriting lives in :mod:`flowscale.deepspeed_universal`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint as ckpt_io
from .analysis.audit import BATCHES, rewind_batches
from .config import Config, to_dict, to_yaml
from .deepspeed_universal import to_universal
from .distributed import any_rank
from .lock import acquire, release
from .state import TrainState


# What a resumed run may not change: the model, what the data stream and its order are made
# of, and what DeepSpeed's files are laid out for. Everything else (optimizer, schedule,
# memory mode, logging, steps, eval data) may change, and the change is printed.
FIXED_ON_RESUME = ("model.", "data.dataset", "data.train_manifest", "data.train_shards", "data.image_size",
                   "data.channels", "data.n_bits", "data.batch_size", "data.train_size", "data.seed",
                   "data.random_flip", "data.shuffle_buffer", "data.streams", "train.seed",
                   "engine.precision")
# Without data.streams the order also follows the loader workers and the ranks.
FIXED_WITHOUT_STREAMS = ("data.num_workers",)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def saved_config(ckpt: Path) -> dict:
    """The config ``ckpt`` was written with (its config.yaml), flattened to dotted fields."""
    import yaml

    return _flat(yaml.safe_load((ckpt / "config.yaml").read_text()))


def written_by(ckpt: Path) -> int:
    """The number of ranks that wrote a complete checkpoint."""
    return int(json.loads((ckpt / "COMPLETE").read_text())["world_size"])


def resume_changes(ckpt: Path, config: dict, world_size: int) -> list[str]:
    """Check that a run configured by ``config`` (the resolved tree, as a dict) on
    ``world_size`` ranks can continue from ``ckpt``; returns the fields that changed, as
    ``"field old -> new"``. Raises ConfigError naming the first field that may not change, and
    the way out. Reads only config.yaml and COMPLETE (no pickles): every rank can call it
    before anything is written."""
    from .config import ConfigError

    saved = saved_config(ckpt)
    now = _flat(config)

    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    # Fields added to flowscale after the checkpoint was written are not in its config: skipped.
    diffs = [(f, saved[f], now[f]) for f in sorted(set(saved) & set(now)) if norm(saved[f]) != norm(now[f])]
    weights = ckpt / "model.safetensors"
    fixed = FIXED_ON_RESUME + (() if now.get("data.streams") else FIXED_WITHOUT_STREAMS)
    for name, old, new in diffs:
        if name.startswith(fixed):
            raise ConfigError(f"config field '{name}': {ckpt} was written with {old!r}, this run has {new!r}, and it "
                              f"cannot change on resume: resume with {old!r}, or start a new train.run_dir (its "
                              f"weights: {weights}). Nothing was written")
    by = written_by(ckpt)
    if by != world_size and not now.get("data.streams"):
        raise ConfigError(f"{ckpt} was written by {by} ranks and this run has {world_size}; without "
                          f"data.streams the data position is per rank: resume on {by} ranks, or start a new "
                          f"train.run_dir (its weights: {weights}). Nothing was written")
    (s0, s1) = (saved.get("engine.zero_stage", 0), now.get("engine.zero_stage", 0))
    if (s0 == 0) != (s1 == 0) and now.get("engine.precision") != "fp32":
        raise ConfigError(f"config field 'engine.zero_stage': {ckpt} was written with ZeRO-{s0}, this run has "
                          f"ZeRO-{s1}, and with engine.precision={now.get('engine.precision')!r} optimizer state moves "
                          f"between ZeRO-1/2/3 layouts only, not to or from ZeRO-0 (fp32 runs may cross). Resume with "
                          f"{'ZeRO-0' if s0 == 0 else 'ZeRO-1, 2 or 3'}, or start a new train.run_dir (its weights: "
                          f"{weights}). Nothing was written")
    if s1 == 3 and (by != world_size or s0 != s1) and now.get("optim.name") == "adamax":
        raise ConfigError(f"config field 'engine.zero_stage': DeepSpeed's universal checkpoint restores only Adam's "
                          f"moments into ZeRO-3, and this run uses optim.name='adamax': resume {ckpt} with ZeRO-1 or 2 "
                          f"on {world_size} rank(s), or with ZeRO-{s0} on {by}. Nothing was written")
    return [f"{name} {old!r} -> {new!r}" for name, old, new in diffs if name != "train.run_dir"]


def needs_universal(ckpt: Path, zero_stage: int, world_size: int) -> bool:
    """Whether resuming ``ckpt`` with ``zero_stage`` on ``world_size`` ranks goes through a
    universal checkpoint: optimizer state on another layout, except ZeRO-0 to ZeRO-0 (whole)."""
    saved = saved_stage(ckpt)
    return not saved == zero_stage == 0 and (saved != zero_stage or written_by(ckpt) != world_size)


def saved_stage(ckpt: Path) -> int:
    """The ZeRO stage ``ckpt`` was written with (its config.yaml)."""
    return saved_config(ckpt).get("engine.zero_stage", 0)


def rank_file(ckpt: Path, rank: int, world_size: int) -> Path:
    """The rank file ``rank`` reads: its own, or rank 0's when ``ckpt`` was written by another number
    of ranks (data.streams, which :func:`resume_changes` requires then: rank 0's holds every stream's place)."""
    return ckpt / f"rank_{rank if written_by(ckpt) == world_size else 0:05d}.pt"


@dataclass
class RestorePlan:
    """Where a run continues from and how, decided from the files alone (:func:`plan_restore`)."""
    run_dir: Path
    """train.run_dir."""
    world_size: int
    """Ranks of this run."""
    zero_stage: int
    """engine.zero_stage of this run."""
    resume: bool
    """Whether an existing run may be continued (False: --no-resume, a run directory with checkpoints is refused)."""
    checkpoint: Path | None = None
    """The checkpoint to continue from; None: start from scratch."""
    chosen: bool = False
    """``checkpoint`` was named by --resume PATH: no fallback to another one, this run's newer ones are set aside."""
    changes: list[str] = field(default_factory=list)
    """Config fields that differ from the checkpoint's, as ``"field old -> new"`` (all allowed)."""
    written_by: int | None = None
    """Ranks that wrote ``checkpoint``."""
    saved_stage: int | None = None
    """The ZeRO stage ``checkpoint`` was written with."""
    universal: bool = False
    """The optimizer state moves to another layout through DeepSpeed's universal checkpoint."""
    streams_note: str = ""
    """How ``data.streams=null`` was resolved (the checkpoint's record, or a new run's choice); empty when given."""

    @property
    def differences(self) -> list[str]:
        """Everything that differs from the checkpoint: the number of ranks, then the config fields."""
        ranks = [f"ranks {self.written_by} -> {self.world_size}"] if self.written_by not in (None, self.world_size) else []
        return ranks + self.changes

    def notes(self) -> list[str]:
        """The lines a resuming run prints about what changed."""
        out = [self.streams_note] if self.streams_note else []
        if self.changes:
            out.append(f"resuming {self.checkpoint.name} with changed settings: {', '.join(self.changes)}")
        if self.checkpoint is not None and (self.written_by != self.world_size or self.universal):
            out.append(f"resuming {self.checkpoint.name} written by {self.written_by} rank(s) (ZeRO-{self.saved_stage}) "
                       f"on {self.world_size} (ZeRO-{self.zero_stage}): optimizer state "
                       f"{'resharded (universal checkpoint)' if self.universal else 'whole (ZeRO-0)'}, "
                       f"every data stream's position kept")
        return out

    def __str__(self) -> str:
        if self.checkpoint is None:
            return f"{self.run_dir}: starts from scratch" + ("" if self.resume else " (--no-resume)")
        how = "chosen by --resume" if self.chosen else "the newest complete one"
        return "; ".join([f"{self.run_dir}: continues from {self.checkpoint} ({how})", *self.notes()])

    def apply(self, engine, loader, ema, log, *, rank: int, is_main: bool) -> tuple[TrainState, bool]:
        """Collective: carry the plan out on a built engine (every rank). Returns (the loop's
        counters, whether a checkpoint was loaded). Model, optimizer and LR schedule go into
        ``engine``, the data position into ``loader``, the EMA weights into ``ema`` (or None),
        this rank's RNG streams into the process; records past the step training continues from
        (a crash after the last checkpoint, or an older checkpoint chosen) are moved aside, so
        every step appears once in metrics.jsonl and in the batch audit."""
        found = self._load(engine, rank, log)
        state = found.train_state if found is not None else TrainState()
        if found is not None:
            found.rank_state.apply(loader)
            if ema is not None:
                ema.load_state_dict(ckpt_io.load_ema(found.path, found.client))
            log.info(f"resumed from {found.path} at step {state.step}")
        step = state.step if found is not None else -1
        moved = log.rewind(step)
        if moved:
            log.info(f"{moved} metrics records after step {step} (not in the checkpoint) moved to "
                     f"{log.superseded_path.name}")
        if is_main and (self.run_dir / BATCHES).is_dir():  # train.record_batches: the same for the batch records
            rewind_batches(self.run_dir, step)
        return state, found is not None

    def _load(self, engine, rank: int, log) -> ckpt_io.Loaded | None:
        if self.universal:  # ZeRO state on another layout: DeepSpeed's universal checkpoint, made once
            saved = saved_config(self.checkpoint)
            _, took = to_universal(self.checkpoint, rank, self.saved_stage, saved.get("optim.name") == "adamax")
            if took:
                log.info(f"converted {self.checkpoint.name} to DeepSpeed's universal checkpoint in {took:.1f} s")
            return ckpt_io.load(engine, self.checkpoint, universal=True,
                                rank_file=rank_file(self.checkpoint, rank, self.world_size))
        if self.chosen:  # picked by the user: no silent fallback to another one
            return ckpt_io.load(engine, self.checkpoint, rank_file=rank_file(self.checkpoint, rank, self.world_size))
        if not self.resume:
            return None
        # The newest loadable complete checkpoint; an unreadable one falls back to the previous with a
        # warning. Every rank decides the same way (the failure is all-reduced).
        for ckpt in reversed(ckpt_io.list_complete(self.run_dir)):
            found, err = None, ""
            try:
                found = ckpt_io.load(engine, ckpt, rank_file=rank_file(ckpt, rank, self.world_size))
            except Exception as e:  # corrupt or truncated files
                err = f"{type(e).__name__}: {e}"
            if not any_rank(found is None):
                return found
            warnings.warn(f"checkpoint {ckpt} is unreadable ({err or 'on another rank'}); falling back to an older one")
        return None


def canonical_streams(data_cfg, ckpt: Path | None, world_size: int) -> tuple[int, str]:
    """data.streams=null resolved, and why (one line): the value ``ckpt`` was written with when
    resuming (0 for a checkpoint from before the field existed: it ran with the per-rank
    order, which it keeps), else the new run's choice by
    :func:`flowscale.data.order.choose_streams` from the global batch, the training shards and
    this topology. The caller writes it into the config, so config.yaml records it."""
    from .data.order import choose_streams
    from .data.splits import resolve_split

    if ckpt is not None:
        recorded = saved_config(ckpt).get("data.streams")
        if not recorded:
            return 0, (f"recorded by {ckpt.name} ({'0' if recorded == 0 else 'not recorded: a run from before it'}): "
                       f"the per-rank order of its ranks x workers, kept")
        return int(recorded), (f"recorded by {ckpt.name} when the run was created; any ranks x workers dividing "
                               f"{recorded} can resume it")
    split = resolve_split(data_cfg, "train")
    S, why = choose_streams(data_cfg.batch_size, split.counts, world_size, data_cfg.num_workers)
    return S, f"chosen for this new run: {why}"


def plan_restore(cfg: Config, world_size: int, *, resume: bool = True, resume_from: str | Path | None = None,
                 trust: bool = False) -> RestorePlan:
    """Decide, from the files alone, where a run of ``cfg`` on ``world_size`` ranks continues from.

    ``resume``: continue from the newest complete checkpoint of ``train.run_dir`` (the default).
    ``resume_from``: continue from this checkpoint (a ``step_XXXXXXXX`` directory, or a run
    directory meaning its newest); one from outside ``train.run_dir`` only with ``trust``.
    Raises, before anything is written, for a contradiction, an untrusted checkpoint or a change
    the checkpoint cannot honour (ConfigError naming the field)."""
    run_dir = Path(cfg.train.run_dir)
    plan = RestorePlan(run_dir=run_dir, world_size=world_size, zero_stage=cfg.engine.zero_stage, resume=resume)
    if resume_from is not None:
        if not resume:
            raise ValueError("--resume PATH and --no-resume contradict each other; give one of them")
        plan.checkpoint, plan.chosen = ckpt_io.resolve(resume_from).resolve(), True
        if run_dir.resolve() not in plan.checkpoint.parents and not trust:
            raise PermissionError(
                f"{plan.checkpoint} is a DeepSpeed checkpoint from outside train.run_dir ({run_dir}); its files are "
                f"pickles, and unpickling runs code. Pass --trust-checkpoint if you trust whoever wrote it, or use its "
                f"model.safetensors (flowscale sample/eval read only safetensors). Nothing was written.")
    elif resume:
        plan.checkpoint = ckpt_io.resolve_latest(run_dir)
    if cfg.data.streams is None:  # a new run chooses, a resumed one takes its record; config.yaml keeps it
        cfg.data.streams, why = canonical_streams(cfg.data, plan.checkpoint, world_size)
        plan.streams_note = f"data.streams={cfg.data.streams}: {why}"
    if plan.checkpoint is not None:
        plan.changes = resume_changes(plan.checkpoint, to_dict(cfg), world_size)
        plan.written_by, plan.saved_stage = written_by(plan.checkpoint), saved_stage(plan.checkpoint)
        plan.universal = needs_universal(plan.checkpoint, cfg.engine.zero_stage, world_size)
    return plan


def prepare_run_dir(plan: RestorePlan, cfg: Config, log):
    """Main rank only, before any rank writes: lock ``train.run_dir``, set this run's checkpoints
    newer than a chosen one aside, remove what an interrupted save left, refuse an existing run
    under --no-resume, and write the resolved config.yaml. Returns the lock (release it at the end)."""
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = acquire(run_dir, log=log.info)
    if plan.chosen:
        moved = ckpt_io.set_aside_newer(run_dir, int(plan.checkpoint.name.split("_")[1]))
        if moved is not None:  # kept, out of resolve_latest's sight, so a later restart continues this branch
            log.info(f"resuming from {plan.checkpoint}: this run's newer checkpoints were moved to {moved}")
    gone = ckpt_io.remove_partial(run_dir)
    if gone:  # a save or prune that a crash interrupted: never resumable, only taking space
        log.info(f"removed {len(gone)} unfinished checkpoint director{'y' if len(gone) == 1 else 'ies'} "
                 f"left by an interrupted run: {', '.join(gone)}")
    latest = ckpt_io.resolve_latest(run_dir)
    if latest is not None and not plan.resume:
        release(lock)
        raise FileExistsError(f"{run_dir} already holds checkpoints ({latest.name}); resume (the default), "
                              f"or choose a new train.run_dir; nothing was overwritten")
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return lock
