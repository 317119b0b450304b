"""Save on preemption: a signal sets a flag, the loop saves at the next optimizer-step boundary.

Slurm warns a job before it ends it: ``SIGTERM`` at the time limit, at a preemption (then
``SIGKILL`` after KillWait / GraceTime) and on ``scancel``; ``SIGUSR2`` (or USR1) ``--signal``
seconds ahead when asked, which submitit turns into a requeue. A signal can arrive in the
middle of a step, or of a collective, so the handler only records it::

    signal -> flag (this rank)
    step boundary -> any_rank(flag): one all-reduce, every rank agrees on the same step
                  -> complete checkpoint of that step (collective) -> hand over:
                     submitit's own handler (requeue) when it had installed one, else
                     raise Preempted (``flowscale train`` exits with code 75, "resumable")

A second signal while the checkpoint is written is recorded and changes nothing: the save
finishes (it is the work that would otherwise be lost) and COMPLETE is written last as always.
After :class:`Preempted` is raised, signals whose previous action was the default (terminate)
stay recorded-only until the process exits: a late signal must not turn a saved, resumable
exit (75) into a kill. Python handlers (submitit's) are given back.
"""

from __future__ import annotations

import signal

from .distributed import any_rank

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the run stopped early and resumes from where it was


def _is_submitit_requeue(handler) -> bool:
    """True when ``handler`` is submitit's requeue handler: the ``checkpoint_and_try_requeue``
    method of a ``submitit.core.job_environment.SignalHandler``, which submitit installs for the
    USR signal of a job it started. submitit not importable: no handler of its can be installed."""
    try:
        from submitit.core.job_environment import SignalHandler
    except ImportError:
        return False
    return getattr(handler, "__func__", None) is SignalHandler.checkpoint_and_try_requeue and \
        isinstance(getattr(handler, "__self__", None), SignalHandler)


class Preempted(Exception):
    """The run was asked to stop by a signal and saved a checkpoint of the step it reached."""

    def __init__(self, signum: int, step: int, path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {path} is complete. "
                         f"Run the same command again to resume from it")


class PreemptionGuard:
    """Installs the handlers for the duration of a run (a context manager) and restores the
    previous ones after it. ``requested(device)`` is collective."""

    def __init__(self, signals=SIGNALS):
        self.signals = signals
        self.signums: list[int] = []
        """Every signal received, in order (a second one during the save is only recorded)."""
        self._previous: dict[int, object] = {}
        self._preempted = False

    @property
    def received(self) -> int | None:
        return self.signums[0] if self.signums else None

    def names(self) -> str:
        """The signals received so far, e.g. ``"SIGTERM, SIGUSR2"``."""
        return ", ".join(signal.Signals(s).name for s in self.signums) or "no signal"

    def _handle(self, signum, frame) -> None:
        self.signums.append(signum)

    def __enter__(self) -> "PreemptionGuard":
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc) -> bool:
        if self._preempted:  # on the way out with code 75: later signals are only recorded
            return False
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False

    def requested(self, device="cpu") -> bool:
        """Collective: True on every rank when any rank received a signal."""
        return any_rank(self.received is not None, device)

    def hand_over(self, step: int, path) -> None:
        """After the save: requeue through submitit's handler (the previous ones restored first)
        if one of the received signals had it (its USR2 handler: preemption sends SIGTERM, which
        submitit ignores, then USR2), else raise :class:`Preempted`, leaving ours where the
        previous action was the default. A USR2 that arrives after a SIGTERM-only save reaches
        submitit's handler directly."""
        previous = dict(self._previous)
        for signum in self.signums:
            handler = previous.get(signum)
            if _is_submitit_requeue(handler):
                self.__exit__()
                handler(signum, None)  # rank 0: checkpoint() + requeue, then sys.exit; other ranks return
                raise SystemExit(EXIT_PREEMPTED)
        # Give Python handlers (submitit's) back, so a USR2 after a SIGTERM-only save still
        # requeues; keep recording where the default action would kill the exiting process.
        for s, h in previous.items():
            if callable(h):
                signal.signal(s, h)
        self._preempted = True
        raise Preempted(self.received if self.received is not None else signal.SIGTERM, step, path)
