"""The exit codes a rank ends with, which every launcher (``lmscale train``, Slurm, Ray, local jobs) passes on or
acts on: requeue after a preemption, name the rank behind a failed collective; and how a process ends."""

import logging
import os
import re
import sys
from typing import NoReturn

import torch

EXIT_PREEMPTED = 3
"""Exit code of a run stopped by a signal after saving a checkpoint: requeue it to continue."""
EXIT_INTERRUPTED = 130
"""Exit code of a run stopped by Ctrl-C (SIGINT) after saving a checkpoint, as a shell reports an interrupted
command; `lmscale train` continues it."""
SAVED_AND_STOPPED = (EXIT_PREEMPTED, EXIT_INTERRUPTED)
EXIT_PEER_LOST = 4
"""Exit code of a rank whose collective failed: a peer died, hung past the timeout, or the network broke. The
cause is another rank's exit (launchers report that one); this rank's traceback is in its log."""
LAUNCHER_REPORTS_PEERS = "LMSCALE_LAUNCHER_REPORTS_PEERS"
"""Environment variable a launcher sets to 1 when it names the rank behind a failed collective itself: rank 0
then keeps its own line about the lost peer to its log."""


def collective_failure(err: BaseException) -> str | None:
    """The backend's reason when ``err`` is a failed collective (gloo raises plain RuntimeErrors that name its
    source files; NCCL's watchdog aborts the process instead), else None."""
    text = str(err).strip()
    if not (isinstance(err, torch.distributed.DistError) or (isinstance(err, RuntimeError) and "/gloo/" in text)):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(err).__name__)
    return first.split(". ")[0]


def exit_process(code: int) -> NoReturn:
    """End a rank or a launcher of ranks. One that finished or saved and stopped (0, 3, 130) has closed all it
    writes (checkpoints synced, W&B finished; logs and console are flushed here), so it skips the interpreter's
    teardown, which spends seconds in library finalizers (measured: 2-4 s per process on CPU ranks) that a job's
    end, a preemption's save-and-exit and every test's run would wait for. A rank whose peer is gone (4) skips
    it too: the broken process group's threads can abort the teardown. Any other code exits normally, so that
    the interpreter flushes what an error left open."""
    if code not in (0, *SAVED_AND_STOPPED, EXIT_PEER_LOST):
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
