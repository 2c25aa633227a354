"""Throughput/MFU inputs, W&B mode selection, and `lmscale report`."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmscale.errors import UsageError
from lmscale.report import summarize, write_report
from lmscale.train.metrics import wandb_mode
from lmscale.train.peak import gpu_peak_flops, measure_cpu_peak_flops

from .conftest import run_cli, run_here


def test_peak_flops_table_and_cpu_measurement() -> None:
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 156e12
    assert gpu_peak_flops("Tesla V100-SXM2-32GB", "fp32") == 15.7e12  # no TF32 on Volta
    assert gpu_peak_flops("Tesla V100-SXM2-32GB", "bf16") is None
    assert gpu_peak_flops("Mystery GPU", "bf16") is None
    assert 1e8 < measure_cpu_peak_flops(size=256, seconds=0.1, windows=2) < 1e13


def test_wandb_falls_back_to_offline_without_a_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert wandb_mode("online") == "offline"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("online") == "online"


def synthetic_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for step in range(1, 41):
        record = {
            "step": step,
            "loss": 8 - step * 0.1,
            "lr": 1e-3 * min(1, step / 10),
            "tokens_per_s": 1000.0 + step,
            "mfu": 0.3,
            "step_time_s": 0.5,
            "tokens_seen": step * 4096,
        }
        if step % 10 == 0:
            record["val_loss"] = 8.2 - step * 0.1 + (1.5 if step == 40 else 0)
        lines.append(record)
        if step == 20:
            lines.append({"step": 20, "event": "resume", "tag": "step_00000020"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def test_summary_values(tmp_path: Path) -> None:
    records = [json.loads(line) for line in (synthetic_run(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    s = summarize(records)
    assert s.steps == 40 and s.tokens_seen == 40 * 4096
    assert s.final_loss == pytest.approx(4.0)
    assert s.best_val_loss == pytest.approx(5.2) and s.best_val_step == 30
    assert s.mean_mfu == pytest.approx(0.3) and s.resumes == 1
    assert s.train_time_s == pytest.approx(20.0)
    assert s.mean_tokens_per_s == pytest.approx(1000 + sum(range(2, 41)) / 39)


def test_report_renders_png_and_html(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path)
    result = run_cli("report", str(run), "--output", str(tmp_path / "r.png"))  # as its own process
    assert result.returncode == 0, result.stderr
    assert "best val loss    5.2000 (step 30)" in result.stdout and "resumes          1" in result.stdout
    image = np.asarray(Image.open(tmp_path / "r.png").convert("L"))
    assert image.shape == (700, 1100)
    assert image.min() < 100 and (image < 250).mean() > 0.02  # curves and text drawn, not a blank canvas
    write_report(run, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "<th>mean MFU</th><td>30.00%</td>" in page and "data:image/png;base64," in page
    bad = run_here("report", str(tmp_path), "--output", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "metrics.jsonl: no metrics" in bad.stderr


def test_plain_progress_lines_carry_the_eta_when_not_on_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from lmscale.progress import Progress
    from lmscale.train.metrics import ConsoleSink

    caplog.set_level(logging.INFO, logger="lmscale")
    with Progress("write shards", total=4, unit="shards", log_every_s=0) as progress:  # pytest's stderr: no TTY
        progress.advance(2)
    assert re.fullmatch(r"write shards: 2/4 shards, \d+s elapsed, ETA \d+s", caplog.records[-1].getMessage())
    sink = ConsoleSink(max_steps=10, start_step=4)
    sink.log(5, {"loss": 3.25, "tokens_per_s": 1000.0, "mfu": 0.5})
    assert re.fullmatch(
        r"step 5/10 \| loss 3\.2500 \| tokens_per_s 1,000 \| mfu 50\.0% \| eta \d+s", caplog.records[-1].getMessage()
    )


def test_a_comparison_names_a_broken_per_position_file_in_one_line(tmp_path: Path) -> None:
    from lmscale.report import compared

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "tokens_seen": 64}\n')
    assert compared(run).per_position is None
    (run / "per_position.json").write_text('{"loss": 5.0}\n')
    with pytest.raises(UsageError, match=r"per_position\.json: not what `lmscale eval --per-position` writes"):
        compared(run)
