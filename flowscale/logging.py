"""Run logging: a progress bar on a terminal, plain lines otherwise, metrics.jsonl, and W&B.

Only the main rank logs; elsewhere every method is a no-op. The W&B run id is kept in
``<run_dir>/wandb_id.txt`` so a resumed or requeued job continues the same W&B run (rewound with
W&B's ``resume_from`` when it continues from an earlier step than it logged).

Metric names: each part of the code names what it measures (``bpd``, ``grad_norm``,
``recon_err/level_0``, ...); :data:`METRIC_NAMES` is the one table that puts each under its
section (``train/bpd``, ``optim/grad_norm``, ``health/recon_err/level_0``), and
:meth:`RunLogger.log` writes the sectioned names to metrics.jsonl and W&B alike (W&B draws one
panel section per prefix). Runs logged before the sections existed carry the short names:
:func:`read_metrics` reads both as the sectioned ones.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm import tqdm


METRIC_NAMES: dict[str, str] = {
    # train: the objective on the training batches, averaged over micro-batches and ranks
    "bpd": "train/bpd",
    "loss": "train/loss",  # bits/dim + the 1x1-conv penalty (logged only with optim.invconv_l2)
    "logdet_per_dim": "train/logdet_per_dim",
    "linear_bound_bpd": "train/linear_bound_bpd",  # train.bound_images: beside train/bpd, once
    "linear_bound_bpd_population": "train/linear_bound_bpd_population",
    # test: the test split, with EMA weights when there are any
    "test_bpd": "test/bpd",
    # optim
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "skipped_steps": "optim/skipped_steps",  # vetoed (non-finite) steps over the run, logged at each veto
    # health: numerics of the flow and of the replicas
    "recon_err": "health/recon_err",  # recon_err/level_i, recon_err/step_max
    "recon_unstable_steps": "health/recon_unstable_steps",
    "recon_stored_steps": "health/recon_stored_steps",
    "recon_stored_mib": "health/recon_stored_mib",
    "logdet_step": "health/logdet_step",  # logdet_step/level_i/{mean,min,max}, logdet_step/max_abs
    "ranks_agree": "health/ranks_agree",
    # data
    "epoch": "data/epoch",
    "data_skipped": "data/skipped_samples",  # data.bad_data=skip: samples lost to bad data, run-wide
    # perf
    "images_per_s": "perf/images_per_s",
    "mem_gb": "perf/mem_gb",
    # divergence: a rollback (train.on_divergence=rollback), logged at the step restored
    "rollback": "divergence/rollback",  # how many rollbacks so far
    "rollback_from_step": "divergence/from_step",
    "rollback_first_bad": "divergence/first_bad_step",
    "rollback_skipped_samples": "divergence/skipped_samples",
    "rollback_lr_factor": "divergence/lr_factor",
    # samples: the grid's path in metrics.jsonl, the image (captioned) in W&B
    "samples": "samples/grid",
}
"""What the code measures -> the name it is logged under (metrics.jsonl and W&B). A name with a
"/" in the code (``recon_err/level_0``) is logged under its first part's entry."""

SECTIONS = frozenset(name.split("/")[0] for name in METRIC_NAMES.values())


def metric_name(key: str) -> str:
    """The logged name of a metric the code names ``key`` (see :data:`METRIC_NAMES`); a name
    already logged (``train/bpd``) is returned as it is."""
    if key in METRIC_NAMES:
        return METRIC_NAMES[key]
    head, _, rest = key.partition("/")
    if head in SECTIONS:
        return key
    if rest and head in METRIC_NAMES:
        return f"{METRIC_NAMES[head]}/{rest}"
    raise KeyError(f"metric {key!r} has no section: add it to flowscale.logging.METRIC_NAMES")


class RunLogger:
    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, is_main: bool = True,
                 progress: bool = True, wandb_cfg=None, config_dict: dict | None = None):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        self._pending = (total_steps, progress, wandb_cfg, config_dict)
        self._rewind_to: int | None = None
        if start_step:
            self.begin(start_step)

    def begin(self, start_step: int = 0, run_info: dict | None = None) -> None:
        """Open the progress bar and the W&B run, once the run directory exists and the start
        step is known (messages before it go through :meth:`info` as plain lines). ``run_info``
        (parameter count, topology) joins the config in W&B's run config."""
        if self._pending is None:
            return
        total_steps, progress, wandb_cfg, config_dict = self._pending
        self._pending = None
        if self.is_main and progress and sys.stdout.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")
        if self.is_main and wandb_cfg is not None and wandb_cfg.mode != "disabled":
            self._wandb_args = (wandb_cfg, {**(config_dict or {}), **(run_info or {})})
            self.wandb = _init_wandb(self.path.parent, *self._wandb_args, self._rewind_to)
            self._offline_hint("W&B run offline")

    def info(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def log(self, step: int, metrics: dict, echo: bool = True) -> None:
        """Append ``{"step": step, **metrics}`` to metrics.jsonl and W&B, each name under its
        section (:func:`metric_name`), and show it."""
        if not self.is_main:
            return
        self.begin(step)
        metrics = {metric_name(k): v for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if echo:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            self.info(f"step {step}: {text}")

    @property
    def superseded_path(self) -> Path:
        return self.path.with_name("metrics.superseded.jsonl")

    def rewind(self, step: int) -> int:
        """Keep the records of steps <= ``step`` in metrics.jsonl and append the later ones (and a
        line torn by a crash) to metrics.superseded.jsonl; returns how many were moved. Called
        when training continues from ``step`` (-1: from scratch), before this run logs anything."""
        if not self.is_main or not self.path.is_file():
            return 0
        keep, moved = [], []
        for line in self.path.read_text().splitlines():
            try:
                (keep if json.loads(line).get("step", 0) <= step else moved).append(line)
            except json.JSONDecodeError:
                moved.append(line)
        if moved:
            self._rewind_to = step  # W&B too: the run continues from this step, a branch of the logged one
            with open(self.superseded_path, "a") as f:
                f.write("".join(m + "\n" for m in moved))
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, self.path)
            if self.wandb is not None:  # a rollback mid-run: the live W&B run is rewound the same way
                self.wandb.finish()
                self.wandb = _init_wandb(self.path.parent, *self._wandb_args, step)
        return len(moved)

    def advance(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def images(self, step: int, images: dict[str, tuple[str, str]]) -> None:
        """Log PNG files to W&B as captioned images: {metric: (path, caption)}, each metric under
        its section (:func:`metric_name`)."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({metric_name(k): wandb.Image(path, caption=caption)
                            for k, (path, caption) in images.items()}, step=step)

    def _offline_hint(self, what: str) -> None:
        """One line: where an offline W&B run is and the command that uploads it."""
        if self.wandb is not None and self.wandb.settings.mode == "offline":
            sync_dir = self.wandb.settings.sync_dir
            self.info(f"{what}: {sync_dir}; upload it with: wandb sync {sync_dir}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self._offline_hint("W&B run saved offline")
            self.wandb.finish()
            self.wandb = None


def _init_wandb(run_dir: Path, cfg, config_dict: dict, rewind_to: int | None = None):
    """Start or continue the run whose id is in wandb_id.txt. ``rewind_to``: the run continues from
    an earlier step than it logged (its later records were superseded): W&B's ``resume_from``
    rewinds it there, so the steps logged again replace the old ones instead of being dropped as
    out of order. Where it writes and how quietly are arguments (``dir``, ``settings``), not
    environment variables: the run's files go under ``run_dir/wandb``; W&B's artifact cache
    (WANDB_CACHE_DIR) is not used, as flowscale logs no artifacts."""
    import os
    import uuid

    import wandb

    quiet = {} if "WANDB_SILENT" in os.environ else {"silent": True}  # WANDB_SILENT=false: W&B's own output
    id_file = run_dir / "wandb_id.txt"
    known = id_file.is_file()
    run_id = id_file.read_text().strip() if known else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    where = ({"resume_from": f"{run_id}?_step={rewind_to}"} if known and rewind_to is not None
             else {"id": run_id, "resume": "allow"})
    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, mode=cfg.mode,
                      dir=str(run_dir), config=config_dict, settings=wandb.Settings(**quiet), **where)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl, under the sectioned names (:data:`METRIC_NAMES`):
    records written before the sections existed (short names such as ``bpd``, ``test_bpd``) read
    as the same names as today's; ``step`` stays ``step``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [{k if k == "step" else _current_name(k): v for k, v in json.loads(line).items()}
            for line in path.read_text().splitlines() if line.strip()]


def _current_name(key: str) -> str:
    try:
        return metric_name(key)
    except KeyError:  # a name no version logs any more (e.g. the old per-step "skipped": 0) stays as it was
        return key
