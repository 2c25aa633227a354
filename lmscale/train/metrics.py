"""Where metrics go, on rank 0: the console, ``metrics.jsonl`` (the source of truth), and Weights & Biases.

``metrics.jsonl`` holds one JSON object per logged step (``step``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_s``, ``tokens_seen``, ...) and per validation pass (``val_loss``), plus ``event`` lines
(checkpoint, resume, skipped_step, rollback, preempted). A job rewrites the file from the step it starts at:
lines past it (written after the last checkpoint by a job that died) are dropped, so no step appears twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol, TextIO

from lmscale import run_layout
from lmscale.config import Config
from lmscale.errors import LmscaleError
from lmscale.job.exit_codes import SAVED_AND_STOPPED
from lmscale.progress import Progress

log = logging.getLogger("lmscale")


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def event(self, step: int, name: str, detail: dict[str, Any]) -> None: ...

    def close(self, exit_code: int = 0) -> None: ...


class ConsoleSink:
    """A progress bar with ETA on a terminal (steps, loss, tokens/s); plain log lines otherwise."""

    FIELDS = (
        ("loss", "{:.4f}"),
        ("mlm_accuracy", "{:.1%}"),
        ("val_loss", "{:.4f}"),
        ("val_mlm_accuracy", "{:.1%}"),
        ("accuracy", "{:.1%}"),
        ("val_accuracy", "{:.1%}"),
        ("val_macro_f1", "{:.3f}"),
        ("val_bleu", "{:.2f}"),
        ("val_chrf", "{:.2f}"),
        ("lr", "{:.2e}"),
        ("grad_norm", "{:.3f}"),
        ("tokens_per_s", "{:,.0f}"),
        ("mfu", "{:.1%}"),
        ("data_wait_frac", "{:.1%}"),
        ("memory_gb", "{:.2f}"),
    )

    def __init__(self, max_steps: int, start_step: int) -> None:
        self.last_step = self.start_step = start_step
        self.max_steps = max_steps
        self.started = time.perf_counter()
        self.progress = Progress("train", total=max_steps - start_step, unit="steps") if sys.stderr.isatty() else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.advance(
                step - self.last_step, loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:,.0f}"
            )
            self.last_step = step
            if "val_loss" not in metrics:
                return
        parts = [f"step {step}/{self.max_steps}"]
        for key, fmt in self.FIELDS:
            if metrics.get(key) is not None:
                parts.append(f"{key} " + fmt.format(metrics[key]))
        if self.progress is None and step > self.start_step:
            per_step = (time.perf_counter() - self.started) / (step - self.start_step)
            parts.append(f"eta {per_step * (self.max_steps - step):.0f}s")
        log.info(" | ".join(parts))

    def event(self, step: int, name: str, detail: dict[str, Any]) -> None:
        log.info("step %d: %s %s", step, name, json.dumps(detail))

    def close(self, exit_code: int = 0) -> None:
        if self.progress is not None:
            self.progress.close()


def open_step_log(path: Path, start_step: int) -> TextIO:
    """Open a JSONL file of step records for appending, first dropping records past ``start_step``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line).get("step", 0) <= start_step]
        path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a", buffering=1)


class JsonlSink:
    def __init__(self, path: Path, start_step: int) -> None:
        self.file = open_step_log(path, start_step)

    @staticmethod
    def _json(record: dict[str, Any]) -> str:
        # NaN and infinity are not JSON: a diverged value is written as null.
        return json.dumps(
            {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.file.write(self._json({"step": step, **metrics}) + "\n")

    def event(self, step: int, name: str, detail: dict[str, Any]) -> None:
        self.file.write(self._json({"step": step, "event": name, **detail}) + "\n")

    def close(self, exit_code: int = 0) -> None:
        self.file.close()


class TensorboardSink:
    """The metrics and events as TensorBoard scalars (events as ``events/<name>`` and their numeric details),
    one event file per job. A job that resumes at step s purges what an earlier one wrote past s (the
    writer's ``purge_step``, which TensorBoard applies on reading), so every step is there once."""

    def __init__(self, log_dir: Path, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LmscaleError("logging.tensorboard: needs the tensorboard package (pip install tensorboard)") from None
        # From step 1 on a new run too: a job that died before its first checkpoint left steps a new start
        # trains again.
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1)

    def _scalars(self, step: int, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(name, value, step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._scalars(step, metrics)

    def event(self, step: int, name: str, detail: dict[str, Any]) -> None:
        self._scalars(step, event_values(name, step, detail))

    def close(self, exit_code: int = 0) -> None:
        self.writer.close()


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


def event_values(name: str, step: int, detail: dict[str, Any]) -> dict[str, Any]:
    """An event as W&B columns: ``events/<name>`` (1), its step and its details."""
    return {f"events/{name}": 1, f"events/{name}/step": step, **{f"events/{name}/{k}": v for k, v in detail.items()}}


OFFLINE_STEPS = "lmscale_steps.json"
"""In the run's wandb/ directory: the highest step each offline log of the run holds, by directory name."""


def offline_steps_held(wandb_dir: Path, run_id: str, current: Path) -> int:
    """The highest step the run's earlier offline logs hold. A log whose job finished cleanly recorded it;
    any other (a killed job's: W&B may have written fewer steps than the job logged, or none) is read back with
    wandb's own reader, and the answer recorded."""
    ledger_path = wandb_dir / OFFLINE_STEPS
    ledger: dict[str, int] = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
    held = 0
    for log_dir in sorted(wandb_dir.glob(f"offline-run-*-{run_id}")):
        if log_dir == current:
            continue
        if log_dir.name not in ledger:
            ledger[log_dir.name] = max((history_steps(f) for f in log_dir.glob("run-*.wandb")), default=0)
            record_offline_steps(wandb_dir, log_dir.name, ledger[log_dir.name])
        held = max(held, ledger[log_dir.name])
    return held


def history_steps(log_file: Path) -> int:
    """The highest history step in one offline ``.wandb`` log (0 when it holds none or cannot be read)."""
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    steps = [0]
    for line in result.stdout.splitlines():
        if line.startswith('{"') and '"history"' in line:
            record = json.loads(line)
            if record.get("type") == "history":
                steps.append(int(record["history"]["item"].get("_step", 0)))
    return max(steps)


def record_offline_steps(wandb_dir: Path, log_name: str, step: int) -> None:
    path = wandb_dir / OFFLINE_STEPS
    ledger = json.loads(path.read_text()) if path.is_file() else {}
    ledger[log_name] = step
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(ledger, indent=1))
    tmp.replace(path)


class WandbSink:
    """A W&B run whose id lives in the run directory, so a resumed or requeued job continues it.

    The W&B step is the training step, and W&B must hold every step of the run once. A job starts by asking
    what W&B already holds (``held``): the steps of the run's earlier offline logs as wandb reads them back, or
    the step an online run resumes at. An earlier job that was killed may have logged steps W&B never
    wrote; those up to this job's first step are logged again from ``replay`` (the run's ``metrics.jsonl``
    records up to there). Steps past it are retrained to the same values (resume is exact) and logged when
    W&B lacks them. An event goes into the row of its step while that row is still open in this job,
    otherwise into the next row logged.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        run_id: str,
        extra_config: dict[str, Any],
        replay: list[dict[str, Any]] | None = None,
    ) -> None:
        import wandb

        w = cfg.logging.wandb
        self.mode = wandb_mode(w.mode)
        self.run_dir, self.run_id = run_dir, run_id
        self.open_step: int | None = None
        self.pending: dict[str, Any] = {}
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
        self.log_dir = Path(self.run.dir).parent
        if self.mode == "offline":
            held = offline_steps_held(run_dir / run_layout.WANDB, run_id, self.log_dir)
        else:
            held = max(self.run.starting_step - 1, 0)
        self.logged_through = held
        rows: dict[int, dict[str, Any]] = {}
        for record in replay or []:
            if record["step"] > held:
                row = rows.setdefault(record["step"], {})
                if "event" in record:
                    detail = {k: v for k, v in record.items() if k not in ("step", "event")}
                    row.update(event_values(record["event"], record["step"], detail))
                else:
                    row.update({k: v for k, v in record.items() if k != "step" and v is not None})
        for step in sorted(rows):
            self._write(step, rows[step])

    def _write(self, step: int, values: dict[str, Any]) -> None:
        self.run.log({**self.pending, **values}, step=step)
        self.pending = {}
        self.logged_through = self.open_step = step

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if step > self.logged_through or step == self.open_step:
            self._write(step, {k: v for k, v in metrics.items() if v is not None})

    def event(self, step: int, name: str, detail: dict[str, Any]) -> None:
        values = event_values(name, step, detail)
        if step > self.logged_through or step == self.open_step:
            self._write(step, values)
        else:
            self.pending.update(values)

    def close(self, exit_code: int = 0) -> None:
        if self.pending:
            # No row left to carry them (the job stopped before logging a new step): keep them in the summary.
            self.run.summary.update(self.pending)
        if exit_code in SAVED_AND_STOPPED:
            # Stopped on request after a checkpoint: the run goes on in the next job, it did not crash.
            self.run.mark_preempting()
            exit_code = 0
        self.run.finish(exit_code=exit_code)
        if self.mode == "offline":
            # Finished cleanly: W&B holds every step logged, and the next job need not read this log back.
            record_offline_steps(self.run_dir / run_layout.WANDB, self.log_dir.name, self.logged_through)
        if self.mode == "offline":
            # Every job of the run wrote its own offline directory; together they make up the W&B run.
            log.info(
                "W&B ran offline; upload with: wandb sync %s",
                self.run_dir / run_layout.WANDB / f"offline-run-*-{self.run_id}",
            )


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

    def close(self, exit_code: int = 0) -> None:
        for sink in self.sinks:
            sink.close(exit_code)
