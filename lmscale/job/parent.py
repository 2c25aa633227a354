"""A rank dies with whatever started it: a rank whose launcher is gone (killed with ``kill -9``, by the OOM
killer, with the terminal or tmux session it ran in) has no one left to stop it, report it or pass it a signal,
and would go on writing checkpoints into a run directory that another start may already use.

Two mechanisms, the second a backstop for the first:

- Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``): the kernel sends SIGKILL when the parent exits.
  Launchers set it in the rank's process before exec (``die_with_parent``), where it cannot race the parent's
  death; a rank sets it on itself as it starts, for launchers that do not (torchrun, DeepSpeed's).
- a thread in the rank that checks its parent every ``CHECK_SECONDS`` and ends the process when it changed (the
  signal is Linux-only, and goes with the thread that forked, not the process).

Either way the rank saves nothing (a launcher's absence is not a preemption) and the next start resumes from
the last complete checkpoint, as after any crash. Its loader workers watch it the same way (PyTorch's
DataLoader workers end when their parent is gone).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
CHECK_SECONDS = 1.0
LAUNCHER_PID = "LMSCALE_LAUNCHER_PID"
"""Set by lmscale's launchers to their pid: a rank whose parent is already another process lost its launcher
before it could start watching it."""
EXIT_LAUNCHER_GONE = 1

try:
    # Loaded here, in the launcher: a child between fork and exec must not load libraries.
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
except OSError:
    _libc = None


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (a no-op where Linux's prctl is missing)."""
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def watch_launcher(rank: int) -> None:
    """In a rank: end at once, without saving, when the process that started it is gone."""
    die_with_parent()
    launcher = int(os.environ.get(LAUNCHER_PID) or os.getppid())

    def gone() -> bool:
        return os.getppid() != launcher

    def watching() -> None:
        while not gone():
            time.sleep(CHECK_SECONDS)
        print(f"lmscale: error: rank {rank}: its launcher (pid {launcher}) is gone; stopping without saving "
              "(the next start resumes from the last complete checkpoint)", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(EXIT_LAUNCHER_GONE)

    threading.Thread(target=watching, name="lmscale-launcher-watch", daemon=True).start()
