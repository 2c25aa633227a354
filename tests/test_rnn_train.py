"""LSTM and GRU language models on the GPT's shards and training path: real DeepSpeed ranks over gloo, exact
resume, ZeRO-3, and an export that ``lmscale eval`` and ``lmscale generate`` load without DeepSpeed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmscale.data.tokenizer import end_token_id, load_tokenizer
from lmscale.hf.directory import load_hf_model

from .conftest import config_args, metrics_records, run_cli, run_here, sets
from .test_export import validation_loss

pytestmark = pytest.mark.slow

RNN_TINY = [
    "model.d_model=64", "model.n_layers=2", "model.dropout=0.1", "trainer.micro_batch_size=4",
    "trainer.grad_accum_steps=2", "trainer.eval_batches=2", "trainer.eval_every_steps=10", "trainer.max_steps=20",
    "schedule.warmup_steps=4", "optim.lr=1e-2", "checkpoint.every_steps=10", "logging.every_steps=1",
    "logging.wandb.mode=disabled",
]  # fmt: skip


def rnn_args(dataset: Path, run_dir: Path, *overrides: str) -> list[str]:
    return config_args("configs/rnn-tiny.yaml", 2, RNN_TINY, dataset, run_dir) + sets(overrides)


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_records(run_dir) if "loss" in r}


def printed_loss(result: object) -> float:
    """The loss ``lmscale eval`` printed for a causal model."""
    stdout = result.stdout  # type: ignore[attr-defined]
    assert stdout.startswith("loss "), stdout + result.stderr[-2000:]  # type: ignore[attr-defined]
    return float(stdout.split()[1])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_recurrent_lm_trains_resumes_exactly_and_its_export_scores_as_the_run(
    cell: str, dataset: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(*rnn_args(dataset, run_dir, f"model.cell={cell}"))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, 21))
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in (18, 19, 20)]
    assert sum(last) / 3 < sum(first) / 3 - 0.5, (first, last)
    # Dropout draws from each rank's saved random state, so steps 11-20 again from the step-10 checkpoint
    # repeat the uninterrupted run bit for bit.
    again_dir = tmp_path / "again"
    shutil.copytree(run_dir, again_dir)
    again = run_cli(*rnn_args(dataset, again_dir, f"model.cell={cell}"), "--resume", "step_00000010")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [step_losses(again_dir)[s] for s in range(11, 21)] == [losses[s] for s in range(11, 21)]

    export = tmp_path / "export"
    exported = run_here("export", str(run_dir), "--output", str(export))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert f"lmscale rnn ({cell})" in exported.stdout and "logits check: max |diff| 0 " in exported.stdout
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((export / "config.json").read_text())["lmscale_model"]["cell"] == cell
    model, _ = load_hf_model(export)
    val_loss = [r["val_loss"] for r in metrics_records(run_dir) if r.get("step") == 20 and "val_loss" in r]
    assert validation_loss(model, dataset, micro_batch=4, batches=2) == pytest.approx(val_loss[0], abs=1e-5)
    of_export = printed_loss(run_here("eval", str(export), "--data", str(dataset)))
    by_position = run_here("eval", str(run_dir), "--data", str(dataset), "--per-position")
    assert printed_loss(by_position) == of_export, by_position.stdout
    written = json.loads((run_dir / "per_position.json").read_text())
    curve = written["per_position_loss"]
    assert len(curve) == 64 and sum(curve) / 64 == pytest.approx(written["loss"], rel=1e-6)
    assert (run_dir / "per_position.png").stat().st_size > 10_000
    # One token of context predicts worse than the window's later positions.
    assert curve[0] > sum(curve[32:]) / 32
    # Greedy generation carries the state from token to token: it writes what running the whole sequence
    # again at every step picks.
    generated = run_cli(
        "generate", str(export), "--prompt", "Return the", "--max-new-tokens", "8", "--temperature", "0"
    )
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert generated.stdout == "Return the" + greedy_continuation(model, export, "Return the", 8) + "\n"


def greedy_continuation(model: torch.nn.Module, export: Path, prompt: str, new_tokens: int) -> str:
    tok = load_tokenizer(export / "tokenizer.json")
    ids, eot = tok.encode(prompt, add_special_tokens=False).ids, end_token_id(tok)
    written: list[int] = []
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(torch.tensor([ids + written]))[0][0, -1].argmax())
            if token == eot:
                break
            written.append(token)
    return tok.decode(written)


def test_zero_3_partitions_the_fused_lstm_weights_and_trains_as_zero_2(dataset: Path, tmp_path: Path) -> None:
    """nn.LSTM keeps references to its weights for the fused kernel; ZeRO-3 swaps their storage for shards and
    gathers them around each layer's forward, and the run is the ZeRO-2 run."""
    runs = {}
    for stage in (2, 3):
        run_dir = tmp_path / f"zero{stage}"
        result = run_cli(*rnn_args(dataset, run_dir, f"zero.stage={stage}", "trainer.max_steps=10"))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[stage] = step_losses(run_dir)
    assert sorted(runs[3]) == list(range(1, 11))
    assert runs[3] == pytest.approx(runs[2], abs=1e-6)

    # The two runs compared: a table with a row each, and their curves overlaid under a legend.
    report = run_here("report", str(tmp_path / "zero2"), str(tmp_path / "zero3"), "--output", str(tmp_path / "c.png"))
    assert report.returncode == 0, report.stderr[-2000:]
    header, *rows = report.stdout.splitlines()[:3]
    assert header.split("  ")[0] == "run" and [row.split()[0] for row in rows] == ["zero2", "zero3"]
    assert all(row.split()[1] == rows[0].split()[1] and row.split()[1].endswith("M") for row in rows), rows
    assert (tmp_path / "c.png").stat().st_size > 10_000
    from lmscale.report import compared, comparison_figure

    figure = comparison_figure([compared(tmp_path / "zero2"), compared(tmp_path / "zero3")])
    for axes in figure.axes[:2]:
        assert [text.get_text() for text in axes.get_legend().get_texts()] == ["zero2", "zero3"]
