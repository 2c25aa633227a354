"""T5 span-corruption pretraining on the same path as GPT and BERT: real DeepSpeed ranks over gloo, shards
prepared with a Unigram tokenizer and T5's sentinels, exact resume, export to transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmscale.data.manifest import read_manifest
from lmscale.data.shard import PrepareOptions, prepare
from lmscale.data.span_corruption import Lengths
from lmscale.errors import UsageError

from .conftest import config_args, metrics_records, run_cli, run_here, sets

pytestmark = pytest.mark.slow

T5_TINY = [
    "model.d_model=64", "model.n_layers=2", "model.n_decoder_layers=2", "model.n_heads=4", "model.d_ff=128",
    "model.dropout=0.1", "trainer.micro_batch_size=8", "trainer.grad_accum_steps=2", "trainer.eval_batches=1",
    "trainer.eval_every_steps=10", "trainer.max_steps=20", "schedule.total_steps=20", "schedule.warmup_steps=4",
    "optim.lr=3e-3", "checkpoint.every_steps=10", "logging.every_steps=1", "logging.wandb.mode=disabled",
    "logging.peak_flops=1e11",
]  # fmt: skip


def t5_args(dataset: Path, run_dir: Path, *overrides: str) -> list[str]:
    return config_args("configs/t5-tiny.yaml", 2, T5_TINY, dataset, run_dir) + sets(overrides)


def step_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics_records(run_dir) if "loss" in r}


def test_prepare_writes_raw_samples_corrupted_to_the_inputs_length(t5_dataset: Path, corpus_dir: Path) -> None:
    manifest = read_manifest(t5_dataset)
    assert manifest.format == "span_corruption" and manifest.tokenizer_kind == "unigram"
    assert manifest.sample_len == Lengths.for_inputs(64).raw == 70
    assert {"<pad>", "</s>", "<unk>", "<extra_id_0>", "<extra_id_99>"} <= set(manifest.special_tokens)
    with pytest.raises(UsageError, match="^--format span_corruption: needs a unigram tokenizer"):
        prepare(PrepareOptions(inputs=[str(corpus_dir)], output=t5_dataset.parent / "x", format="span_corruption"))


def test_t5_pretrains_under_zero_2_resumes_exactly_and_exports_to_transformers(
    t5_dataset: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(*t5_args(t5_dataset, run_dir, "zero.stage=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    steps = step_records(run_dir)
    assert sorted(steps) == list(range(1, 21))
    first, last = [steps[s]["loss"] for s in (1, 2, 3)], [steps[s]["loss"] for s in (18, 19, 20)]
    assert sum(last) / 3 < sum(first) / 3 - 1.0, (first, last)
    assert steps[20]["val_loss"] < steps[10]["val_loss"]
    # Spans come from the samples' stream positions and dropout from each rank's saved state: steps 11-20
    # trained again from the step-10 checkpoint repeat the uninterrupted run bit for bit.
    again_dir = tmp_path / "again"
    shutil.copytree(run_dir, again_dir)
    again = run_cli(*t5_args(t5_dataset, again_dir, "zero.stage=2"), "--resume", "step_00000010")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [step_records(again_dir)[s]["loss"] for s in range(11, 21)] == [steps[s]["loss"] for s in range(11, 21)]

    export = tmp_path / "export"
    exported = run_here("export", str(run_dir), "--output", str(export))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "T5ForConditionalGeneration" in exported.stdout and "transformers" not in exported.stderr
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from lmscale.hf.directory import load_hf_model

    tok = AutoTokenizer.from_pretrained(str(export))
    theirs = AutoModelForSeq2SeqLM.from_pretrained(str(export)).eval()
    config = json.loads((export / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["decoder_start_token_id"] == tok.pad_token_id == 0
    encoded = tok(["Return the <extra_id_0> of a list.", "Open a file."], padding=True, return_tensors="pt")
    assert encoded.input_ids[0, -1] == tok.eos_token_id and tok.convert_ids_to_tokens(3) == "<extra_id_0>"
    ours, _ = load_hf_model(export)
    decoder_idx = torch.tensor([[0, 3, 17, 4], [0, 3, 9, 1]])
    with torch.no_grad():
        reference = theirs(**encoded, decoder_input_ids=decoder_idx).logits
        logits, _ = ours(encoded.input_ids, pad_mask=encoded.attention_mask.bool(), decoder_idx=decoder_idx)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    # `lmscale generate` on the export: transformers' beam search output, as text.
    text = "Return the <extra_id_0> of a list."
    generated = run_here("generate", str(export), "--input", text, "--num-beams", "3", "--max-new-tokens", "8")
    assert generated.returncode == 0, generated.stderr[-3000:]
    beams = theirs.generate(**tok(text, return_tensors="pt"), num_beams=3, max_new_tokens=8)[0]
    expected = tok.decode([t for t in beams.tolist()[1:] if t not in (tok.eos_token_id, tok.pad_token_id)])
    assert generated.stdout.splitlines()[:2] == [f"=== {text}", expected]
    # The loss on the validation split's corrupted samples, from the run and from its export alike.
    from_run = run_here("eval", str(run_dir), "--data", str(t5_dataset))
    from_export = run_here("eval", str(export), "--data", str(t5_dataset))
    assert from_run.returncode == 0, from_run.stderr[-3000:]
    assert from_run.stdout == from_export.stdout and "target tokens" in from_run.stdout
    assert float(from_run.stdout.split()[1]) == pytest.approx(steps[20]["val_loss"], abs=0.3)


@pytest.mark.parametrize("stage", [1, 3])
def test_t5_pretrains_under_zero_1_and_3(stage: int, t5_dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(*t5_args(t5_dataset, run_dir, f"zero.stage={stage}", "trainer.max_steps=12", "checkpoint.every_steps=0",
                              "trainer.eval_every_steps=0"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    steps = step_records(run_dir)
    assert sorted(steps) == list(range(1, 13)) and steps[12]["loss"] < steps[1]["loss"] - 0.5, steps
