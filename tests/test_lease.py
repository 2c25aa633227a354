"""One live job per run directory (``lmscale.job.lease``), with real processes holding and contending for it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from lmscale.errors import LmscaleError
from lmscale.job import lease as run_dir_lease
from lmscale.job.lease import TIMEOUT_SECONDS, Holder, LeaseLost, RunDirInUse

from .conftest import (
    FORTY_STEPS,
    REPO,
    error_lines,
    lease_since,
    losses,
    metrics_records,
    run_cli,
    train_args,
    wait_for_step,
)

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lmscale.job import lease
    start = Path(sys.argv[2])
    while not start.exists():
        time.sleep(0.01)
    try:
        held = lease.claim(Path(sys.argv[1]), "test holder", sys.argv[3] or None)
    except lease.RunDirInUse as refused:
        print("refused:", refused, flush=True)
        sys.exit(1)
    print("held", held.record.took_over is not None, flush=True)
    time.sleep(float(sys.argv[4]))
    held.release()
    """
)


def holder(run_dir: Path, start: Path, job_id: str = "", hold_seconds: float = 60, **env: str) -> subprocess.Popen:
    """A process that claims ``run_dir`` once ``start`` exists and holds it for ``hold_seconds``."""
    return subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(start), job_id, str(hold_seconds)],
                            cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def first_line(process: subprocess.Popen) -> str:
    assert process.stdout is not None
    return process.stdout.readline().strip()


def written(run_dir: Path, **fields: object) -> None:
    """A lease file as another job would have written it: this process's record with ``fields`` changed."""
    record = dataclasses.replace(Holder.this_process("other job", None, None), **fields)
    run_dir_lease.lease_path(run_dir).write_text(json.dumps(dataclasses.asdict(record)))


def test_a_live_holder_refuses_others_in_one_line_and_release_frees_the_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (tmp_path / "go").touch()
    first = holder(run_dir, tmp_path / "go")
    try:
        assert first_line(first) == "held False"
        second = holder(run_dir, tmp_path / "go")
        line = first_line(second)
        assert second.wait(30) == 1
        assert line.startswith(f"refused: {run_dir} is in use by `test holder` (pid {first.pid}) on ")
        assert line.endswith(f"; stop it (kill {first.pid} on {os.uname().nodename}), or wait")
        assert run_dir_lease.in_use(run_dir) == line.removeprefix("refused: ")
        with pytest.raises(RunDirInUse):
            run_dir_lease.claim(run_dir, "pytest")
    finally:
        first.kill()
        first.wait()
    # The holder was killed with SIGKILL: on this machine a dead pid is a gone holder, taken over at once.
    assert run_dir_lease.in_use(run_dir) is None
    with run_dir_lease.claim(run_dir, "pytest") as lease:
        assert lease.record.took_over is not None
        assert lease.record.took_over["pid"] == first.pid
        assert lease.record.took_over["reason"] == f"pid {first.pid} is not running"
        assert run_dir_lease.read(run_dir) == lease.record
    assert not run_dir_lease.lease_path(run_dir).exists()  # released
    assert sorted(p.name for p in run_dir.iterdir()) == []  # no temporary files left behind


def test_a_lease_from_another_machine_lives_until_its_renewals_stop_for_the_timeout(tmp_path: Path) -> None:
    written(tmp_path, process_space="another-machine", host="node7", renewed_at=time.time() - 40)
    refusal = run_dir_lease.in_use(tmp_path)
    assert refusal is not None and "on node7 since" in refusal
    assert f"renewed 40 s ago; a lease not renewed for {TIMEOUT_SECONDS:.0f} s is taken over" in refusal
    written(tmp_path, process_space="another-machine", host="node7", renewed_at=time.time() - TIMEOUT_SECONDS - 5)
    with run_dir_lease.claim(tmp_path, "pytest") as lease:
        assert lease.record.took_over is not None
        assert lease.record.took_over["reason"] == f"not renewed for {TIMEOUT_SECONDS + 5:.0f} s"


def test_a_requeued_attempt_of_the_same_job_takes_over_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The earlier attempt looks live (this very process, on another machine, renewed a moment ago).
    written(tmp_path, process_space="another-machine", job_id="4242", attempt=0)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(RunDirInUse, match=r"in use by job 4242 \(other job, pid \d+\) .*`lmscale cancel 4242`"):
        run_dir_lease.claim(tmp_path, "rank 0", run_dir_lease.job_id_from_env())  # the same attempt: a second job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with run_dir_lease.claim(tmp_path, "rank 0", run_dir_lease.job_id_from_env()) as lease:
        assert lease.record.took_over is not None
        assert lease.record.took_over["reason"] == "attempt 0 of the same job"
        assert lease.record.attempt == 1


def test_contenders_for_a_gone_holders_lease_end_with_exactly_one_holder(tmp_path: Path) -> None:
    run_dir, go = tmp_path / "run", tmp_path / "go"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run_dir.mkdir()
    written(run_dir, pid=gone.pid)
    contenders = [holder(run_dir, go, hold_seconds=10) for _ in range(6)]
    go.touch()
    try:
        lines = [first_line(c) for c in contenders]
    finally:
        for c in contenders:
            c.kill()
            c.wait()
    winners = [c.pid for c, line in zip(contenders, lines, strict=True) if line.startswith("held")]
    assert len(winners) == 1, lines
    # The winner may have found the gone holder's lease already removed by a loser, which then found the
    # winner's: only the exclusion is guaranteed, not who records the takeover.
    assert lines.count("held True") <= 1
    assert all(f"in use by `test holder` (pid {winners[0]})" in line for line in lines if line.startswith("refused"))


def test_a_slow_contender_never_removes_the_lease_that_replaced_the_gone_one(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    written(tmp_path, pid=gone.pid)
    stale = run_dir_lease.read(tmp_path)
    assert stale is not None
    path = run_dir_lease.lease_path(tmp_path)
    marker = path.with_name(f".{path.name}.gone-{stale.lease_id}")
    # Another contender is in the middle of removing it (its marker is there): this one leaves it alone...
    os.link(path, marker)
    run_dir_lease._remove_stale(path, stale)
    assert run_dir_lease.read(tmp_path) == stale
    # ...and one whose start dies there leaves a run directory that says what to remove.
    with pytest.raises(LmscaleError, match=rf"{marker} marks it as being taken over; remove both"):
        run_dir_lease.claim(tmp_path, "pytest")
    marker.unlink()
    # A contender that read the gone holder's lease before a faster one replaced it by its own.
    with run_dir_lease.claim(tmp_path, "pytest") as faster:
        run_dir_lease._remove_stale(path, stale)
        assert run_dir_lease.read(tmp_path) == faster.record
        with pytest.raises(RunDirInUse):
            run_dir_lease.claim(tmp_path, "slower")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_renewal_finds_a_lease_taken_over_and_stops_the_holder(tmp_path: Path) -> None:
    lease = run_dir_lease.claim(tmp_path, "pytest")
    lease.renew()
    renewed = run_dir_lease.read(tmp_path)
    assert renewed is not None and renewed.lease_id == lease.id and renewed.renewed_at >= lease.record.started_at
    written(tmp_path, process_space="another-machine", host="node9")  # another job took it over meanwhile
    with pytest.raises(LeaseLost, match="lease was taken over by `other job` .* on node9"):
        lease.renew()
    lease.release()
    assert run_dir_lease.read(tmp_path) is not None  # release leaves another holder's lease alone


def test_a_lease_holder_killed_by_sigkill_leaves_nothing_but_the_lease(tmp_path: Path) -> None:
    """The holder's own files: nothing beside lease.json, whatever moment it was killed at."""
    (tmp_path / "go").touch()
    process = holder(tmp_path / "run", tmp_path / "go")
    assert first_line(process) == "held False"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["lease.json"]
    assert not psutil.pid_exists(process.pid)


def run_dir_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def job_processes(launcher: psutil.Process) -> list[psutil.Process]:
    """The launcher's ranks, their loader workers and W&B's processes."""
    return launcher.children(recursive=True)


@pytest.mark.slow
def test_a_second_start_is_refused_a_killed_launcher_takes_its_ranks_and_the_next_start_takes_over(
    dataset: Path, forty_step_reference: Path, tmp_path: Path
) -> None:
    """A live run directory refuses a second ``lmscale train`` in one line and keeps every byte; ``kill -9`` of
    the launcher ends its ranks and loader workers within seconds, without a save; the next start takes the
    lease over from the dead launcher and ends on the uninterrupted run's losses."""
    run_dir = tmp_path / "run"
    args = train_args(dataset, run_dir, 2, *FORTY_STEPS, "checkpoint.every_steps=10", "logging.wandb.mode=offline")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true"}
    job = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_step(run_dir, 12)
        launcher = psutil.Process(job.pid)
        ranks = [p for p in launcher.children() if "lmscale.train.main" in " ".join(p.cmdline())]
        assert len(ranks) == 2 and all(p.children() for p in ranks)  # each rank has its loader worker
        # Frozen, the job changes nothing while a second start is tried against it.
        os.killpg(job.pid, signal.SIGSTOP)
        before = run_dir_files(run_dir)
        second = run_cli(*args)
        assert second.returncode == 1
        assert error_lines(second.stderr) == [
            f"lmscale: error: {run_dir} is in use by `lmscale train` (pid {job.pid}) on {os.uname().nodename} "
            f"since {lease_since(run_dir)}; "
            f"stop it (kill {job.pid} on {os.uname().nodename}), or wait"
        ]
        assert run_dir_files(run_dir) == before
        status = run_cli("status", str(run_dir))
        assert status.returncode == 0 and f"held by `lmscale train` (pid {job.pid})" in status.stdout
        os.killpg(job.pid, signal.SIGCONT)

        wait_for_step(run_dir, 25)
        processes = job_processes(launcher)
        job.kill()
        job.wait()
        killed_at = time.monotonic()
        _, alive = psutil.wait_procs(processes, timeout=20)
        assert not alive, f"still running after the launcher's SIGKILL: {[p.cmdline() for p in alive]}"
        gone_within = time.monotonic() - killed_at
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert not any(r.get("event") == "preempted" for r in metrics_records(run_dir))  # nothing was saved for it
    stale = run_dir_lease.read(run_dir)
    assert stale is not None and stale.pid == job.pid
    assert "gone (pid" in run_cli("status", str(run_dir)).stdout

    finished = run_cli(*args)
    assert finished.returncode == 0, finished.stderr[-3000:]
    taken = [r for r in metrics_records(run_dir) if r.get("event") == "lease_taken_over"]
    assert len(taken) == 1 and taken[0]["pid"] == job.pid and taken[0]["reason"] == f"pid {job.pid} is not running"
    assert run_dir_lease.read(run_dir) is None
    assert losses(run_dir) == losses(forty_step_reference)  # all 40 steps, bit for bit
    print(f"ranks and loader workers gone {gone_within:.2f} s after the launcher's SIGKILL")


@pytest.mark.slow
def test_every_route_that_writes_a_run_directory_refuses_a_live_one(dataset: Path, tmp_path: Path) -> None:
    """``--prepare-only`` (which writes the run directory for other launchers) and a rank started without an
    lmscale launcher (srun, torchrun: its rank 0 takes the lease) are refused in one line, changing nothing."""
    run_dir = tmp_path / "run"
    args = train_args(dataset, run_dir, 1, "trainer.max_steps=2")
    prepared = run_cli(*args, "--prepare-only")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    with run_dir_lease.claim(run_dir, "pytest"):
        before = run_dir_files(run_dir)
        expected = (f"{run_dir} is in use by `pytest` (pid {os.getpid()}) on {os.uname().nodename} since "
                    f"{lease_since(run_dir)}; stop it (kill {os.getpid()} on {os.uname().nodename}), or wait")  # fmt: skip
        again = run_cli(*args, "--prepare-only")
        assert again.returncode == 1 and error_lines(again.stderr) == [f"lmscale: error: {expected}"]
        rank = subprocess.run([sys.executable, "-m", "lmscale.train.main", str(run_dir)], cwd=REPO,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert rank.returncode == 1 and error_lines(rank.stderr) == [f"lmscale: error: {expected}"]
        assert run_dir_files(run_dir) == before
    # Free again, the same rank takes the lease itself and trains.
    rank = subprocess.run([sys.executable, "-m", "lmscale.train.main", str(run_dir)], cwd=REPO,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rank.returncode == 0, rank.stderr[-3000:]
    assert sorted(losses(run_dir)) == [1, 2] and run_dir_lease.read(run_dir) is None
