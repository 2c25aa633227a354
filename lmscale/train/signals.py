"""Preemption: SIGTERM / SIGUSR1 (Slurm's warning before the time limit) ask for a checkpoint and a clean stop.

The handler only sets a flag; the loop agrees on it across ranks at the next step boundary, so every rank
saves the same step.
"""

from __future__ import annotations

import signal
import types


class StopRequest:
    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signal_name: str | None = None
        self.signals = signals
        for sig in signals:
            signal.signal(sig, self._handle)

    def settle(self) -> None:
        """The checkpoint is saved and the rank is on its way out: ignore further stop signals. Under srun
        --kill-on-bad-exit the first rank to exit with code 3 makes Slurm send SIGTERM to the others, and the
        interpreter's exit restores the default action of handled signals (not of ignored ones): a rank
        terminated there would turn the job's "saved, requeue me" into a crash."""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
