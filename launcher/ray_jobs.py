"""The Ray backend of ``lmscale submit``: the job goes to a Ray cluster through the Ray Jobs API
(``JobSubmissionClient``, the dashboard's address, ``http://HEAD:8265``), and its entrypoint is lmscale's
driver (``launcher.ray_driver``), which places the ranks and starts each with the per-rank entry point.

The cluster runs the job from the run directory and the Python environment it names, so its nodes must
mount the run directory and the dataset at the same paths and have lmscale installed (an image, or the
same shared environment): nothing is uploaded with the job. A cluster with token authentication gets the
token from where Ray looks for it (``lmscale.data.ray_cluster``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
import time
import uuid
from typing import Any

from launcher.jobs import JobRecord, JobStatus, Submission, timestamp
from lmscale.data.ray_cluster import authenticated
from lmscale.errors import LmscaleError, UsageError, one_line

AGENT_WAIT_SECONDS = 60.0
STATES = {"PENDING": "PENDING", "RUNNING": "RUNNING", "SUCCEEDED": "SUCCEEDED", "FAILED": "FAILED",
          "STOPPED": "CANCELLED"}  # fmt: skip


def dashboard_address(sub_address: str | None) -> str:
    address = sub_address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError("--address: the Ray cluster's dashboard (http://HEAD:8265) is needed, or RAY_ADDRESS")
    return address if "://" in address else f"http://{address}"


def client(address: str) -> Any:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    def connect() -> Any:
        try:
            return JobSubmissionClient(address)
        except AuthenticationError:
            return None
        except ConnectionError as err:
            raise LmscaleError(
                f"--address {address}: no Ray dashboard answers there ({one_line(err, limit=300)})"
            ) from None

    return authenticated(connect, f"--address {address}")


def driver_argv(sub: Submission, job_id: str) -> list[str]:
    res = sub.resources
    gpus_per_rank = res.gpus_per_node / res.nproc if res.gpus_per_node else 0
    return ["python", "-m", "launcher.ray_driver", str(sub.run_dir), "--nodes", str(res.nodes), "--nproc",
            str(res.nproc), "--cpus-per-rank", str(res.cpus_per_task), "--gpus-per-rank", f"{gpus_per_rank:g}",
            "--max-requeues", str(sub.max_requeues), "--job-id", job_id]  # fmt: skip


def job_id_for(name: str) -> str:
    """A submission id that names the run and stays unique: lmscale-<name>-<8 hex>."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "run"
    return f"lmscale-{slug}-{uuid.uuid4().hex[:8]}"


def request(sub: Submission, job_id: str) -> dict[str, Any]:
    return {
        "entrypoint": shlex.join(driver_argv(sub, job_id)),
        "submission_id": job_id,
        # The driver only places and watches the ranks: it takes no CPU a rank could use.
        "entrypoint_num_cpus": 0,
        # Plain log lines: Ray colours the prefix of each actor's output by default.
        "runtime_env": {"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_COLOR_PREFIX": "0"}},
        "metadata": {"lmscale_run_dir": str(sub.run_dir), "lmscale_name": sub.name},
    }


def render(sub: Submission) -> str:
    address = sub.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "RAY_ADDRESS"
    body = json.dumps(request(sub, job_id_for(sub.name)), indent=2)
    return f"# JobSubmissionClient({address!r}).submit_job(**request)\n{body}"


def submit(sub: Submission) -> JobRecord:
    address = dashboard_address(sub.address)
    job_id = job_id_for(sub.name)
    jobs_client = client(address)
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            jobs_client.submit_job(**request(sub, job_id))
            break
        except RuntimeError as err:
            # A head that has just started answers before its job agent is up: that passes within seconds.
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise LmscaleError(f"Ray job {job_id} at {address}: {one_line(err, limit=300)}") from None
            time.sleep(2)
    return JobRecord("ray", job_id, str(sub.run_dir), sub.name, timestamp(), address=address)


def status(job: JobRecord) -> JobStatus:
    info = client(str(job.address)).get_job_info(job.job_id)
    state = str(getattr(info.status, "value", info.status))
    message = (info.message or "").strip().splitlines()
    return JobStatus(STATES.get(state, "UNKNOWN"), f"Ray {state}" + (f": {message[0][:300]}" if message else ""))


def logs(job: JobRecord, follow: bool) -> None:
    jobs_client = client(str(job.address))
    if not follow:
        sys.stdout.write(jobs_client.get_job_logs(job.job_id))
        return

    async def tail() -> None:
        async for chunk in jobs_client.tail_job_logs(job.job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def cancel(job: JobRecord) -> None:
    if not client(str(job.address)).stop_job(job.job_id):
        raise LmscaleError(f"Ray job {job.job_id}: already finished ({status(job).state})")
