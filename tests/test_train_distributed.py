"""Real DeepSpeed engines on 2 CPU ranks over gloo, started by the CLI as a user would."""

import json
import re
import shutil
from pathlib import Path

import psutil
import pytest

from lmscale.train.checkpoint import LATEST

from .conftest import TINY_OVERRIDES, damage_first_training_shard, keys_per_step, run_cli

pytestmark = pytest.mark.slow


def train(run_dir: Path, dataset: Path, nproc: int, *overrides: str) -> None:
    args = ["train", "configs/gpt-tiny.yaml", "--nproc", str(nproc)]
    for item in [*TINY_OVERRIDES, f"data.path={dataset}", f"run.dir={run_dir}", "data.log_sample_keys=true",
                 "trainer.eval_every_steps=4", "schedule.total_steps=8", *overrides]:  # fmt: skip
        args += ["--set", item]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-4000:]


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


# ZeRO-1 trains through every stage of the GPU check's CPU run (test_gpu_check); its resume is stage 2's
# with unpartitioned gradients.
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_trains_and_resumes_exactly(stage: int, dataset: Path, tmp_path: Path) -> None:
    # Dropout makes exactness depend on each rank's random state, restored as the last thing before a step.
    common = [f"zero.stage={stage}", "checkpoint.every_steps=4", "model.dropout=0.1"]
    full, part = tmp_path / "full", tmp_path / "part"
    shm_before = set(Path("/dev/shm").glob("deepspeed_*"))
    train(full, dataset, 2, "trainer.max_steps=8", *common)
    assert set(Path("/dev/shm").glob("deepspeed_*")) == shm_before  # no shared memory outlives the run
    train(part, dataset, 2, "trainer.max_steps=4", *common)
    assert (part / "checkpoints" / LATEST).read_text() == "step_00000004"
    train(part, dataset, 2, "trainer.max_steps=8", *common)

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
    for world in (1, 3):
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


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(dataset: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO

    run_dir = tmp_path / "run"
    sets = [*TINY_OVERRIDES, f"data.path={dataset}", f"run.dir={run_dir}", "trainer.eval_every_steps=0",
            "checkpoint.every_steps=0", "data.num_workers=1", "schedule.total_steps=1000"]  # fmt: skip
    args = [sys.executable, "-m", "launcher", "train", "configs/gpt-tiny.yaml", "--nproc", "2"]
    args += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen([*args, "--set", "trainer.max_steps=1000"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(losses(run_dir)) >= 3:
            break
        time.sleep(0.2)
    # As Slurm ends a job: SIGTERM to every process at once (launcher, ranks, loader workers). The launcher
    # must not return before its ranks, which save and exit with 3.
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    ranks = [p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]
    assert not ranks, "the launcher returned before its ranks"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    stopped = next(r for r in records if r.get("event") == "preempted")
    tag = f"step_{stopped['step']:08d}"
    assert (run_dir / "checkpoints" / LATEST).read_text() == tag
    assert 3 <= stopped["step"] < 1000
    resumed = subprocess.run([*args, "--set", f"trainer.max_steps={stopped['step'] + 2}"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(losses(run_dir)) == list(range(1, stopped["step"] + 3))


def test_non_finite_steps_roll_back_to_the_last_checkpoint(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(run_dir, dataset, 2, "trainer.max_steps=2", "checkpoint.every_steps=2", "schedule.warmup_steps=0")
    # A learning rate of 1e30 wrecks the weights in one update, so the next step's loss is not finite.
    args = ["train", "configs/gpt-tiny.yaml", "--nproc", "2"]
    for item in [*TINY_OVERRIDES, f"data.path={dataset}", f"run.dir={run_dir}", "trainer.eval_every_steps=0",
                 "schedule.total_steps=8", "schedule.warmup_steps=0", "checkpoint.every_steps=0",
                 "trainer.max_steps=8", "optim.lr=1e30", "trainer.max_rollbacks=2"]:  # fmt: skip
        args += ["--set", item]
    result = run_cli(*args)
    assert result.returncode == 1
    assert "training diverged (trainer.max_rollbacks=2 reached)" in result.stderr.splitlines()[-1]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = [(r["step"], r["event"]) for r in records if "event" in r]
    assert events == [(0, "start"), (2, "checkpoint"), (2, "start"), (2, "resume"), (4, "skipped_step"), (4, "rollback"),
                      (6, "skipped_step"), (6, "rollback"), (8, "skipped_step")]  # fmt: skip
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    assert [(r["tag"], r["to_step"], r["skipped_samples"]) for r in rollbacks] == [
        ("step_00000002", 2, 2 * 16),
        ("step_00000002", 2, 4 * 16),
    ]
    loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert loss[4] is None and loss[6] is None and loss[8] is None  # not finite: written as null
    # After each rollback the step-2 weights are back: the loss is that of a healthy model again.
    assert abs(loss[5] - loss[3]) < 0.2 and abs(loss[7] - loss[3]) < 0.2
    assert (run_dir / "checkpoints" / LATEST).read_text() == "step_00000002"


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
