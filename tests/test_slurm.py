"""``lmscale submit --backend slurm`` on a real single-node Slurm: a job that trains like ``lmscale train``, a
job name that is all shell metacharacters, cancellation, and a preemption warning that saves, requeues,
resumes and ends on the loss of an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from . import schedulers
from .conftest import FORTY_STEPS, GLOBAL_BATCH_OVERRIDES, final_loss, losses, metrics_records, run_cli, wait_for_step
from .schedulers import SlurmCluster

slurm_cluster = schedulers.slurm_cluster

pytestmark = pytest.mark.slow
NASTY_NAME = 'it\'s a "job" $(touch PWNED) `touch PWNED2`; echo $HOME\nsecond line & | > <'


def submit(cluster: SlurmCluster, dataset: Path, run_dir: Path, *extra: str, env: dict | None = None) -> str:
    args = ["submit", "configs/gpt-tiny.yaml", "--backend", "slurm", "--nproc", "2"]
    for item in [*GLOBAL_BATCH_OVERRIDES, f"data.path={dataset}", f"run.dir={run_dir}"]:
        args += ["--set", item]
    result = run_cli(*args, *extra, env={**cluster.env, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "jobs.jsonl").read_text().splitlines()[-1])["job_id"]


def wait_for_state(cluster: SlurmCluster, job_id: str, states: set[str], timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.job_field(job_id, "JobState")
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} is {cluster.job_field(job_id, 'JobState')}, not {states}")


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: SlurmCluster, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 6 steps of ``two_rank_reference`` as one Slurm job of 2 ranks, submitted under a job name full of
    shell metacharacters."""
    run_dir = tmp_path_factory.mktemp("slurm") / "run"
    job = submit(slurm_cluster, dataset, run_dir, "--job-name", NASTY_NAME, "--set", "trainer.max_steps=6")
    assert wait_for_state(slurm_cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED", (
        run_dir / "logs" / f"slurm-{job}.out"
    ).read_text()[-3000:]
    return run_dir


def test_a_slurm_job_trains_like_the_local_launcher_and_keeps_its_name_intact(
    slurm_cluster: SlurmCluster, uninterrupted: Path, two_rank_reference: Path
) -> None:
    run_dir = uninterrupted
    job = json.loads((run_dir / "jobs.jsonl").read_text())["job_id"]
    # The local launcher's run, loss for loss (same config, same samples, 2 ranks started by srun).
    assert losses(run_dir) == pytest.approx(losses(two_rank_reference), rel=1e-5)
    start = next(r for r in metrics_records(run_dir) if r.get("event") == "start")
    assert start["started_by"] == "slurm" and start["world_size"] == 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    # The name reached Slurm as one argument, byte for byte, and nothing in it ran.
    out = subprocess.run(["scontrol", "show", "job", job], env=slurm_cluster.env, capture_output=True, text=True)
    assert f"JobName={NASTY_NAME}" in out.stdout
    assert not list(run_dir.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    exits = [json.loads(line) for line in (run_dir / "job_exits.jsonl").read_text().splitlines()]
    assert exits == [{"job_id": job, "attempt": 0, "exit_code": 0, "ended": False, "at": exits[0]["at"]}]
    status = run_cli("status", str(run_dir), env=slurm_cluster.env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stdout + status.stderr
    logs = run_cli("logs", job, env=slurm_cluster.env)
    assert "step 6/6" in logs.stdout and f"job {job} attempt 0" in logs.stdout
    listed = run_cli("jobs", env=slurm_cluster.env)
    assert job in listed.stdout and str(run_dir) in listed.stdout


def test_a_preempted_slurm_job_saves_requeues_resumes_and_ends_like_an_uninterrupted_one(
    slurm_cluster: SlurmCluster, dataset: Path, forty_step_reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    longer = [arg for item in [*FORTY_STEPS, "checkpoint.every_steps=100"] for arg in ("--set", item)]
    job = submit(slurm_cluster, dataset, run_dir, *longer)
    wait_for_step(run_dir, 3)
    # Slurm's preemption warning, as --signal=USR1@LEAD sends it before the time limit: to every rank.
    slurm_cluster.run("scancel", "--signal=USR1", job)
    wait_for_state(slurm_cluster, job, {"PENDING"})
    # A requeued job waits out Slurm's fixed delay (about 2 minutes) before it may start again: skip it.
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = wait_for_state(slurm_cluster, job, {"COMPLETED", "FAILED", "CANCELLED"})
    log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    exits = [json.loads(line) for line in (run_dir / "job_exits.jsonl").read_text().splitlines()]
    assert [(e["attempt"], e["exit_code"]) for e in exits] == [(0, 3), (1, 0)], log[-3000:]
    assert slurm_cluster.job_field(job, "Restarts") == "1" and "requeueing (1 of 3)" in log
    events = [r for r in metrics_records(run_dir) if r.get("event") in ("preempted", "resume")]
    assert [e["event"] for e in events] == ["preempted", "resume"] and events[0]["signal"] == "SIGUSR1"
    assert 3 <= events[0]["step"] < 40 and events[1]["step"] == events[0]["step"]
    assert losses(run_dir)[40] == pytest.approx(final_loss(forty_step_reference), rel=1e-5)


def test_cancelling_a_running_slurm_job_stops_it_after_a_save_and_does_not_requeue(
    slurm_cluster: SlurmCluster, dataset: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, dataset, run_dir, "--set", "trainer.max_steps=100000",
                 "--set", "schedule.total_steps=100000", "--set", "checkpoint.every_steps=100000")  # fmt: skip
    wait_for_step(run_dir, 2)
    result = run_cli("cancel", job, env=slurm_cluster.env)
    assert result.returncode == 0, result.stderr
    assert wait_for_state(slurm_cluster, job, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=60) == "CANCELLED"
    # Slurm's TERM reached the ranks, which saved; the script saw TERM itself and did not requeue.
    deadline = time.monotonic() + 40
    while not (run_dir / "job_exits.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    exits = [json.loads(line) for line in (run_dir / "job_exits.jsonl").read_text().splitlines()]
    assert [(e["exit_code"], e["ended"]) for e in exits] == [(3, True)]
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert slurm_cluster.job_field(job, "Restarts") == "0"
    status = run_cli("status", job, env=slurm_cluster.env)
    assert "CANCELLED" in status.stdout, status.stdout + status.stderr
