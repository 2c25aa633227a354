"""Ray on a machine that runs a Ray head (token authentication on, as Ray now starts clusters): ``lmscale
prepare`` beside it and against it, and ``lmscale submit --backend ray`` through its Jobs API."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

from . import schedulers
from .conftest import (
    FORTY_STEPS,
    GLOBAL_BATCH_OVERRIDES,
    damage_first_training_shard,
    losses,
    metrics_records,
    run_cli,
)
from .schedulers import RayHead

ray_head = schedulers.ray_head
pytestmark = pytest.mark.slow


def prepare(corpus_dir: Path, output: Path, env: dict[str, str], *extra: str):
    return run_cli("prepare", "--input", str(corpus_dir), "--output", str(output), "--seq-len", "64",
                   "--vocab-size", "512", "--workers", "2", *extra, env=env, timeout=300)  # fmt: skip


def test_prepare_beside_a_running_head_starts_its_own_ray_and_authenticates_against_it(
    ray_head: RayHead, corpus_dir: Path, tmp_path: Path
) -> None:
    # RAY_TMPDIR is where `ray.init()` finds the head's ray_current_cluster file: without --ray-address,
    # prepare must still start its own instance instead of attaching to the head.
    beside = prepare(corpus_dir, tmp_path / "beside", {**ray_head.env, "RAY_TMPDIR": str(ray_head.temp_dir)})
    assert beside.returncode == 0, beside.stderr[-3000:]
    assert (tmp_path / "beside" / "manifest.json").is_file()
    # With --ray-address: the token from RAY_AUTH_TOKEN_PATH, though RAY_AUTH_MODE is not set here.
    on_head = prepare(corpus_dir, tmp_path / "on-head", ray_head.env, "--ray-address", ray_head.address)
    assert on_head.returncode == 0, on_head.stderr[-3000:]
    assert (
        json.loads((tmp_path / "on-head" / "manifest.json").read_text())["splits"]
        == json.loads((tmp_path / "beside" / "manifest.json").read_text())["splits"]
    )

    # Without a token: one line, at once (Ray's client alone retries for 20 s, then raises a ConnectionError).
    # (A Ray started in this process, by a fixture's prepare, sets RAY_AUTH_MODE here: unset it too.)
    no_token = {**ray_head.env, "RAY_AUTH_TOKEN_PATH": None, "RAY_AUTH_TOKEN": None, "RAY_AUTH_MODE": None}
    started = time.monotonic()
    refused = prepare(corpus_dir, tmp_path / "refused", {**no_token, "HOME": str(tmp_path)}, "--ray-address",
                      ray_head.address)  # fmt: skip
    assert refused.returncode == 1 and time.monotonic() - started < 15
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(f"lmscale: error: --ray-address {ray_head.address}: the cluster requires token authentication")
    ), refused.stderr
    assert "Traceback" not in refused.stderr


def submit(ray_head: RayHead, dataset: Path, run_dir: Path, *extra: str) -> str:
    args = ["submit", "configs/gpt-tiny.yaml", "--backend", "ray", "--address", ray_head.dashboard, "--nproc", "2"]
    for item in [*GLOBAL_BATCH_OVERRIDES, f"data.path={dataset}", f"run.dir={run_dir}"]:
        args += ["--set", item]
    result = run_cli(*args, *extra, env=ray_head.env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "jobs.jsonl").read_text().splitlines()[-1])["job_id"]


def status(ray_head: RayHead, job: str) -> str:
    result = run_cli("status", job, env=ray_head.env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_until_finished(ray_head: RayHead, job: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = status(ray_head, job)
        if not any(f": {state}" in out for state in ("PENDING", "RUNNING")):
            return out
        time.sleep(2)
    raise AssertionError(f"Ray job {job} did not finish: {out}")


def test_a_ray_job_fails_with_its_rank_error_and_one_can_be_cancelled(
    ray_head: RayHead, dataset: Path, tmp_path: Path
) -> None:
    damaged = tmp_path / "damaged"
    shard = damage_first_training_shard(dataset, damaged)
    failing = tmp_path / "failing"
    args = ["--max-requeues", "0", "--set", "trainer.max_steps=6", "--set", "data.strict=true"]
    job = submit(ray_head, damaged, failing, *args[:4], "--set", f"data.path={damaged}", *args[4:])
    running_dir = tmp_path / "running"
    long_job = submit(ray_head, dataset, running_dir, "--set", "trainer.max_steps=100000",
                      "--set", "schedule.total_steps=100000", "--set", "checkpoint.every_steps=100000")  # fmt: skip

    final = wait_until_finished(ray_head, job)
    assert ": FAILED" in final, final
    logs = run_cli("logs", job, env=ray_head.env).stdout
    error = next(line for line in logs.splitlines() if line.startswith("lmscale: error: rank"))
    assert shard in error, error

    deadline = time.monotonic() + 240
    while not (running_dir / "metrics.jsonl").is_file() or not any("loss" in r for r in metrics_records(running_dir)):
        assert time.monotonic() < deadline, run_cli("logs", long_job, env=ray_head.env).stdout[-3000:]
        time.sleep(1)
    cancelled = run_cli("cancel", str(running_dir), env=ray_head.env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert ": CANCELLED" in wait_until_finished(ray_head, long_job, timeout=60)
    # No rank outlives its job.
    deadline = time.monotonic() + 30
    while [p for p in psutil.process_iter(["cmdline"]) if str(running_dir) in " ".join(p.info["cmdline"] or [])]:
        assert time.monotonic() < deadline, "rank processes of the cancelled job are still running"
        time.sleep(1)
    assert os.path.isdir(running_dir)


def test_a_ray_job_trains_like_the_local_launcher_and_restarts_from_its_checkpoint_when_a_rank_dies(
    ray_head: RayHead, dataset: Path, forty_step_reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    longer = [arg for item in [*FORTY_STEPS, "checkpoint.every_steps=10"] for arg in ("--set", item)]
    job = submit(ray_head, dataset, run_dir, "--max-requeues", "1", *longer)
    deadline = time.monotonic() + 240
    latest = run_dir / "checkpoints" / "latest"
    while not latest.is_file() or latest.read_text().strip() != "step_00000010":
        assert time.monotonic() < deadline, run_cli("logs", job, env=ray_head.env).stdout[-3000:]
        time.sleep(0.2)
    rank = next(
        p
        for p in psutil.process_iter(["cmdline", "environ"])
        if str(run_dir) in " ".join(p.info["cmdline"] or []) and (p.info["environ"] or {}).get("RANK") == "1"
    )
    rank.kill()  # a lost node, as far as the job can tell

    followed = run_cli("logs", job, "--follow", env=ray_head.env, timeout=300)
    assert "step 40/40" in followed.stdout, followed.stdout[-3000:] + followed.stderr[-2000:]
    assert ": SUCCEEDED" in status(ray_head, job)
    exits = [json.loads(line) for line in (run_dir / "job_exits.jsonl").read_text().splitlines()]
    assert [(e["attempt"], e["exit_code"] == 0) for e in exits] == [(0, False), (1, True)]
    assert "rank 1 exited with code -9" in followed.stdout
    assert "restarting from the latest checkpoint (1 of 1)" in followed.stdout
    resume = next(r for r in metrics_records(run_dir) if r.get("event") == "resume")
    assert resume["step"] >= 10 and resume["world_size"] == 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000040"

    # Every step, before the rank died and after the restart, is the local launcher's, loss for loss.
    assert losses(run_dir) == pytest.approx(losses(forty_step_reference), rel=1e-5)
