"""The trainer on 2 gloo ranks spawned from pytest (``tests.distributed``), started by the rank's own start-up
(``lmscale.train.main.start_trainer``) and driven directly: resume, the ranks' stop agreement and rollback, with
the command line out of the way (``test_train_distributed`` has the runs a user starts)."""

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from launcher.parser import build_parser
from launcher.train import train
from lmscale.job.exit_codes import EXIT_PREEMPTED

from .conftest import REPO, TINY_OVERRIDES, metrics_records
from .distributed import run_ranks

pytestmark = pytest.mark.slow


def prepare(run_dir: Path, dataset: Path, *overrides: str) -> Path:
    """The run directory as ``lmscale train --prepare-only`` writes it, for 2 ranks (in this process)."""
    argv = ["train", str(REPO / "configs" / "gpt-tiny.yaml"), "--nproc", "2", "--prepare-only"]
    for item in [*TINY_OVERRIDES, f"data.path={dataset}", f"run.dir={run_dir}", "trainer.eval_every_steps=0",
                 "schedule.warmup_steps=0", *overrides]:  # fmt: skip
        argv += ["--set", item]
    assert train(build_parser().parse_args(argv)) == 0
    return run_dir


def fit(
    rank: int, run_dir: Path, stop: tuple[int, int] | None = None, poison: tuple[int, int] | None = None
) -> dict[str, Any]:
    """One rank of the run: its start-up, then ``fit``. ``stop`` = (rank, step): that rank alone gets SIGUSR1
    before that step. ``poison`` = (rank, step): that rank's loss of that step is NaN."""
    from lmscale.job import topology
    from lmscale.job.signals import StopRequest
    from lmscale.train.main import start_trainer

    trainer = start_trainer(topology.detect(), run_dir, "auto", StopRequest())
    step_once, forward_once = trainer.train_step, trainer.forward

    def train_step() -> Any:
        if stop is not None and stop == (rank, trainer.state.step + 1):
            os.kill(os.getpid(), signal.SIGUSR1)
        return step_once()

    def forward(inputs: Any, hits: Any) -> Any:
        loss = forward_once(inputs, hits)
        return loss * float("nan") if poison == (rank, trainer.state.step + 1) else loss

    trainer.train_step, trainer.forward = train_step, forward  # type: ignore[method-assign]
    code = 1
    try:
        code = trainer.fit()
    finally:
        trainer.close()
        trainer.logger.close(code)
    return {"code": code, "state": trainer.state.to_dict(), "rollbacks": trainer.rollbacks}


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_records(run_dir) if "loss" in r}


def test_zero_1_resumes_bit_for_bit_with_dropout(dataset: Path, tmp_path: Path) -> None:
    """Stage 1's optimizer partitions are saved and restored per rank, and each rank's random state with them."""
    common = ["zero.stage=1", "model.dropout=0.1", "schedule.total_steps=6", "checkpoint.every_steps=3"]
    full = prepare(tmp_path / "full", dataset, "trainer.max_steps=6", *common)
    assert [r["code"] for r in run_ranks(fit, full)] == [0, 0]
    part = prepare(tmp_path / "part", dataset, "trainer.max_steps=3", *common)
    run_ranks(fit, part)
    prepare(part, dataset, "trainer.max_steps=6", *common)
    results = run_ranks(fit, part)
    assert losses(part) == losses(full) and sorted(losses(full)) == list(range(1, 7))
    assert [r["state"]["step"] for r in results] == [6, 6] and results[0]["state"]["resumes"] == 1
    saved = json.loads((part / "checkpoints" / "step_00000006" / "lmscale_state.json").read_text())
    assert {k: saved[k] for k in results[0]["state"]} == results[0]["state"]  # the state's one schema


def test_a_stop_asked_of_one_rank_is_agreed_and_saved_by_every_rank(dataset: Path, tmp_path: Path) -> None:
    run_dir = prepare(tmp_path / "run", dataset, "trainer.max_steps=8", "checkpoint.every_steps=0")
    results = run_ranks(fit, run_dir, (1, 3))
    # Rank 1's request is read at step 3's sync: both ranks save step 3 and stop as preempted.
    assert [r["code"] for r in results] == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    assert [r["state"]["step"] for r in results] == [3, 3]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    events = [(r["step"], r["event"]) for r in metrics_records(run_dir) if r.get("event") not in (None, "start")]
    assert events == [(3, "checkpoint"), (3, "preempted")]


def test_a_non_finite_loss_on_one_rank_rolls_every_rank_back(dataset: Path, tmp_path: Path) -> None:
    run_dir = prepare(tmp_path / "run", dataset, "trainer.max_steps=6", "checkpoint.every_steps=2",
                      "schedule.total_steps=6")  # fmt: skip
    results = run_ranks(fit, run_dir, None, (1, 5))
    assert [r["code"] for r in results] == [0, 0] and [r["rollbacks"] for r in results] == [1, 1]
    # Training goes on from the data position it reached: the batches since the checkpoint are skipped.
    assert [r["state"]["samples_seen"] for r in results] == [6 * 16, 6 * 16]
    records = metrics_records(run_dir)
    rollback = next(r for r in records if r.get("event") == "rollback")
    assert (rollback["step"], rollback["tag"], rollback["to_step"], rollback["skipped_samples"]) == (
        5, "step_00000004", 4, 16)  # fmt: skip
    loss = losses(run_dir)
    assert loss[5] is None and math.isfinite(loss[6]) and abs(loss[6] - loss[4]) < 0.2
