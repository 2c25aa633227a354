"""BERT pretraining on the GPT path: real DeepSpeed ranks over gloo, masked-LM shards, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import error_lines, metrics_records, run_cli

pytestmark = pytest.mark.slow

BERT_TINY = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "trainer.micro_batch_size=8",
    "trainer.grad_accum_steps=2", "trainer.eval_batches=2", "trainer.eval_every_steps=10", "trainer.max_steps=20",
    "schedule.total_steps=20", "schedule.warmup_steps=4", "optim.lr=3e-3", "checkpoint.every_steps=10",
    "logging.every_steps=1", "logging.wandb.mode=disabled",
]  # fmt: skip


def bert_args(dataset: Path, run_dir: Path, *overrides: str) -> list[str]:
    args = ["train", "configs/bert-tiny.yaml", "--nproc", "2"]
    for item in [*BERT_TINY, f"data.path={dataset}", f"run.dir={run_dir}", *overrides]:
        args += ["--set", item]
    return args


def step_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics_records(run_dir) if "loss" in r}


@pytest.mark.parametrize("stage", [2, 3])
def test_bert_pretrains_under_zero_and_a_resume_masks_and_drops_out_alike(
    stage: int, mlm_dataset: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = bert_args(mlm_dataset, run_dir, f"zero.stage={stage}")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = step_records(run_dir)
    assert sorted(steps) == list(range(1, 21))
    first, last = [steps[s]["loss"] for s in (1, 2, 3)], [steps[s]["loss"] for s in (18, 19, 20)]
    assert sum(last) / 3 < sum(first) / 3 - 0.5, (first, last)  # starts near ln(600) = 6.4
    assert all(0.0 <= r["mlm_accuracy"] <= 1.0 for r in steps.values())
    assert steps[20]["mlm_accuracy"] > steps[1]["mlm_accuracy"]
    assert 0.0 < steps[20]["val_mlm_accuracy"] < 1.0 and steps[20]["val_loss"] < steps[10]["val_loss"]
    # Masks come from the sample's stream position and dropout from each rank's saved state: steps 11-20
    # trained again from the step-10 checkpoint repeat the uninterrupted run bit for bit.
    again = run_cli(*args, "--resume", "step_00000010")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = step_records(run_dir)
    assert [resumed[s]["loss"] for s in range(11, 21)] == [steps[s]["loss"] for s in range(11, 21)]
    assert [resumed[s]["mlm_accuracy"] for s in range(11, 21)] == [steps[s]["mlm_accuracy"] for s in range(11, 21)]


def test_a_model_family_refuses_shards_of_the_other_format(dataset: Path, mlm_dataset: Path, tmp_path: Path) -> None:
    bert = run_cli(*bert_args(dataset, tmp_path / "bert"))
    assert bert.returncode == 2
    assert error_lines(bert.stderr) == [
        f"lmscale: error: data.path: {dataset} holds causal shards, but model.family bert trains on mlm shards "
        "(prepare the data with `lmscale prepare --format mlm`)"
    ]
    gpt = run_cli("train", "configs/gpt-tiny.yaml", "--set", f"data.path={mlm_dataset}", "--set",
                  f"run.dir={tmp_path / 'gpt'}")  # fmt: skip
    assert gpt.returncode == 2
    assert error_lines(gpt.stderr) == [
        f"lmscale: error: data.path: {mlm_dataset} holds mlm shards, but model.family gpt trains on causal shards "
        "(prepare the data with `lmscale prepare --format causal`)"
    ]
