"""The recurrent encoder-decoder with attention on the translation task T5 fine-tunes on (``test_t5_finetune``),
on 2 CPU ranks: pretrained on the same span-corruption shards, fine-tuned under ZeRO-3 through the same
validation (every pair translated, scored with sacrebleu), and exported to lmscale's own directory, which
``lmscale eval`` and ``lmscale generate`` load without DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import bleu_of, first_pairs, metrics_records, run_cli, run_here, sets

pytestmark = pytest.mark.slow

PRETRAIN = ["trainer.max_steps=10", "trainer.eval_every_steps=0", "checkpoint.every_steps=10",
            "logging.wandb.mode=disabled"]  # fmt: skip
"""As short as T5's pretraining in ``test_t5_finetune``."""
FINETUNE = ["trainer.max_steps=500", "trainer.eval_every_steps=250", "logging.every_steps=50", "zero.stage=3",
            "finetune.num_beams=1", "logging.wandb.mode=disabled"]  # fmt: skip
"""configs/rnn-attention-translate.yaml's settings for 500 steps, greedy: BLEU 0.35 and chrF 10.4 on
VALIDATION_PAIRS (BLEU 0.2 at 250 steps), where the model before fine-tuning scores 0 and about 3."""
BUDGET = 64
VALIDATION_PAIRS = 200
"""The pairs ``test_t5_finetune`` validates on."""


@pytest.fixture(scope="module")
def pretrained(translation_corpus: dict[str, Path]) -> Path:
    run_dir = translation_corpus["span_corruption"].parent / "rnn-attention"
    data = f"data.path={translation_corpus['span_corruption']}"
    result = run_cli("train", "configs/rnn-attention.yaml", "--nproc", "2", *sets([*PRETRAIN, data,
                                                                                   f"run.dir={run_dir}"]))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def chrf_of(result: object) -> float:
    return float(result.stdout.split()[3])  # type: ignore[attr-defined]


def test_the_recurrent_encoder_decoder_fine_tunes_to_translate_under_zero_3_and_its_export_scores_the_same(
    translation_corpus: dict[str, Path], pretrained: Path, tmp_path: Path
) -> None:
    validation = first_pairs(translation_corpus["validation"], VALIDATION_PAIRS, tmp_path)
    scoring = ["--data", str(validation), "--num-beams", "1", "--max-new-tokens", str(BUDGET)]
    before_dir = tmp_path / "before"
    assert run_here("export", str(pretrained), "--output", str(before_dir)).returncode == 0
    before = run_here("eval", str(before_dir), *scoring, "--batch-size", "16")  # it writes to the budget: batched
    assert bleu_of(before) < 0.1, before.stdout

    run_dir = tmp_path / "ft"
    result = run_cli("finetune", "configs/rnn-attention-translate.yaml", "--nproc", "2", *sets([
        f"finetune.train={translation_corpus['train']}", f"finetune.validation={validation}",
        f"model.init_from={pretrained}", f"run.dir={run_dir}", *FINETUNE]))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    scores = {r["step"]: r for r in metrics_records(run_dir) if "val_bleu" in r}
    assert sorted(scores) == [250, 500]
    assert scores[500]["val_loss"] < scores[250]["val_loss"], scores
    assert scores[500]["val_bleu"] > bleu_of(before) + 0.1, (scores, before.stdout)
    assert scores[500]["val_chrf"] > 2 * chrf_of(before), (scores, before.stdout)
    assert (run_dir / "checkpoints" / "best").read_text() == "step_00000500"

    # The export is lmscale's own directory (transformers has no class for it): eval and generate load it.
    export = tmp_path / "export"
    exported = run_here("export", str(run_dir), "--output", str(export))
    assert exported.returncode == 0 and "step_00000500" in exported.stdout, exported.stderr[-2000:]
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["lmscale rnn (lstm encoder-decoder, additive attention)"]
    assert config["lmscale_model"]["data_format"] == "seq2seq" and config["lmscale_model"]["encoder_decoder"]
    outputs = tmp_path / "outputs.jsonl"
    # One pair at a time, as tests/test_t5_finetune.py scores its ZeRO-3 export against validation.
    scored = run_cli("eval", str(export), *scoring, "--batch-size", "1", "--outputs", str(outputs))  # see run_here
    assert bleu_of(scored) == round(scores[500]["val_bleu"], 2), scored.stdout
    first = json.loads(outputs.read_text().splitlines()[0])
    written = run_cli("generate", str(export), "--prompt", first["source"], "--max-new-tokens", str(BUDGET))
    assert written.returncode == 0, written.stderr[-2000:]
    assert written.stdout.splitlines()[:2] == [f"=== {first['source']}", first["output"]], written.stdout
