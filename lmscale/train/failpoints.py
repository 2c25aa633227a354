"""Crashes on purpose, for fault tests: ``LMSCALE_FAILPOINT=<point>:<tag>:<rank>`` SIGKILLs that rank when it
reaches that point of the save of that tag, as an OOM kill or a node loss would, but at a known instant. Unset (the
normal case) each point costs one dictionary lookup per save.

Points, in the order a save passes them (see :func:`lmscale.train.checkpoint.save`): ``save.begun`` (the ranks
agreed, the partial directory exists, nothing written), ``save.written`` (DeepSpeed's and the RNG files written),
``save.hashed`` (a rank's share hashed and fsynced), then on rank 0 only ``save.manifest`` (manifest written, not
renamed), ``save.renamed`` (the tag is in place, ``latest`` still names the previous one) and ``save.published``
(``latest`` replaced, old tags not yet rotated).
"""

from __future__ import annotations

import os
import signal

ENV = "LMSCALE_FAILPOINT"
POINTS = ("save.begun", "save.written", "save.hashed", "save.manifest", "save.renamed", "save.published")


def reach(point: str, tag: str, rank: int) -> None:
    if os.environ.get(ENV) == f"{point}:{tag}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)
