"""Progress with ETA: a tqdm bar on a terminal, plain log lines otherwise (CI, Slurm output files)."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

log = logging.getLogger("lmscale")


class Progress:
    def __init__(self, description: str, total: int, unit: str = "it", log_every_s: float = 10.0) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.done = 0
        self.started = time.perf_counter()
        self.last_line = self.started
        self.log_every_s = log_every_s
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True)

    def advance(self, n: int = 1, **postfix: object) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last_line >= self.log_every_s or self.done == self.total:
            self.last_line = now
            elapsed = now - self.started
            eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            extra = "".join(f" {k}={v}" for k, v in postfix.items())
            log.info(
                "%s: %d/%d %s, %.0fs elapsed, ETA %.0fs%s",
                self.description,
                self.done,
                self.total,
                self.unit,
                elapsed,
                eta,
                extra,
            )

    def __enter__(self) -> Progress:
        return self

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.close()
