"""The trainer on 2 gloo ranks spawned from pytest (``tests.distributed``), started by the rank's own start-up
(``lmscale.train.main.start_trainer``) and driven directly: resume, the ranks' stop agreement and rollback, with
the command line out of the way (``test_train_distributed`` has the runs a user starts)."""

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from lmscale.job.exit_codes import EXIT_PREEMPTED

from .conftest import TINY_OVERRIDES, losses, metrics_records
from .distributed import train_ranks

pytestmark = pytest.mark.slow


def train(run_dir: Path, dataset: Path, *overrides: str, **fit_args: Any) -> list[dict[str, Any]]:
    sets = [*TINY_OVERRIDES, f"data.path={dataset}", "trainer.eval_every_steps=0", "schedule.warmup_steps=0",
            *overrides]  # fmt: skip
    return train_ranks(run_dir, 2, sets, **fit_args)


def test_zero_1_resumes_bit_for_bit_with_dropout_and_tensorboard_holds_each_step_once(
    dataset: Path, tmp_path: Path
) -> None:
    """Stage 1's optimizer partitions are saved and restored per rank, and each rank's random state with them:
    a copy of a finished run cut back to its step-3 checkpoint retrains steps 4-6 to the same losses. Its
    TensorBoard files (logging.tensorboard), read back with TensorBoard's own reader, hold each step once:
    the second job purged what the first wrote past its checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["zero.stage=1", "model.dropout=0.1", "schedule.total_steps=6", "checkpoint.every_steps=3",
              "trainer.max_steps=6", "logging.tensorboard=true"]  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    assert [r["code"] for r in train(full, dataset, *common)] == [0, 0]
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_00000006")
    (part / "checkpoints" / "latest").write_text("step_00000003")
    results = train(part, dataset, *common)
    assert losses(part) == losses(full) and sorted(losses(full)) == list(range(1, 7))
    assert [r["state"]["step"] for r in results] == [6, 6] and results[0]["state"]["resumes"] == 1
    saved = json.loads((part / "checkpoints" / "step_00000006" / "lmscale_state.json").read_text())
    assert {k: saved[k] for k in results[0]["state"]} == results[0]["state"]  # the state's one schema

    board = EventAccumulator(str(part / "tensorboard"))
    board.Reload()
    assert len(list((part / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per job
    loss = board.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in loss] == pytest.approx([losses(full)[s] for s in range(1, 7)], rel=1e-6)
    assert [e.step for e in board.Scalars("events/resume")] == [3]
    assert [e.step for e in board.Scalars("events/checkpoint")] == [3, 6]


def test_a_stop_asked_of_one_rank_is_agreed_and_saved_by_every_rank(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    results = train(run_dir, dataset, "trainer.max_steps=8", "checkpoint.every_steps=0", stop=(1, 3))
    # Rank 1's request is read at step 3's sync: both ranks save step 3 and stop as preempted.
    assert [r["code"] for r in results] == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    assert [r["state"]["step"] for r in results] == [3, 3]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    events = [(r["step"], r["event"]) for r in metrics_records(run_dir) if r.get("event") not in (None, "start")]
    assert events == [(3, "checkpoint"), (3, "preempted")]


def test_a_non_finite_loss_on_one_rank_rolls_every_rank_back(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    results = train(run_dir, dataset, "trainer.max_steps=6", "checkpoint.every_steps=2", "schedule.total_steps=6",
                    poison=(1, 5))  # fmt: skip
    assert [r["code"] for r in results] == [0, 0] and [r["rollbacks"] for r in results] == [1, 1]
    # Training goes on from the data position it reached: the batches since the checkpoint are skipped.
    assert [r["state"]["samples_seen"] for r in results] == [6 * 16, 6 * 16]
    records = metrics_records(run_dir)
    rollback = next(r for r in records if r.get("event") == "rollback")
    assert (rollback["step"], rollback["tag"], rollback["to_step"], rollback["skipped_samples"]) == (
        5, "step_00000004", 4, 16)  # fmt: skip
    loss = losses(run_dir)
    assert loss[5] is None and math.isfinite(loss[6]) and abs(loss[6] - loss[4]) < 0.2
