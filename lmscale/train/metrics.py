"""Where metrics go, on rank 0: the console, ``metrics.jsonl`` (the source of truth), and Weights & Biases.

``metrics.jsonl`` holds one JSON object per logged step (``step``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_s``, ``tokens_seen``, ...) and per validation pass (``val_loss``), plus ``event`` lines
(resume, checkpoint). On resume, lines past the resumed step (written after the last checkpoint by
the run that died) are dropped so the file never holds a step twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO

from lmscale.config import Config
from lmscale.progress import Progress

log = logging.getLogger("lmscale")


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def event(self, step: int, name: str, detail: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class ConsoleSink:
    """A progress bar with ETA on a terminal (steps, loss, tokens/s); plain log lines otherwise."""

    FIELDS = (
        ("loss", "{:.4f}"),
        ("val_loss", "{:.4f}"),
        ("lr", "{:.2e}"),
        ("grad_norm", "{:.3f}"),
        ("tokens_per_s", "{:,.0f}"),
        ("mfu", "{:.1%}"),
        ("data_wait_frac", "{:.1%}"),
        ("memory_gb", "{:.2f}"),
    )

    def __init__(self, max_steps: int, start_step: int) -> None:
        self.last_step = start_step
        self.progress = Progress("train", total=max_steps - start_step, unit="steps") if sys.stderr.isatty() else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.advance(
                step - self.last_step, loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:,.0f}"
            )
            self.last_step = step
            if "val_loss" not in metrics:
                return
        parts = [f"step {step}"]
        for key, fmt in self.FIELDS:
            if metrics.get(key) is not None:
                parts.append(f"{key} " + fmt.format(metrics[key]))
        log.info(" | ".join(parts))

    def event(self, step: int, name: str, detail: dict[str, Any]) -> None:
        log.info("step %d: %s %s", step, name, json.dumps(detail))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


def open_step_log(path: Path, resume_step: int | None) -> TextIO:
    """Open a JSONL file of step records for appending, first dropping records past ``resume_step``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if resume_step is not None and path.is_file():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line).get("step", 0) <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a", buffering=1)


class JsonlSink:
    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.file = open_step_log(path, resume_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")

    def event(self, step: int, name: str, detail: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, "event": name, **detail}) + "\n")

    def close(self) -> None:
        self.file.close()


def wandb_mode(requested: str) -> str:
    """online without an API key would fail at the first request: fall back to offline and say so."""
    if requested != "online":
        return requested
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        has_key = netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    if not has_key:
        log.warning("logging.wandb.mode is online but no W&B API key is set: logging offline")
        return "offline"
    return "online"


class WandbSink:
    """A W&B run whose id lives in the run directory, so a resumed or requeued job continues it."""

    def __init__(self, cfg: Config, run_dir: Path, run_id: str, extra_config: dict[str, Any]) -> None:
        import wandb

        w = cfg.logging.wandb
        self.mode = wandb_mode(w.mode)
        self.run = wandb.init(
            project=w.project,
            entity=w.entity,
            name=w.name or cfg.run.name,
            group=w.group,
            tags=w.tags or None,
            id=run_id,
            resume="allow",
            mode=self.mode,
            dir=str(run_dir),
            config={**cfg.to_dict(), **extra_config},
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        # The W&B step is the training step: a resumed run continues the axis, and W&B refuses to log a step
        # twice (steps a dead job logged after its last checkpoint are not re-logged).
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def event(self, step: int, name: str, detail: dict[str, Any]) -> None:
        self.run.log({f"events/{name}": 1, **{f"events/{name}/{k}": v for k, v in detail.items()}}, step=step)

    def close(self) -> None:
        self.run.finish()
        if self.mode == "offline":
            log.info("W&B ran offline; upload with: wandb sync %s", Path(self.run.dir).parent)


class MetricsLogger:
    """Fans metrics out to every sink; a no-op on ranks other than 0."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def event(self, step: int, name: str, **detail: Any) -> None:
        for sink in self.sinks:
            sink.event(step, name, detail)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
