"""``lmscale submit``: one job description (the run's YAML plus resource flags) to Slurm, a Ray cluster, or
this machine in the background.

The run directory is prepared here, once, as ``lmscale train --prepare-only`` prepares it, with the DeepSpeed
config of the nodes the job will run on (GPU nodes get the fused optimizer and overlapped communication
whatever the submitting machine has); every rank of every attempt of the job reads it. Preflight checks
run first (``launcher.preflight``); ``--dry-run`` shows them, the DeepSpeed config and the exact script or
request, and submits nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import ModuleType

from launcher import jobs, preflight
from launcher.jobs import Submission
from launcher.preflight import Resources
from launcher.resolve import kept_config, plan_for_target, resolve_config
from launcher.train import launch_record, write_run_dir
from lmscale.config import Config
from lmscale.errors import LmscaleError, UsageError
from lmscale.footprint import GB
from lmscale.job import lease as run_dir_lease
from lmscale.train.ds_config import deepspeed_config
from lmscale.train.plan import RunPlan

DEFAULT_SIGNAL_LEAD_SECONDS = 300


def backend(name: str) -> ModuleType:
    if name == "slurm":
        from launcher import slurm

        return slurm
    if name == "ray":
        from launcher import ray_jobs

        return ray_jobs
    from launcher import local_jobs

    return local_jobs


def resources(args: argparse.Namespace) -> Resources:
    gpus, gpu_type = preflight.parse_gpus(args.gpus_per_node)
    nproc = args.nproc or max(gpus, 1)
    if args.nodes < 1 or nproc < 1:
        raise UsageError(f"--nodes {args.nodes} --nproc {nproc}: both must be at least 1")
    if gpus and nproc > gpus:
        raise UsageError(f"--nproc {nproc}: more ranks than the {gpus} GPUs per node (one rank per GPU)")
    return Resources(
        nodes=args.nodes,
        nproc=nproc,
        gpus_per_node=gpus,
        gpu_type=gpu_type,
        gpu_memory_gb=args.gpu_memory or preflight.gpu_memory_gb(gpu_type),
        cpus_per_task=args.cpus_per_task or 1,
        mem=args.mem,
        time_seconds=preflight.parse_time(args.time),
        signal_lead_seconds=args.signal_lead,
    )


def run_dir_busy(run_dir: Path) -> str | None:
    """Why no job may be submitted for ``run_dir`` now: a live job holds it (``lmscale.job.lease``), or the job
    submitted for it last is still queued or starting (it takes the lease only as its ranks start)."""
    if refusal := run_dir_lease.in_use(run_dir):
        return refusal
    if (job := jobs.latest_job(run_dir)) is None:
        return None
    try:
        state = backend(job.backend).status(job).state
    except LmscaleError:
        return None  # a scheduler that cannot be asked: the lease still stops a second job as it starts
    if state not in ("PENDING", "RUNNING"):
        return None
    return f"{run_dir} has {job.backend} job {job.job_id} {state.lower()}; `lmscale cancel {job.job_id}`, or wait"


def preflight_failures(cfg: Config, plan: RunPlan | None, data_problem: str | None, res: Resources) -> list[str]:
    """Every check that fails, one line each. ``plan`` is None when the global batch does not divide."""
    checks = (preflight.check_batch(cfg, res), data_problem, preflight.check_run_dir(cfg.run.path),
              run_dir_busy(cfg.run.path))  # fmt: skip
    failures = [c for c in checks if c]
    model = (plan.cfg if plan else cfg).model
    if model.vocab_size is not None and model.seq_len is not None:
        resolved = plan.cfg if plan else cfg
        sequences = plan.global_batch_size if plan else resolved.trainer.global_batch_size or res.world_size
        seq_len = plan.seq_len if plan and plan.manifests else model.seq_len
        checks = [
            preflight.check_memory(resolved, res, seq_len),
            preflight.check_time(resolved, res, sequences * seq_len),
            preflight.check_stop_latency(resolved, res, sequences * seq_len),
        ]
        failures += [c for c in checks if c]
    return failures


def submit(args: argparse.Namespace) -> int:
    res = resources(args)
    cfg = resolve_config(args.config, args.set)
    divisible = preflight.check_batch(cfg, res) is None
    plan, data_problem = plan_for_target(cfg, res) if divisible else (None, None)
    accelerator = "cuda" if res.gpus_per_node else "cpu"
    name = args.job_name or cfg.run.name
    submission = Submission(
        run_dir=cfg.run.path,
        name=name,
        resources=res,
        max_requeues=args.max_requeues,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        address=args.address,
        template=Path(args.template) if args.template else None,
    )
    chosen = backend(args.backend)
    failures = preflight_failures(cfg, plan, data_problem, res)
    if args.dry_run:
        print(f"# preflight ({res.nodes} nodes x {res.nproc} ranks, {res.gpus_per_node} GPUs per node)")
        for line in failures or ["all checks pass"]:
            print(f"#   {line}")
        seq_len = plan.seq_len if plan and plan.manifests else None
        if (estimate := preflight.memory_estimate(plan.cfg if plan else cfg, res, seq_len)) is not None:
            print(f"# estimated peak memory per rank: {estimate.total / GB:.2f} GB ({estimate.describe()})")
        if plan is not None:
            print(f"# DeepSpeed config for the job's {accelerator} ranks (world size {res.world_size})")
            print(json.dumps(deepspeed_config(plan, accelerator), indent=2))
        print(chosen.render(submission))
        return 0
    if failures or plan is None:
        for line in failures:
            print(f"lmscale: error: preflight: {line}", file=sys.stderr)
        return UsageError.exit_code
    write_run_dir(
        kept_config(plan), plan, deepspeed_config(plan, accelerator), launch_record(res.world_size, args.backend)
    )
    job = chosen.submit(submission)
    jobs.record_job(job)
    print(f"submitted {job.backend} job {job.job_id} ({name}) for {submission.run_dir}")
    print(f"  lmscale status {job.job_id}    lmscale logs {job.job_id} --follow    lmscale cancel {job.job_id}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    records = jobs.all_jobs()
    if not records:
        print(f"no jobs submitted from this machine ({jobs.state_dir()})")
        return 0
    print(f"{'JOB':<24} {'BACKEND':<7} {'STATE':<10} {'SUBMITTED':<25} RUN DIR")
    for job in records[-args.last :]:
        try:
            state = backend(job.backend).status(job).state
        except LmscaleError:
            state = "UNKNOWN"
        print(f"{job.job_id:<24} {job.backend:<7} {state:<10} {job.submitted_at:<25} {job.run_dir}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """A job's state; for a run directory, also which job holds it now (which may be none of those submitted:
    ``lmscale train`` from a shell)."""
    run_dir = Path(args.job)
    if run_dir.is_dir():
        print(holder_line(run_dir))
        if jobs.latest_job(run_dir) is None:
            return 0
    job = jobs.find_job(args.job)
    status = backend(job.backend).status(job)
    detail = f" ({status.detail})" if status.detail else ""
    print(f"{job.backend} job {job.job_id} ({job.name}): {status.state}{detail}")
    print(f"  run directory {job.run_dir}")
    return 0


def holder_line(run_dir: Path) -> str:
    holder = run_dir_lease.read(run_dir)
    if holder is None:
        return f"{run_dir}: no job holds it"
    renewed = f"lease renewed {max(0.0, time.time() - holder.renewed_at):.0f} s ago"
    if (gone := holder.gone(run_dir_lease.Holder.this_process("status", None, None))) is not None:
        return f"{run_dir}: held by {holder.describe()}, which is gone ({gone}); the next start takes it over"
    return f"{run_dir}: held by {holder.describe()} ({renewed})"


def cmd_logs(args: argparse.Namespace) -> int:
    job = jobs.find_job(args.job)
    backend(job.backend).logs(job, follow=args.follow)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = jobs.find_job(args.job)
    backend(job.backend).cancel(job)
    print(f"cancelled {job.backend} job {job.job_id} ({job.name})")
    return 0
