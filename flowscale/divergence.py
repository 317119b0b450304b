"""Divergence: caught from signals the run already has, and what the loop does about it.

Each optimizer step ``step`` gives the watch four flags, from numbers the step computed anyway
(no extra forward; the health check adds its own only every ``memory.check_every`` steps):

    non-finite   the step was vetoed (NaN/inf loss or gradient)
    spike        bpd > mean + max(spike_sigmas * std, spike_margin)      (EMA mean/std of bpd)
    grad         grad_norm > grad_factor * EMA(grad_norm)
    health       recon_err/step_max > max_reconstruction_error, or
                 logdet_step/max_abs > max_logdet_per_dim                  (when a health check ran)

The flags are OR-ed over ranks (one all-reduce), so every rank keeps the same statistics and
takes the same decision. The run has diverged when ``patience`` flagged steps come in a row
(a health violation counts as ``patience`` at once), or when ``engine.max_bad_steps`` steps in
a row were vetoed. Flagged steps do not enter the statistics, and the spike and grad checks
arm only after ``warmup_steps`` clean steps (early training falls too fast for a running mean).

Which checkpoint is safe: the loss of step n is computed with the weights after step n - 1, so
a first flagged step F indicts the weights written by step F - 1. The rollback target is the
newest complete checkpoint that was written while no step was flagged (``healthy`` in its
client state) and whose step is at most F - 2.

:class:`DivergenceWatch` is plain data saved in the checkpoint's client state (through
:class:`flowscale.train.TrainState`), rollback history included, so a resumed run repeats the
same decisions. ``python -m flowscale.divergence RUN_DIR`` replays a run's metrics.jsonl (logged
with ``train.log_every=1``) through the watch and prints where it would have fired: the way to
measure false alarms and to tune the thresholds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

FLAGS = ("non-finite", "spike", "grad", "health")


@dataclass
class Rollback:
    """One rollback, as recorded in the checkpoint and in metrics.jsonl."""
    at_step: int
    """The step at which divergence was declared (the last step of the diverged window)."""
    to_step: int
    """The checkpoint restored: training continued from this step."""
    first_bad: int
    """The first flagged step of the streak that ended in the rollback."""
    reason: str
    """What was seen, in words."""
    skipped_batches: int
    """Global batches of data consumed by steps to_step+1 .. at_step and not replayed."""
    skipped_samples: int
    """skipped_batches x the global batch size."""
    lr_factor: float
    """LR multiplier applied to steps to_step+1 .. lr_until."""
    lr_until: int

    def line(self, number: int, max_rollbacks: int) -> str:
        """The log line of this run's ``number``-th rollback."""
        return (f"diverged at step {self.at_step}: {self.reason}; rollback {number}/{max_rollbacks}: restored "
                f"step_{self.to_step:08d}, skipping the data of steps {self.to_step + 1}-{self.at_step} "
                f"({self.skipped_samples} samples), LR x{self.lr_factor:g} until step {self.lr_until}")

    def metrics(self, number: int) -> dict:
        """The ``divergence/*`` record (logged at ``to_step``, where training continues)."""
        return {"rollback": number, "rollback_from_step": self.at_step, "rollback_first_bad": self.first_bad,
                "rollback_skipped_samples": self.skipped_samples, "rollback_lr_factor": self.lr_factor}


class Diverged(FloatingPointError):
    """The run diverged and was stopped (train.on_divergence=abort, or no rollback allowed)."""


ADVICE = ("lower optim.lr, raise optim.warmup_steps, or use bounded scales (model.scale_fn); to tune the watch "
          "see README: Divergence. No checkpoint was written from these weights.")


@dataclass
class DivergenceWatch:
    """The detector's state: running statistics, the current streak and the rollbacks so far."""
    seen: int = 0
    """Clean applied steps that entered the statistics."""
    bpd_mean: float = 0.0
    """EMA of bits/dim (decay divergence.ema_decay)."""
    bpd_var: float = 0.0
    """EMA of the squared deviation of bits/dim from bpd_mean."""
    grad_mean: float = 0.0
    """EMA of the gradient norm (before clipping)."""
    streak: int = 0
    """Flagged steps in a row, up to the last one."""
    first_bad: int = 0
    """The first step of the current streak (0: none)."""
    why: list[str] = field(default_factory=list)
    """What flagged the steps of the current streak (one entry per distinct reason)."""
    rollbacks: list[dict] = field(default_factory=list)
    """Every rollback of this run (:class:`Rollback` as a dict), oldest first."""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, list(v) if isinstance(v, (list, tuple)) else v)

    @property
    def healthy(self) -> bool:
        """No step of the current streak was flagged: weights saved now may be rolled back to."""
        return self.streak == 0

    def flags(self, cfg, metrics: dict, health: dict | None) -> list[float]:
        """This rank's flags (see :data:`FLAGS`) for a step's ``metrics`` (train_step's) and the
        health check's numbers when one ran before it; 1.0 = flagged."""
        if metrics.get("skipped"):
            return [1.0, 0.0, 0.0, float(self._health_bad(cfg, health))]
        armed = cfg.watch and self.seen >= cfg.warmup_steps
        bpd, grad = float(metrics["bpd"]), float(metrics.get("grad_norm", float("nan")))
        spike = armed and cfg.spike_margin > 0 and bpd > self.spike_threshold(cfg)
        blown = armed and cfg.grad_factor > 0 and math.isfinite(grad) and grad > cfg.grad_factor * self.grad_mean
        return [0.0, float(spike), float(blown), float(self._health_bad(cfg, health))]

    def spike_threshold(self, cfg) -> float:
        return self.bpd_mean + max(cfg.spike_sigmas * math.sqrt(max(self.bpd_var, 0.0)), cfg.spike_margin)

    @staticmethod
    def _health_bad(cfg, health: dict | None) -> bool:
        if not cfg.watch or not health:
            return False
        recon, logdet = health.get("recon_err/step_max"), health.get("logdet_step/max_abs")
        return bool((cfg.max_reconstruction_error > 0 and recon is not None and not recon <= cfg.max_reconstruction_error)
                    or (cfg.max_logdet_per_dim > 0 and logdet is not None and not logdet <= cfg.max_logdet_per_dim))

    def observe(self, cfg, step: int, flags: list[float], metrics: dict, bad_in_row: int,
                max_bad_steps: int) -> str | None:
        """Account for step ``step`` with the flags agreed over ranks; returns why the run has
        diverged (one phrase), or None."""
        flagged = [name for name, f in zip(FLAGS, flags) if f]
        if not cfg.watch:
            flagged = [n for n in flagged if n == "non-finite"]
        if not flagged:
            self.streak, self.first_bad, self.why = 0, 0, []
            self._update(cfg, float(metrics["bpd"]), float(metrics.get("grad_norm", float("nan"))))
            return None
        if self.streak == 0:
            self.first_bad = step
        self.streak += 1
        for name in flagged:
            if name not in self.why:
                self.why.append(name)
        if bad_in_row >= max_bad_steps:
            return f"non-finite loss or gradient in {bad_in_row} steps in a row"
        if cfg.watch and ("health" in flagged or self.streak >= cfg.patience):
            return self.describe(cfg, metrics)
        return None

    def describe(self, cfg, metrics: dict) -> str:
        parts = []
        for name in self.why:
            if name == "spike":
                parts.append(f"bits/dim {float(metrics.get('bpd', float('nan'))):.3f} above its running mean "
                             f"{self.bpd_mean:.3f} + margin (threshold {self.spike_threshold(cfg):.3f})")
            elif name == "grad":
                parts.append(f"gradient norm {float(metrics.get('grad_norm', float('nan'))):.3g} over "
                             f"{cfg.grad_factor:g} x its running mean {self.grad_mean:.3g}")
            elif name == "health":
                parts.append(f"reconstruction error or per-step log-det outside its band "
                             f"(divergence.max_reconstruction_error={cfg.max_reconstruction_error:g}, "
                             f"max_logdet_per_dim={cfg.max_logdet_per_dim:g})")
            else:
                parts.append("non-finite steps")
        return f"{' and '.join(parts)} in {self.streak} step(s) in a row since step {self.first_bad}"

    def _update(self, cfg, bpd: float, grad: float) -> None:
        """EMA mean and variance of bits/dim, EMA of the gradient norm (clean steps only)."""
        d = cfg.ema_decay
        if self.seen == 0:
            self.bpd_mean, self.bpd_var, self.grad_mean = bpd, 0.0, grad if math.isfinite(grad) else 0.0
        else:
            delta = bpd - self.bpd_mean
            self.bpd_mean += (1 - d) * delta
            self.bpd_var = d * (self.bpd_var + (1 - d) * delta * delta)
            if math.isfinite(grad):
                self.grad_mean = d * self.grad_mean + (1 - d) * grad
        self.seen += 1

    # -- rollbacks ---------------------------------------------------------------------------------

    def lr_factor(self, step: int) -> float:
        """The LR multiplier of optimizer step ``step`` (1-based): the product of the factors of
        the rollbacks whose cautious stretch covers it (two rollbacks to one checkpoint: squared)."""
        out = 1.0
        for r in self.rollbacks:
            if r["to_step"] < step <= r["lr_until"]:
                out *= r["lr_factor"]
        return out

    def refusal(self, cfg, to_step: int) -> str | None:
        """Why one more rollback (to ``to_step``) is not allowed, or None."""
        if len(self.rollbacks) >= cfg.max_rollbacks:
            return f"{len(self.rollbacks)} rollbacks already (divergence.max_rollbacks={cfg.max_rollbacks})"
        same = sum(r["to_step"] == to_step for r in self.rollbacks)
        if same >= cfg.max_rollbacks_per_window:
            return (f"{same} rollback(s) to step {to_step} already (divergence.max_rollbacks_per_window="
                    f"{cfg.max_rollbacks_per_window}): it diverges again past the same checkpoint")
        return None


def rollback_target(checkpoints: list, healthy_of, first_bad: int):
    """The newest of ``checkpoints`` (paths, oldest first, named step_XXXXXXXX) written while
    healthy (``healthy_of(path)``) at step <= first_bad - 2; None when there is none."""
    for path in reversed(checkpoints):
        step = int(path.name.split("_")[1])
        if step <= first_bad - 2 and healthy_of(path):
            return path
    return None


def decide(cfg, watch: DivergenceWatch, at: int, why: str, checkpoints: list, healthy_of,
           global_batch: int) -> tuple:
    """What divergence declared at step ``at`` (``why``: the watch's words) leads to under
    ``cfg`` (the run's Config): (the checkpoint to restore, its :class:`Rollback` record). Raises
    :class:`Diverged` in abort mode, when no checkpoint qualifies (:func:`rollback_target` over
    ``checkpoints``, oldest first, with ``healthy_of(path)``) or past the caps (:meth:`DivergenceWatch.refusal`).
    The same on every rank: it reads only the agreed watch and the files."""
    line = f"diverged at step {at}: {why}"
    if cfg.train.on_divergence == "abort":
        raise Diverged(f"{line} (last at step {at}); stopped (train.on_divergence=abort). {ADVICE}")
    target = rollback_target(checkpoints, healthy_of, watch.first_bad)
    to = int(target.name.split("_")[1]) if target is not None else -1
    refused = (f"no checkpoint written while healthy at step <= {watch.first_bad - 2} to roll back to "
               f"(train.checkpoint_every={cfg.train.checkpoint_every})" if target is None
               else watch.refusal(cfg.divergence, to))
    if refused:
        raise Diverged(f"{line} (last at step {at}); not rolled back: {refused}. {ADVICE}")
    d = cfg.divergence
    return target, Rollback(at_step=at, to_step=to, first_bad=watch.first_bad, reason=why, skipped_batches=at - to,
                            skipped_samples=(at - to) * global_batch, lr_factor=d.lr_factor, lr_until=to + d.lr_steps)


def rollback_summary(rollbacks: list[dict]) -> str:
    """The run summary's words for its rollbacks ("" when none): where, and the data skipped."""
    if not rollbacks:
        return ""
    each = ", ".join(f"step {r['at_step']} -> {r['to_step']} ({r['skipped_samples']} samples skipped)" for r in rollbacks)
    return f"; {len(rollbacks)} rollback{'s' if len(rollbacks) > 1 else ''}: {each}"


def replay(records: list[dict], cfg, max_bad_steps: int = 5) -> list[dict]:
    """Run the watch over a run's metrics records (:func:`flowscale.logging.read_metrics`, ``train.log_every=1``); returns the points where
    it would have declared divergence: [{"step", "why"}]. Each alarm restarts the streak (as a
    rollback would, without restoring anything), so every separate alarm is counted."""
    watch, health, bad_in_row, alarms = DivergenceWatch(), None, 0, []
    for r in records:
        if "health/recon_err/step_max" in r or "health/logdet_step/max_abs" in r:
            health = {k.partition("/")[2]: v for k, v in r.items() if k.startswith("health/")}  # before the next step
            continue
        if "train/bpd" in r:
            metrics = {"bpd": r["train/bpd"], "grad_norm": r.get("optim/grad_norm", float("nan")), "skipped": 0}
        elif "optim/skipped_steps" in r:
            metrics = {"skipped": 1}
        else:
            continue
        bad_in_row = bad_in_row + 1 if metrics["skipped"] else 0
        why = watch.observe(cfg, r["step"], watch.flags(cfg, metrics, health), metrics, bad_in_row, max_bad_steps)
        health = None
        if why:
            alarms.append({"step": r["step"], "why": why})
            watch.streak, watch.first_bad, watch.why, bad_in_row = 0, 0, [], 0
    return alarms


def main(argv: list[str] | None = None) -> int:
    """``python -m flowscale.divergence RUN_DIR [section.field=value ...]``: replay a run's
    metrics under its config (plus overrides, e.g. divergence.spike_margin=0.2) and print the
    alarms, the clean steps seen and the statistics at the end."""
    import argparse
    from pathlib import Path

    from .config import load_config
    from .logging import read_metrics

    p = argparse.ArgumentParser(prog="python -m flowscale.divergence", description=main.__doc__)
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*")
    ns = p.parse_args(argv)
    cfg = load_config(Path(ns.run_dir) / "config.yaml", ns.overrides)
    records = read_metrics(ns.run_dir)
    steps = sum("train/bpd" in r for r in records)
    alarms = replay(records, cfg.divergence, cfg.engine.max_bad_steps)
    print(f"{ns.run_dir}: {steps} logged steps, {len(alarms)} alarm(s)")
    for a in alarms:
        print(f"  step {a['step']}: {a['why']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
