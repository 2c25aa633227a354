"""Sequence-to-sequence fine-tuning of a pretrained T5 for translation on 2 CPU ranks: English to German from
the machine's gettext catalogs, validation that writes every pair's translation and scores it with sacrebleu,
the best checkpoint kept by BLEU, and the export's transformers outputs scored the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import bleu_of, error_lines, first_pairs, metrics_records, run_cli, run_here, sets

pytestmark = pytest.mark.slow

PRETRAIN = [
    "model.n_layers=2", "trainer.max_steps=10", "trainer.eval_every_steps=0", "checkpoint.every_steps=10",
    "logging.wandb.mode=disabled",
]  # fmt: skip
"""A short span-corruption pretraining: at this size and corpus, longer pretraining fine-tunes worse in the
same steps (BLEU at 1,500 steps: 2.4 after 10 pretraining steps, 1.1 after 100, 0.8 to 1.3 after 300)."""
FINETUNE = ["trainer.max_steps=1000", "trainer.eval_every_steps=500", "logging.every_steps=100",
            "logging.wandb.mode=disabled"]  # fmt: skip
"""configs/t5-tiny-translate.yaml's settings (sources and targets of 64 tokens at most, 4 beams, lr 3e-3, no
dropout) for 1,000 steps: BLEU 3.3 on VALIDATION_PAIRS (1.5 at 500 steps; copying the source scores 1.1)."""
BUDGET = 64
"""What validation may generate: the targets' bound, finetune.max_target_length."""
VALIDATION_PAIRS = 200
"""The first half of the task's validation pairs: each validation translates every pair with 4 beams."""


@pytest.fixture(scope="module")
def translation(translation_corpus: dict[str, Path]) -> dict[str, Path]:
    """The translation pairs, and a T5 pretrained (span corruption, PRETRAIN) on their texts."""
    pretrained = translation_corpus["span_corruption"].parent / "t5"
    pretrain = ["train", "configs/t5-tiny.yaml", "--nproc", "2"]
    data = f"data.path={translation_corpus['span_corruption']}"
    result = run_cli(*pretrain, *sets([*PRETRAIN, data, f"run.dir={pretrained}"]))
    assert result.returncode == 0, result.stderr[-3000:]
    return {**translation_corpus, "pretrained": pretrained}


def finetune_args(task: dict[str, Path], run_dir: Path, *overrides: str, validation: Path | None = None) -> list[str]:
    return ["finetune", "configs/t5-tiny-translate.yaml", "--nproc", "2", *sets([
        f"finetune.train={task['train']}", f"finetune.validation={validation or task['validation']}",
        f"model.init_from={task['pretrained']}", f"run.dir={run_dir}", *FINETUNE, *overrides])]  # fmt: skip


def test_a_pretrained_t5_fine_tunes_to_translate_and_its_bleu_is_sacrebleu_over_transformers_outputs(
    translation: dict[str, Path], tmp_path: Path
) -> None:
    import sacrebleu
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    validation = first_pairs(translation["validation"], VALIDATION_PAIRS, tmp_path)
    rows = [json.loads(line) for line in validation.read_text().splitlines()]
    sources, references = [r["source"] for r in rows], [r["target"] for r in rows]
    copying = sacrebleu.corpus_bleu(sources, [references]).score
    before_dir = tmp_path / "before"
    assert run_here("export", str(translation["pretrained"]), "--output", str(before_dir)).returncode == 0
    # Greedy and batched, to save suite time: the model before fine-tuning writes every output to the budget
    # (with 4 beams, one pair at a time, it scored 0 too).
    before = bleu_of(run_here("eval", str(before_dir), "--data", str(validation), "--batch-size", "16",
                             "--max-new-tokens", str(BUDGET)))  # fmt: skip

    run_dir = tmp_path / "ft"
    result = run_cli(*finetune_args(translation, run_dir, validation=validation))
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics_records(run_dir)
    scores = {r["step"]: r for r in records if "val_bleu" in r}
    assert sorted(scores) == [500, 1000]
    losses = [scores[s]["val_loss"] for s in sorted(scores)]
    assert losses == sorted(losses, reverse=True), losses
    best_step = min(scores, key=lambda s: (-scores[s]["val_bleu"], s))
    best = scores[best_step]["val_bleu"]
    assert best > max(before, copying), (best, before, copying, scores)
    assert 0 < scores[best_step]["val_chrf"] <= 100
    assert (run_dir / "checkpoints" / "best").read_text() == f"step_{best_step:08d}"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["finetune"]["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert config["model"]["data_format"] == "seq2seq" and config["finetune"]["num_beams"] == 4
    report = run_here("report", str(run_dir))
    assert f"best val BLEU    {best:.4f} (step {best_step})" in report.stdout, report.stdout

    # The export holds the best checkpoint; transformers' beam search over it scores what validation scored.
    export = tmp_path / "export"
    exported = run_here("export", str(run_dir), "--output", str(export))
    assert exported.returncode == 0 and f"step_{best_step:08d}" in exported.stdout, exported.stderr[-2000:]
    tok = AutoTokenizer.from_pretrained(str(export))
    theirs = AutoModelForSeq2SeqLM.from_pretrained(str(export)).eval()
    outputs: list[str] = []
    with torch.no_grad():
        for start in range(0, len(sources), 50):  # padded batches: what one source at a time writes, in a third
            batch = tok(sources[start : start + 50], return_tensors="pt", padding=True)
            written = theirs.generate(**batch, num_beams=4, max_new_tokens=BUDGET, do_sample=False)
            outputs += tok.batch_decode(written, skip_special_tokens=True)
    assert sacrebleu.corpus_bleu(outputs, [references]).score == pytest.approx(best, abs=1e-9)


def test_under_zero_3_every_rank_generates_its_share_and_validation_equals_eval(
    translation: dict[str, Path], tmp_path: Path
) -> None:
    """37 validation pairs on 2 ranks of 16: the last micro-batches are filled with repeats, and the ranks'
    batches finish decoding at different steps, while ZeRO-3 needs both ranks in every forward pass."""
    validation = first_pairs(translation["validation"], 37, tmp_path)
    run_dir = tmp_path / "z3"
    result = run_cli(*finetune_args(translation, run_dir, "zero.stage=3", "trainer.max_steps=40",
                                    "trainer.eval_every_steps=20", "finetune.num_beams=1", validation=validation))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    scores = {r["step"]: r for r in metrics_records(run_dir) if "val_bleu" in r}
    assert sorted(scores) == [20, 40]
    export = tmp_path / "export"
    assert run_here("export", str(run_dir), "--output", str(export), "--checkpoint", "step_00000040").returncode == 0
    scored = run_cli("eval", str(export), "--data", str(validation), "--batch-size", "1")  # see run_here
    assert bleu_of(scored) == round(scores[40]["val_bleu"], 2)


def test_fine_tuning_refuses_bad_pairs_in_one_line_naming_file_and_line(
    translation: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    long = "Return the list of all the modules found in the path " * 12
    for text, fault in (
        ('{"source": "Open the file", "target": "Datei öffnen"}\n{"source": "Close it"}\n', "2: no 'target'"),
        ('{"source": "Open the file", "target": " "}\n', "1: 'target' is empty"),
        (json.dumps({"source": long, "target": "lang"}) + "\n", "1: the source is "),
    ):
        bad.write_text(text, encoding="utf-8")
        refused = run_cli(*finetune_args(translation, tmp_path / "run", validation=bad))
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert len(error_lines(refused.stderr)) == 1
        assert error_lines(refused.stderr)[0].startswith(f"lmscale: error: {bad}:{fault}"), refused.stderr
    assert not (tmp_path / "run" / "labelled").exists()
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("en,de\nOpen the file,Datei öffnen\n", encoding="utf-8")
    renamed = run_cli(*finetune_args(translation, tmp_path / "csv", validation=csv_file))
    assert error_lines(renamed.stderr) == [f"lmscale: error: {csv_file}: no column 'source' (its columns: en, de)"]
