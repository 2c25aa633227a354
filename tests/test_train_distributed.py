"""Real DeepSpeed engines on 2 CPU ranks over gloo: spawned from pytest for what the trainer does, started by the
CLI as a user would for signals, hangs and what the console shows."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from lmscale.train.checkpoint import LATEST

from .conftest import (
    FORTY_STEPS,
    REPO,
    TINY_OVERRIDES,
    damage_first_training_shard,
    error_lines,
    keys_per_step,
    losses,
    metrics_records,
    run_cli,
    train_args,
)
from .distributed import train_in_process, train_ranks
from .test_cli_e2e import wandb_records

pytestmark = pytest.mark.slow


def train(run_dir: Path, dataset: Path, nproc: int, *overrides: str) -> None:
    """A run on ``nproc`` ranks spawned from pytest (where the command line is not what a test is about)."""
    sets = [*TINY_OVERRIDES, f"data.path={dataset}", "data.log_sample_keys=true", "trainer.eval_every_steps=4",
            "schedule.total_steps=8", *overrides]  # fmt: skip
    results = train_ranks(run_dir, nproc, sets)
    assert [r["code"] for r in results] == [0] * nproc, results


# ZeRO-1 trains through every stage of the GPU check's CPU run (test_gpu_check); its resume is stage 2's
# with unpartitioned gradients, which test_checkpoints' kill -9 and the stop signals below resume exactly.
@pytest.mark.parametrize("stage", [3])
def test_zero_stage_trains_and_resumes_exactly_with_activation_checkpointing(
    stage: int, dataset: Path, tmp_path: Path
) -> None:
    """The interrupted run recomputes every block's activations in the backward pass, the uninterrupted one
    keeps them: with dropout on, the losses are equal bit for bit (the recomputation draws the same masks)."""
    # Dropout makes exactness depend on each rank's random state, restored as the last thing before a step.
    common = [f"zero.stage={stage}", "checkpoint.every_steps=4", "model.dropout=0.1"]
    full, part = tmp_path / "full", tmp_path / "part"
    shm_before = set(Path("/dev/shm").glob("deepspeed_*"))
    train(full, dataset, 2, "trainer.max_steps=8", *common)
    assert set(Path("/dev/shm").glob("deepspeed_*")) == shm_before  # no shared memory outlives the run
    train(part, dataset, 2, "trainer.max_steps=4", *common, "trainer.activation_checkpointing=full")
    assert (part / "checkpoints" / LATEST).read_text() == "step_00000004"
    train(part, dataset, 2, "trainer.max_steps=8", *common, "trainer.activation_checkpointing=full")

    reference = losses(full)
    assert sorted(reference) == list(range(1, 9))
    assert losses(part) == reference  # identical floats at every step
    assert reference[8] < reference[1] - 0.3
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    # The two ranks read disjoint samples, and the resumed data loader continued where it stopped.
    for path in (full / "sample_keys").glob("rank_*.jsonl"):
        assert (part / "sample_keys" / path.name).read_text() == path.read_text()
    rank0, rank1 = ((full / "sample_keys" / f"rank_{r}.jsonl").read_text().splitlines() for r in (0, 1))
    keys0 = {k for line in rank0 for k in json.loads(line)["keys"]}
    keys1 = {k for line in rank1 for k in json.loads(line)["keys"]}
    assert len(keys0) == len(keys1) == 8 * 8 and not keys0 & keys1
    state = json.loads((part / "checkpoints" / "step_00000008" / "lmscale_state.json").read_text())
    assert state["step"] == 8 and state["samples_seen"] == 8 * 16 and state["tokens_seen"] == 8 * 16 * 64
    assert state["resumes"] == 1


def test_elastic_resume_on_another_world_size_continues_the_sample_sequence(dataset: Path, tmp_path: Path) -> None:
    common = [
        "zero.stage=2",
        "checkpoint.every_steps=4",
        "trainer.global_batch_size=24",
        "trainer.grad_accum_steps=null",
    ]
    full = tmp_path / "full"
    train(full, dataset, 2, "trainer.max_steps=8", *common)
    reference = keys_per_step(full)
    for world in (3,):  # a fresh run directory on 1 rank: test_rank_entry
        resumed = tmp_path / f"resumed{world}"
        shutil.copytree(full, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000008")
        (resumed / "checkpoints" / LATEST).write_text("step_00000004")
        train(resumed, dataset, world, "trainer.max_steps=8", *common)
        keys = keys_per_step(resumed)
        for step in range(1, 9):
            assert sorted(keys[step]) == sorted(reference[step]), f"world {world}, step {step}"
        # The universal checkpoint restored weights and optimizer state: the same samples give the same loss,
        # up to the order in which another number of ranks sums the gradients.
        assert losses(resumed) == pytest.approx(losses(full), abs=2e-4), f"world {world}"
        state = json.loads((resumed / "checkpoints" / "step_00000008" / "lmscale_state.json").read_text())
        assert state["world_size"] == world and state["samples_seen"] == 8 * 24


def test_stop_signals_to_any_process_save_and_the_run_resumes_loss_for_loss(
    dataset: Path, forty_step_reference: Path, tmp_path: Path
) -> None:
    """One run stopped four ways, as schedulers and users stop jobs, then finished: every stop saves the current
    step and ends with its documented code only after the ranks have exited, and the 40 steps equal an
    uninterrupted run's, dropout included; W&B (offline) holds every step exactly once."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "launcher",
            *train_args(dataset, run_dir, 2, *FORTY_STEPS, "checkpoint.every_steps=100", "logging.wandb.mode=offline")]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true"}

    def interrupted(send: Callable[[subprocess.Popen], None], after_steps: int | None) -> tuple[int, str, int]:
        """(exit code, stderr, the step it stopped at) of a job that ``send`` signals once it has trained
        ``after_steps`` more steps (None: at once, while it starts)."""

        def trained() -> int:
            return max(losses(run_dir), default=0) if (run_dir / "metrics.jsonl").is_file() else 0

        start = trained()
        job = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while after_steps is not None and trained() < start + after_steps:
                assert job.poll() is None and time.monotonic() < deadline, "the job ended before its stop"
                time.sleep(0.05)
            time.sleep(0 if after_steps is not None else 1.0)
            send(job)
            _, err = job.communicate(timeout=180)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        left = [p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]
        assert not left, "the launcher returned before its ranks"
        stopped = [r for r in metrics_records(run_dir) if r.get("event") == "preempted"][-1]
        return job.returncode, err, stopped["step"]

    def rank(job: subprocess.Popen, number: int) -> psutil.Process:
        return next(p for p in psutil.Process(job.pid).children() if p.environ().get("RANK") == str(number))

    stops = [
        ("SIGTERM to one rank", lambda job: rank(job, 1).send_signal(signal.SIGTERM), 3, 3),
        ("SIGUSR1 to the launcher", lambda job: job.send_signal(signal.SIGUSR1), 3, 3),
        ("Ctrl-C to the process group", lambda job: os.killpg(job.pid, signal.SIGINT), 3, 130),
        ("SIGTERM to every process while it starts", lambda job: os.killpg(job.pid, signal.SIGTERM), None, 3),
    ]
    steps_before = 0
    for what, send, after_steps, expected in stops:
        code, err, step = interrupted(send, after_steps)
        assert code == expected, f"{what}: {err[-3000:]}"
        assert "Traceback" not in err and "lmscale: error" not in err, f"{what}: {err[-3000:]}"
        assert (run_dir / "checkpoints" / LATEST).read_text() == f"step_{step:08d}", what
        assert step > steps_before if after_steps else step == steps_before, what
        steps_before = step
    assert steps_before < 40
    finished = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert losses(run_dir) == losses(forty_step_reference)  # all 40 steps, bit for bit

    # W&B: one offline run per job, none marked crashed, every step of the run once.
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == len(stops) + 1
    records = [wandb_records(f) for f in files]
    assert all(next(r["exit"]["exit_code"] for r in job if r["type"] == "exit") == 0 for job in records)
    assert sum(any(r["type"] == "preempting" for r in job) for job in records) == len(stops)
    steps = [r["history"]["item"]["_step"] for job in records for r in job if r["type"] == "history"]
    assert sorted(steps) == list(range(1, 41))


def test_a_hung_rank_stops_the_job_after_the_step_timeout_with_one_line(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "launcher", *train_args(dataset, run_dir, 2, "trainer.max_steps=1000",
            "schedule.total_steps=1000", "checkpoint.every_steps=0", "trainer.step_timeout_minutes=0.1")]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    job = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "metrics.jsonl").is_file() and len(losses(run_dir)) >= 3):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before the hang"
            time.sleep(0.05)
        hung = next(p for p in psutil.Process(job.pid).children() if p.environ().get("RANK") == "1")
        hung.suspend()  # alive, holding its sockets open, answering nothing: a hung GPU or a stuck filesystem
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 4, err[-3000:]
    assert error_lines(err) == [
        "lmscale: error: rank 0 (node 0) exited with code 4: a collective failed (a peer rank died, or hung longer "
        f"than trainer.step_timeout_minutes; traceback in {run_dir}/logs/rank_0.log)"
    ]
    assert "Timed out waiting 6000ms" in (run_dir / "logs" / "rank_0.log").read_text()


def test_non_finite_steps_roll_back_and_walk_back_past_checkpoints_that_diverge_again(
    dataset: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    train(run_dir, dataset, 2, "trainer.max_steps=4", "checkpoint.every_steps=2", "schedule.warmup_steps=0")
    # A learning rate of 1e30 wrecks the weights in one update, so every other step's loss is not finite.
    args = ["train", "configs/gpt-tiny.yaml", "--nproc", "2"]
    for item in [*TINY_OVERRIDES, f"data.path={dataset}", f"run.dir={run_dir}", "trainer.eval_every_steps=0",
                 "schedule.total_steps=10", "schedule.warmup_steps=0", "checkpoint.every_steps=0",
                 "trainer.max_steps=10", "optim.lr=1e30", "trainer.max_rollbacks=5"]:  # fmt: skip
        args += ["--set", item]
    result = run_cli(*args)
    assert result.returncode == 1
    assert error_lines(result.stderr)[-1].endswith(
        "training diverged (every checkpoint (step_00000004, step_00000002) led back to non-finite values)"
    )
    records = metrics_records(run_dir)
    events = [(r["step"], r["event"]) for r in records if "event" in r and r["event"] != "checkpoint"]
    assert events == [(0, "start"), (4, "start"), (4, "resume"), (6, "skipped_step"), (6, "rollback"),
                      (8, "skipped_step"), (8, "rollback"), (10, "skipped_step")]  # fmt: skip
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    # The latest checkpoint first; diverging again before the next save, the one before it.
    assert [(r["tag"], r["to_step"], r["skipped_samples"]) for r in rollbacks] == [
        ("step_00000004", 4, 2 * 16),
        ("step_00000002", 2, 6 * 16),
    ]
    loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert loss[6] is None and loss[8] is None and loss[10] is None  # not finite: written as null
    # After each rollback that checkpoint's weights are back: the loss is that of a healthy model again.
    assert abs(loss[7] - loss[5]) < 0.2 and abs(loss[9] - loss[3]) < 0.2
    assert (run_dir / "checkpoints" / LATEST).read_text() == "step_00000004"


def test_spike_protection_skips_steps_on_every_rank_and_a_resume_skips_the_same(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # A learning rate too small to move the loss leaves it to the noise between batches, and a guard this
    # strict (half a standard deviation) takes that noise for spikes: many steps are skipped, deterministically.
    sets = ["trainer.max_steps=30", "schedule.total_steps=30", "checkpoint.every_steps=15", "optim.lr=1e-6",
            "schedule.warmup_steps=0", "trainer.spike_sigma=0.5", "trainer.spike_window=20", "model.dropout=0.1"]  # fmt: skip
    train_in_process(dataset, run_dir, 2, *sets)
    records = metrics_records(run_dir)
    skipped = {r["step"]: r["skipped_spikes"] for r in records if "loss" in r}
    assert set(skipped[s] for s in range(1, 21)) == {0}  # 20 steps of history before any judgement
    assert 0 < skipped[30] < 10
    events = [r for r in records if r.get("event") == "skipped_spikes"]
    assert sum(e["new"] for e in events) == skipped[30] == events[-1]["total"]
    state = json.loads((run_dir / "checkpoints" / "step_00000030" / "lmscale_state.json").read_text())
    assert state["spike_guard"]["skipped"] == skipped[30] and state["spike_guard"]["seen"] == 30 - skipped[30]

    # The guard's window is part of the checkpoint: resumed at step 15, the run skips the same steps.
    before = losses(run_dir), skipped
    shutil.rmtree(run_dir / "checkpoints" / "step_00000030")
    (run_dir / "checkpoints" / LATEST).write_text("step_00000015")
    train_in_process(dataset, run_dir, 2, *sets)
    after = {r["step"]: r["skipped_spikes"] for r in metrics_records(run_dir) if "loss" in r}
    assert (losses(run_dir), after) == before


def test_a_corrupt_shard_with_strict_data_stops_training_with_one_line(dataset: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    for shard in (broken / "shards").glob("train-*.tar"):
        shard.write_bytes(shard.read_bytes()[:3000])  # truncated in transfer
    args = ["train", "configs/gpt-tiny.yaml", "--nproc", "1"]
    for item in [*TINY_OVERRIDES, f"data.path={broken}", f"run.dir={tmp_path / 'run'}", "data.strict=true",
                 "trainer.max_steps=2", "trainer.eval_every_steps=0"]:  # fmt: skip
        args += ["--set", item]
    result = run_cli(*args)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "lmscale: error:" in line]
    assert errors and all(
        re.fullmatch(
            r"lmscale: error: shard \S+/train-\d{6}\.tar: sha256 does not match the manifest \(data\.strict is set\)", e
        )
        for e in errors
    ), result.stderr[-3000:]


def test_a_skipped_corrupt_shard_is_reported_in_the_metrics(dataset: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    victim = damage_first_training_shard(dataset, broken)
    run_dir = tmp_path / "run"
    train(run_dir, broken, 2, "trainer.max_steps=2")
    train(run_dir, broken, 2, "trainer.max_steps=3")  # the count is the run's: kept by the checkpoint
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if r.get("event") == "skipped_shards"]
    assert len(events) == 1 and events[0]["step"] == 1 and events[0]["total"] == 1
    assert [Path(s).name for s in events[0]["shards"]] == [victim]
    assert [r["skipped_shards"] for r in records if "loss" in r] == [1, 1, 1]
    state = json.loads((run_dir / "checkpoints" / "step_00000003" / "lmscale_state.json").read_text())
    assert [Path(s).name for s in state["skipped_shards"]] == [victim]
