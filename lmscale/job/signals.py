"""Stop requests: SIGTERM / SIGUSR1 (a scheduler: Slurm's warning before the time limit, a preemption) and
SIGINT (Ctrl-C) ask for a checkpoint and a clean stop.

The handler only records the signal; the loop agrees on it across ranks at the next step boundary, so every
rank saves the same step and stops with the same exit code.
"""

from __future__ import annotations

import signal
import types

SCHEDULER_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_SIGNALS = (*SCHEDULER_SIGNALS, signal.SIGINT)

NO_STOP, INTERRUPT, PREEMPTION = 0, 1, 2
"""What a rank was asked, in increasing precedence: a scheduler's signal wins over Ctrl-C, as the job will be
requeued."""


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.kind = NO_STOP
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def settle(self) -> None:
        """The checkpoint is saved and the rank is on its way out: ignore further stop signals. Under srun
        --kill-on-bad-exit the first rank to exit with code 3 makes Slurm send SIGTERM to the others, and the
        interpreter's exit restores the default action of handled signals (not of ignored ones): a rank
        terminated there would turn the job's "saved, requeue me" into a crash."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.kind = max(self.kind, PREEMPTION if signum in SCHEDULER_SIGNALS else INTERRUPT)


class LauncherStopRequest(StopRequest):
    """The launcher's stop request while it starts (before it has ranks to pass a signal to): the first stop
    signal is kept for the ranks, the same signal again aborts the start (Ctrl-C twice, as in any command)."""

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.signal_name == signal.Signals(signum).name:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        super()._handle(signum, frame)
