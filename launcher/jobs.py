"""Submitted jobs: where they are recorded, how a job id or a run directory finds one, and their status.

Every submission appends a ``JobRecord`` to the run directory's ``jobs.jsonl`` and to this user's index
(``$LMSCALE_STATE_DIR/jobs.jsonl``, default ``~/.local/state/lmscale``), so ``lmscale status|logs|cancel``
accept a job id (looked up in the index) or a run directory (its latest job). Each attempt of a job appends
its exit code to the run directory's ``job_exits.jsonl``: the scheduler forgets finished jobs, the run
directory does not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher.preflight import Resources
from lmscale import run_layout
from lmscale.errors import LmscaleError, UsageError
from lmscale.job.exit_codes import EXIT_PREEMPTED

FOLLOW_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class JobRecord:
    backend: str
    """slurm, ray or local."""
    job_id: str
    run_dir: str
    name: str
    submitted_at: str
    address: str | None = None
    """The Ray dashboard the job was submitted to."""
    log: str | None = None
    """The job's output file (Slurm, local)."""
    pid: int | None = None
    """The job's process (local)."""


@dataclass(frozen=True)
class JobStatus:
    state: str
    """PENDING, RUNNING, SUCCEEDED, PREEMPTED (saved and stopped), FAILED, CANCELLED or UNKNOWN."""
    detail: str = ""
    """The scheduler's own words: its state, reason, exit code."""

    @property
    def finished(self) -> bool:
        return self.state not in ("PENDING", "RUNNING")


def state_dir() -> Path:
    default = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "lmscale"
    return Path(os.environ.get("LMSCALE_STATE_DIR") or default)


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _read(path: Path) -> list[JobRecord]:
    if not path.is_file():
        return []
    fields = {f.name for f in dataclasses.fields(JobRecord)}
    records = []
    for line in path.read_text().splitlines():
        try:
            raw = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash mid-write: the others still count
        records.append(JobRecord(**{k: v for k, v in raw.items() if k in fields}))
    return records


def record_job(job: JobRecord) -> None:
    _append(Path(job.run_dir) / run_layout.JOBS, dataclasses.asdict(job))
    _append(state_dir() / run_layout.JOBS, dataclasses.asdict(job))


def all_jobs() -> list[JobRecord]:
    return _read(state_dir() / run_layout.JOBS)


def latest_job(run_dir: Path) -> JobRecord | None:
    """The last job submitted for ``run_dir``."""
    jobs = _read(run_dir / run_layout.JOBS)
    return jobs[-1] if jobs else None


def find_job(ref: str) -> JobRecord:
    """The job ``ref`` names: a run directory (its latest job) or a job id this user submitted."""
    path = Path(ref)
    if path.is_dir():
        if (job := latest_job(path)) is None:
            raise UsageError(f"{ref}: no job was submitted for this run directory (no {run_layout.JOBS})")
        return job
    matches = [job for job in all_jobs() if job.job_id == ref]
    if not matches:
        raise UsageError(
            f"{ref}: not a run directory, nor a job id in {state_dir() / run_layout.JOBS} (`lmscale jobs` lists them)"
        )
    return matches[-1]


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def record_exit(run_dir: Path, job_id: str, attempt: int, exit_code: int, ended: bool) -> None:
    """What the job's own process writes when an attempt ends (the Slurm script writes the same line);
    ``ended``: the job itself was told to stop (cancelled, or its time was up), so it does not requeue."""
    record = {"job_id": job_id, "attempt": attempt, "exit_code": exit_code, "ended": ended, "at": timestamp()}
    _append(run_dir / run_layout.JOB_EXITS, record)


def last_exit(job: JobRecord) -> dict | None:
    path = Path(job.run_dir) / run_layout.JOB_EXITS
    if not path.is_file():
        return None
    exits = []
    for line in path.read_text().splitlines():
        try:
            exits.append(json.loads(line))
        except ValueError:
            continue
    mine = [e for e in exits if str(e.get("job_id")) == job.job_id]
    return mine[-1] if mine else None


def status_from_exit(job: JobRecord) -> JobStatus:
    """A finished job's status from the exit codes its attempts recorded."""
    last = last_exit(job)
    if last is None:
        return JobStatus("UNKNOWN", f"the scheduler no longer knows job {job.job_id}, and it recorded no exit")
    code = int(last["exit_code"])
    detail = f"attempt {last['attempt']} exited with code {code} at {last['at']}"
    if code == 0:
        return JobStatus("SUCCEEDED", detail)
    if last.get("ended"):
        return JobStatus("CANCELLED", detail + ", stopped by its scheduler or `lmscale cancel`")
    return JobStatus("PREEMPTED" if code == EXIT_PREEMPTED else "FAILED", detail)


def print_log(path: Path, job: JobRecord, status: Callable[[JobRecord], JobStatus], follow: bool) -> None:
    """Print a job's output file; with ``follow``, keep printing what it appends until the job ends."""
    position = 0
    while True:
        # Decided before reading, so that the last read takes everything the job wrote.
        finished = not follow or status(job).finished
        if path.is_file():
            with path.open() as f:
                f.seek(position)
                sys.stdout.write(f.read())
                position = f.tell()
            sys.stdout.flush()
        if finished:
            if not path.is_file():
                raise LmscaleError(f"{path}: no output yet (job {job.job_id} is {status(job).state})")
            return
        time.sleep(FOLLOW_POLL_SECONDS)


@dataclass(frozen=True)
class Submission:
    """Everything a backend needs to start the job."""

    run_dir: Path
    name: str
    resources: Resources
    max_requeues: int
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    address: str | None = None
    """Ray: the dashboard URL."""
    template: Path | None = None
    """Slurm: the job script template (default cluster/slurm/lmscale.sbatch)."""
