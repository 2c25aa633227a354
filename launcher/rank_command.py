"""The one command line that starts a rank, whichever launcher starts it (the node launcher, DeepSpeed's for a
hostfile, a Ray actor, an sbatch script, or the user with srun or torchrun)."""

from __future__ import annotations

import sys
from pathlib import Path

RANK_MODULE = "lmscale.train.main"


def rank_args(run_dir: Path, resume: str = "auto", lease: str | None = None) -> list[str]:
    """The arguments of ``RANK_MODULE``; ``--resume auto`` is its default, so it is left out. ``lease``: the id
    of the run directory's lease the launcher holds for the ranks (``lmscale.job.lease``); without it rank 0
    takes the lease itself."""
    return [str(run_dir), *(["--resume", resume] if resume != "auto" else []), *(["--lease", lease] if lease else [])]


def rank_argv(run_dir: Path, resume: str = "auto", python: str = sys.executable, lease: str | None = None) -> list[str]:
    return [python, "-m", RANK_MODULE, *rank_args(run_dir, resume, lease)]
