"""The local backend of ``lmscale submit``: the job runs on this machine in the background, detached from the
terminal, with the same job commands (``lmscale status|logs|cancel``) and the same requeue rule as on a
cluster.

The job is this module run as a process (``python -m launcher.local_jobs RUN_DIR ...``): it starts the
node's ranks as ``lmscale train`` does and, when they stop with code 3 after a checkpoint because they were
signalled directly (a preemption), starts them again from that checkpoint, up to ``--max-requeues`` times.
A signal to the job itself (``lmscale cancel``) is passed to the ranks, which save, and ends the job.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil

from launcher.jobs import JobRecord, JobStatus, Submission, print_log, record_exit, status_from_exit, timestamp
from launcher.nodes import NodeSpec, cpu_rank_env, open_store, run_node
from launcher.train import gpu_count
from lmscale import run_layout
from lmscale.config import load_config
from lmscale.errors import LmscaleError
from lmscale.job import lease as run_dir_lease
from lmscale.job.exit_codes import EXIT_PREEMPTED


def job_argv(sub: Submission, job_id: str) -> list[str]:
    return [sys.executable, "-m", "launcher.local_jobs", str(sub.run_dir), "--nproc", str(sub.resources.nproc),
            "--max-requeues", str(sub.max_requeues), "--job-id", job_id]  # fmt: skip


def render(sub: Submission) -> str:
    log = sub.run_dir / run_layout.LOGS / "local-JOB_ID.out"
    return f"# runs in the background, output to {log}\n{shlex.join(job_argv(sub, 'JOB_ID'))}"


def submit(sub: Submission) -> JobRecord:
    if sub.resources.nodes != 1:
        raise LmscaleError(f"--nodes {sub.resources.nodes}: the local backend runs on this machine only (1 node)")
    job_id = f"local-{uuid.uuid4().hex[:8]}"
    log = sub.run_dir / run_layout.LOGS / f"{job_id}.out"
    log.parent.mkdir(exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(job_argv(sub, job_id), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    return JobRecord("local", job_id, str(sub.run_dir), sub.name, timestamp(), log=str(log), pid=process.pid)


def _process(job: JobRecord) -> psutil.Process | None:
    """The job's process, if it still runs (a recycled pid runs something else)."""
    try:
        process = psutil.Process(job.pid or -1)
        return process if job.job_id in process.cmdline() else None
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def status(job: JobRecord) -> JobStatus:
    process = _process(job)
    if process is not None and process.status() != psutil.STATUS_ZOMBIE:
        return JobStatus("RUNNING", f"pid {job.pid}")
    return status_from_exit(job)


def logs(job: JobRecord, follow: bool) -> None:
    print_log(Path(job.log or ""), job, status, follow)


def cancel(job: JobRecord) -> None:
    process = _process(job)
    if process is None:
        raise LmscaleError(f"job {job.job_id} is not running ({status(job).state})")
    process.send_signal(signal.SIGTERM)


def run_job(run_dir: Path, nproc: int, max_requeues: int, job_id: str) -> int:
    timeout = load_config(run_dir / run_layout.CONFIG).trainer.collective_timeout_minutes
    env = dict(os.environ) if gpu_count() else cpu_rank_env(nproc)
    attempt = 0
    # The job holds the run directory over all its attempts.
    with run_dir_lease.claim(run_dir, "local job", job_id).keep() as lease:
        while True:
            print(f"lmscale: job {job_id} attempt {attempt}: {nproc} ranks on this machine", flush=True)
            spec = NodeSpec(1, 0, nproc, "127.0.0.1", None, timeout)
            forwarded: set[int] = set()
            code = run_node(spec, open_store(spec), run_dir, "auto", env, forwarded, lease_id=lease.id)
            record_exit(run_dir, job_id, attempt, code, ended=bool(forwarded))
            if code != EXIT_PREEMPTED or forwarded or attempt >= max_requeues:
                return code
            attempt += 1
            print(f"lmscale: the ranks saved after a preemption signal; restarting ({attempt} of {max_requeues})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--max-requeues", type=int, default=0)
    parser.add_argument("--job-id", required=True)
    args = parser.parse_args(argv)
    try:
        return run_job(args.run_dir, args.nproc, args.max_requeues, args.job_id)
    except LmscaleError as err:
        print(f"lmscale: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
