"""What a checkpoint carries besides DeepSpeed's files (model, optimizer, LR schedule):

    TrainState   client.pt        the loop's counters (step, vetoed steps, the divergence watch, healthy), with the config
    RankState    rank_XXXXX.pt    one rank's data-loader position and RNG streams

Both go through :func:`flowscale.checkpoint.save` / :func:`~flowscale.checkpoint.load` by name,
and :mod:`flowscale.restore` puts them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .distributed import all_gather_objects
from .divergence import DivergenceWatch
from .seeds import rng_state, set_rng_state


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


@dataclass
class RankState:
    """One rank's state that DeepSpeed does not keep (rank_XXXXX.pt)."""
    loader: dict
    """The training loader's ``state_dict()``: epoch, position of every stream or worker, bad-data ledger."""
    rng: dict
    """Every RNG this rank draws from (:func:`flowscale.seeds.rng_state`)."""

    @classmethod
    def capture(cls, loader, gather_streams: bool) -> "RankState":
        """This rank's state now. ``gather_streams`` (data.streams; collective, every rank calls it):
        every rank's file then holds every stream's place, so any number of ranks can resume."""
        if gather_streams:
            loader.adopt_positions(all_gather_objects(loader.stream_positions()))
        return cls(loader=loader.state_dict(), rng=rng_state())

    def apply(self, loader) -> None:
        """Put the loader position and RNG streams back."""
        loader.load_state_dict(self.loader)
        set_rng_state(self.rng)

    def state_dict(self) -> dict:
        return {"loader": self.loader, "rng": self.rng}

    @classmethod
    def from_state_dict(cls, d: dict) -> "RankState":
        return cls(loader=d["loader"], rng=d["rng"])
