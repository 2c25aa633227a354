"""Stop requests in-process: what a rank and a starting launcher do with SIGTERM, SIGUSR1 and SIGINT."""

import os
import signal

import pytest

from lmscale.job.signals import INTERRUPT, NO_STOP, PREEMPTION, LauncherStopRequest, StopRequest


@pytest.fixture(autouse=True)
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_scheduler_signal_outranks_ctrl_c_and_repeats_are_harmless() -> None:
    stop = StopRequest()
    assert stop.kind == NO_STOP
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.kind == INTERRUPT and stop.signal_name == "SIGINT"
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # the launcher's copy and the process group's: still one request
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.kind == PREEMPTION


def test_a_starting_launcher_keeps_the_first_signal_and_aborts_on_the_same_again() -> None:
    early = LauncherStopRequest()
    os.kill(os.getpid(), signal.SIGINT)
    assert early.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    early = LauncherStopRequest()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # another signal is kept too (Slurm's warning, then its SIGTERM)
    assert early.signal_name == "SIGTERM" and early.kind == PREEMPTION
    with pytest.raises(SystemExit) as stopped:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.code == 128 + signal.SIGTERM
