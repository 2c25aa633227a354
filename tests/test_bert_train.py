"""BERT pretraining on the GPT path: real DeepSpeed ranks over gloo, masked-LM shards, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import config_args, error_lines, metrics_records, run_cli, run_here, sets

pytestmark = pytest.mark.slow

BERT_TINY = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "trainer.micro_batch_size=8",
    "trainer.grad_accum_steps=2", "trainer.eval_batches=2", "trainer.eval_every_steps=10", "trainer.max_steps=20",
    "schedule.total_steps=20", "schedule.warmup_steps=4", "optim.lr=3e-3", "checkpoint.every_steps=10",
    "logging.every_steps=1", "logging.wandb.mode=disabled", "logging.peak_flops=1e11",
]  # fmt: skip


def bert_args(dataset: Path, run_dir: Path, *overrides: str) -> list[str]:
    return config_args("configs/bert-tiny.yaml", 2, BERT_TINY, dataset, run_dir) + sets(overrides)


def step_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics_records(run_dir) if "loss" in r}


def pretrain(dataset: Path, run_dir: Path, stage: int, *overrides: str) -> list[str]:
    args = bert_args(dataset, run_dir, f"zero.stage={stage}", *overrides)
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return args


@pytest.fixture(scope="module")
def bert_run(mlm_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 steps of bert-tiny's shape, smaller, on 2 ranks under ZeRO-2, checkpoints at steps 10 and 20."""
    run_dir = tmp_path_factory.mktemp("bert") / "run"
    pretrain(mlm_dataset, run_dir, 2)
    return run_dir


def test_bert_pretrains_under_zero_2_and_a_resume_masks_and_drops_out_alike(
    mlm_dataset: Path, bert_run: Path, tmp_path: Path
) -> None:
    steps = step_records(bert_run)
    assert sorted(steps) == list(range(1, 21))
    first, last = [steps[s]["loss"] for s in (1, 2, 3)], [steps[s]["loss"] for s in (18, 19, 20)]
    assert sum(last) / 3 < sum(first) / 3 - 0.5, (first, last)  # starts near ln(600) = 6.4
    assert all(0.0 <= r["mlm_accuracy"] <= 1.0 for r in steps.values())
    assert steps[20]["mlm_accuracy"] > steps[1]["mlm_accuracy"]
    assert 0.0 < steps[20]["val_mlm_accuracy"] < 1.0 and steps[20]["val_loss"] < steps[10]["val_loss"]
    # Masks come from the sample's stream position and dropout from each rank's saved state: steps 11-20
    # trained again from the step-10 checkpoint repeat the uninterrupted run bit for bit.
    run_dir = tmp_path / "run"
    shutil.copytree(bert_run, run_dir)
    again = run_cli(*bert_args(mlm_dataset, run_dir, "zero.stage=2"), "--resume", "step_00000010")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = step_records(run_dir)
    assert [resumed[s]["loss"] for s in range(11, 21)] == [steps[s]["loss"] for s in range(11, 21)]
    assert [resumed[s]["mlm_accuracy"] for s in range(11, 21)] == [steps[s]["mlm_accuracy"] for s in range(11, 21)]


def test_bert_pretrains_under_zero_3(mlm_dataset: Path, tmp_path: Path) -> None:
    """ZeRO-3 partitions the tied embedding and decoder: the loss falls as under ZeRO-2 (exact resume under
    ZeRO-3 is checked by the GPT tests, on the same path)."""
    run_dir = tmp_path / "run"
    pretrain(mlm_dataset, run_dir, 3, "trainer.max_steps=12", "checkpoint.every_steps=0", "trainer.eval_every_steps=0")
    steps = step_records(run_dir)
    assert sorted(steps) == list(range(1, 13)) and steps[12]["loss"] < steps[1]["loss"] - 0.4, steps


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


def test_a_pretrained_bert_exports_to_a_fill_mask_pipeline_and_scores_on_held_out_text(
    bert_run: Path, mlm_dataset: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForMaskedLM, pipeline

    out = tmp_path / "exported"
    result = run_here("export", str(bert_run), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BertForMaskedLM" in result.stdout
    assert type(AutoModelForMaskedLM.from_pretrained(out)).__name__ == "BertForMaskedLM"
    filled = pipeline("fill-mask", model=str(out), top_k=5)("return the [MASK] of the object.")
    assert len(filled) == 5 and all(0.0 < f["score"] < 1.0 for f in filled)
    # The export and the run score the validation split alike (the same weights, the same seeded masks).
    scored = [run_here("eval", str(model), "--data", str(mlm_dataset)) for model in (out, bert_run)]
    assert all(r.returncode == 0 for r in scored), scored[0].stderr[-2000:] + scored[1].stderr[-2000:]
    assert scored[0].stdout == scored[1].stdout
    loss, accuracy = (float(scored[0].stdout.split()[i]) for i in (1, 3))
    assert scored[0].stdout.split()[2] == "mlm_accuracy" and 0.0 < accuracy < 1.0 and loss < 6.0
    text = run_here("eval", str(out), "--data", str(corpus_dir), "--max-batches", "4")
    assert text.returncode == 0 and "masked tokens, 0.15 masked)" in text.stdout, text.stderr[-2000:]


FINETUNE = [
    "trainer.max_steps=80", "schedule.total_steps=80", "schedule.warmup_steps=6", "trainer.eval_every_steps=20",
    "optim.lr=2e-3", "trainer.micro_batch_size=16", "logging.every_steps=5",
    "logging.wandb.mode=disabled", "logging.peak_flops=1e11",
]  # fmt: skip


def finetune_args(run_dir: Path, init_from: Path, task: tuple[Path, Path], *overrides: str) -> list[str]:
    args = ["finetune", "configs/bert-tiny-cls.yaml", "--nproc", "2"]
    sets = [f"finetune.train={task[0]}", f"finetune.validation={task[1]}", f"model.init_from={init_from}",
            f"run.dir={run_dir}", *FINETUNE, *overrides]  # fmt: skip
    for item in sets:
        args += ["--set", item]
    return args


def test_a_pretrained_run_fine_tunes_into_a_classifier_well_above_chance(
    bert_run: Path, classification_task: tuple[Path, Path], tmp_path: Path
) -> None:
    from transformers import AutoConfig, pipeline

    run_dir = tmp_path / "cls"
    result = run_cli(*finetune_args(run_dir, bert_run, classification_task))
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics_records(run_dir)
    scores = {r["step"]: r for r in records if "val_accuracy" in r}
    assert sorted(scores) == [20, 40, 60, 80]
    best_step = max(scores, key=lambda s: scores[s]["val_accuracy"])
    assert scores[best_step]["val_accuracy"] >= 0.8, scores  # two balanced classes: chance is 0.5
    assert 0.0 < scores[best_step]["val_macro_f1"] <= 1.0
    best = [r for r in records if r.get("event") == "checkpoint" and r.get("best")]
    assert best[-1]["step"] == min(s for s in scores if scores[s]["val_accuracy"] == scores[best_step]["val_accuracy"])
    assert (run_dir / "checkpoints" / "best").read_text() == f"step_{best[-1]['step']:08d}"
    report = run_here("report", str(run_dir))
    assert f"best val acc     {scores[best_step]['val_accuracy']:.4f} (step {best[-1]['step']})" in report.stdout

    out = tmp_path / "exported"
    exported = run_here("export", str(run_dir), "--output", str(out))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert f"step_{best[-1]['step']:08d}" in exported.stdout and "BertForSequenceClassification" in exported.stdout
    config = AutoConfig.from_pretrained(out)
    assert config.id2label == {0: "concurrency", 1: "formats"}
    rows = [json.loads(line) for line in classification_task[1].read_text().splitlines()]
    classify = pipeline("text-classification", model=str(out), truncation=True, max_length=64)
    predicted = [p["label"] for p in classify([r["text"] for r in rows])]
    agreement = sum(p == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows)
    assert agreement == pytest.approx(scores[best_step]["val_accuracy"], abs=1e-9)
    scored = run_here("eval", str(out), "--data", str(classification_task[1]))
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert scored.stdout.startswith(f"accuracy {agreement:.4f}  macro_f1 ")

    # A cluster job fine-tunes the same way: submit prepares the task's data into the run directory first.
    queued = tmp_path / "queued"
    args = finetune_args(queued, bert_run, classification_task)[2:]  # its --nproc and --set values
    submitted = run_cli("submit", "configs/bert-tiny-cls.yaml", "--backend", "slurm", *args, "--dry-run")
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    assert "#   all checks pass" in submitted.stdout and (queued / "labelled" / "manifest.json").is_file()


def test_fine_tuning_refuses_what_it_cannot_train_in_one_line(
    bert_run: Path, classification_task: tuple[Path, Path], tmp_path: Path
) -> None:
    as_pretraining = run_cli("train", "configs/bert-tiny-cls.yaml", "--set", f"run.dir={tmp_path / 'a'}")
    assert as_pretraining.returncode == 2
    assert error_lines(as_pretraining.stderr) == [
        "lmscale: error: configs/bert-tiny-cls.yaml: a fine-tuning config (with a finetune section) runs with "
        "`lmscale finetune`"
    ]
    validation = tmp_path / "validation.csv"
    validation.write_text("text,label\nsome text,concurrency\nmore text,networking\n")
    unknown = run_cli(*finetune_args(tmp_path / "b", bert_run, (classification_task[0], validation)))
    assert unknown.returncode == 2
    assert error_lines(unknown.stderr) == [
        f"lmscale: error: {validation}:3: label 'networking' is not one of the training labels (concurrency, formats)"
    ]
    wider = run_cli(*finetune_args(tmp_path / "c", bert_run, classification_task, "model.d_model=128"))
    assert error_lines(wider.stderr) == [
        f"lmscale: error: model.d_model: 128 here, 64 in the pretrained model {bert_run}"
    ]
