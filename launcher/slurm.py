"""The Slurm backend of ``lmscale submit``: a job script rendered from ``cluster/slurm/lmscale.sbatch``, one
srun task per rank, preemption that saves and requeues, and the job's status, output and cancellation.

Why one task per rank rather than one launcher per node: Slurm then does what a node launcher would, and
does it for every rank: ``--signal`` and ``scancel --signal`` reach each rank directly (no process in
between that might die first or swallow them), ``--kill-on-bad-exit=1`` ends the step when any rank
dies, and each task's place in the job comes from Slurm's own variables.

No user value ever becomes shell text unquoted: the resources and the job name go on sbatch's command line
as arguments (never through a shell), and the template's fields are filled with ``shlex.quote``d values.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launcher.jobs import JobRecord, JobStatus, Submission, print_log, status_from_exit, timestamp
from launcher.rank_command import RANK_MODULE
from lmscale import run_layout
from lmscale.errors import LmscaleError, UsageError, one_line

TEMPLATE = Path(__file__).resolve().parents[1] / "cluster" / "slurm" / "lmscale.sbatch"
SCRIPT = "job.sbatch"
FIELD = re.compile(r"\{\{\s*(\w+)\s*\}\}")
STATES = {
    "PENDING": "PENDING", "CONFIGURING": "PENDING", "REQUEUED": "PENDING", "REQUEUE_HOLD": "PENDING",
    "REQUEUE_FED": "PENDING", "RESV_DEL_HOLD": "PENDING", "RUNNING": "RUNNING", "COMPLETING": "RUNNING",
    "SUSPENDED": "RUNNING", "STOPPED": "RUNNING", "SIGNALING": "RUNNING", "STAGE_OUT": "RUNNING",
    "RESIZING": "RUNNING", "COMPLETED": "SUCCEEDED", "CANCELLED": "CANCELLED", "PREEMPTED": "PREEMPTED",
}  # fmt: skip
"""Slurm's job states as lmscale's; every other one (FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, ...) is FAILED."""


def slurm_time(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    return f"{days}-{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def log_path(run_dir: Path, job_id: str) -> Path:
    return run_dir / run_layout.LOGS / f"slurm-{job_id}.out"


def sbatch_args(sub: Submission) -> list[str]:
    res = sub.resources
    # Slurm expands %j and friends in --output: a literal % in the run directory is written %%.
    output = str(log_path(sub.run_dir, "%j")).replace("%", "%%").replace("%%j", "%j")
    args = [
        "--parsable",
        f"--job-name={sub.name}",
        f"--nodes={res.nodes}",
        f"--ntasks-per-node={res.nproc}",
        f"--cpus-per-task={res.cpus_per_task}",
        "--requeue",
        "--open-mode=append",  # one log across requeues
        f"--output={output}",
        f"--signal=USR1@{res.signal_lead_seconds}",
    ]
    if res.gpus_per_node:
        args.append(f"--gpus-per-node={res.gpu_type + ':' if res.gpu_type else ''}{res.gpus_per_node}")
    if res.mem:
        args.append(f"--mem={res.mem}")
    if res.time_seconds is not None:
        args.append(f"--time={slurm_time(res.time_seconds)}")
    args += [f"--{flag}={value}" for flag, value in
             (("partition", sub.partition), ("account", sub.account), ("qos", sub.qos)) if value]  # fmt: skip
    return args


def srun_args(sub: Submission) -> list[str]:
    res = sub.resources
    # srun does not inherit --cpus-per-task from the allocation (Slurm 22.05+): give it again.
    return ["--kill-on-bad-exit=1", f"--ntasks-per-node={res.nproc}", f"--cpus-per-task={res.cpus_per_task}"]


def rank_exports(sub: Submission) -> dict[str, str]:
    res = sub.resources
    if res.gpus_per_node:
        return {}
    # CPU nodes: DeepSpeed's CPU accelerator over gloo, one thread pool per rank sized to its cores.
    return {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(res.cpus_per_task)}


def script(sub: Submission) -> str:
    template = sub.template or TEMPLATE
    try:
        text = template.read_text()
    except OSError as err:
        raise UsageError(f"--template {template}: cannot read it ({err.strerror})") from None
    values = {
        "run_dir": shlex.quote(str(sub.run_dir)),
        "python": shlex.quote(sys.executable),
        "scontrol": shlex.quote(shutil.which("scontrol") or "scontrol"),
        "max_requeues": str(sub.max_requeues),
        "srun_args": shlex.join(srun_args(sub)),
        "rank_module": RANK_MODULE,
        "exports": "\n".join(f"export {name}={shlex.quote(value)}" for name, value in rank_exports(sub).items()),
    }

    def fill(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise UsageError(f"{template}: unknown field {{{{ {match.group(1)} }}}} (known: {', '.join(values)})")
        return values[match.group(1)]

    return FIELD.sub(fill, text)


def render(sub: Submission) -> str:
    command = shlex.join(["sbatch", *sbatch_args(sub), str(sub.run_dir / SCRIPT)])
    return f"# submit\n{command}\n# {sub.run_dir / SCRIPT}\n{script(sub)}"


def _run(command: list[str], what: str) -> subprocess.CompletedProcess[str]:
    if shutil.which(command[0]) is None:
        raise LmscaleError(f"{command[0]}: not found on PATH; {what} needs Slurm's client commands on this machine")
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def submit(sub: Submission) -> JobRecord:
    path = sub.run_dir / SCRIPT
    path.write_text(script(sub))
    (sub.run_dir / run_layout.LOGS).mkdir(exist_ok=True)
    result = _run(["sbatch", *sbatch_args(sub), str(path)], "--backend slurm")
    if result.returncode != 0:
        raise LmscaleError(f"sbatch refused job {sub.name!r}: {one_line(result.stderr)}")
    job_id = result.stdout.strip().split(";")[0]
    return JobRecord("slurm", job_id, str(sub.run_dir), sub.name, timestamp(), log=str(log_path(sub.run_dir, job_id)))


def status(job: JobRecord) -> JobStatus:
    # scontrol knows a job until MinJobAge after it ends (5 minutes by default); the run directory after that.
    result = _run(["scontrol", "show", "job", "--oneliner", job.job_id], "lmscale status")
    if result.returncode != 0:
        return status_from_exit(job)
    fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout))
    state = fields.get("JobState", "UNKNOWN")
    detail = f"Slurm {state}, reason {fields.get('Reason', 'None')}, exit code {fields.get('ExitCode', '?')}, " \
             f"restarts {fields.get('Restarts', '0')}"  # fmt: skip
    return JobStatus(STATES.get(state, "FAILED"), detail)


def logs(job: JobRecord, follow: bool) -> None:
    print_log(Path(job.log or log_path(Path(job.run_dir), job.job_id)), job, status, follow)


def cancel(job: JobRecord) -> None:
    result = _run(["scancel", job.job_id], "lmscale cancel")
    if result.returncode != 0:
        raise LmscaleError(f"scancel {job.job_id}: {one_line(result.stderr)}")
