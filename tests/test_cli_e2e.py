"""The user's path through the CLI: prepare -> train -> resume, with W&B offline."""

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, TINY_OVERRIDES, run_cli


def wandb_records(path: Path) -> list[dict]:
    """The records of an offline run file, read back by wandb's own reader."""
    result = subprocess.run(
        ["wandb", "leet", "inspect", "--json", str(path)], capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


pytestmark = pytest.mark.slow


def test_prepare_train_resume(corpus_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = run_cli("prepare", "--input", str(corpus_dir), "--output", str(data), "--seq-len", "64",
                     "--vocab-size", "512", "--shard-size", "0.2MB", "--workers", "2", "--val-fraction", "0.1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "prepared" in result.stdout and (data / "manifest.json").is_file()

    run_dir = tmp_path / "run"
    # This run measures the CPU's peak FLOP/s, as a user's would (the other tests give it).
    sets = [*TINY_OVERRIDES, "logging.peak_flops=null", f"data.path={data}", f"run.dir={run_dir}",
            "logging.wandb.mode=online", "schedule.total_steps=6", "checkpoint.every_steps=3",
            "trainer.eval_every_steps=3"]  # fmt: skip
    args = ["train", "configs/gpt-tiny.yaml", "--nproc", "2"] + [a for s in sets for a in ("--set", s)]

    dry = run_cli(*args, "--dry-run", "--set", "trainer.max_steps=6")
    assert dry.returncode == 0, dry.stderr
    assert '"stage": 2' in dry.stdout and "d_model: 64" in dry.stdout and not run_dir.exists()

    no_key = {"WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc")}  # online without a key: offline
    first = run_cli(*args, "--set", "trainer.max_steps=4", env=no_key)
    assert first.returncode == 0, first.stderr[-3000:]
    # The first job "died" after logging step 4 but before its step-4 checkpoint: resume from step 3.
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    (run_dir / "checkpoints" / "latest").write_text("step_00000003")
    second = run_cli(*args, "--set", "trainer.max_steps=6", env=no_key)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resume" in second.stderr and "step_00000003" in second.stderr

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    for r in records:
        if "loss" in r:
            assert {"lr", "grad_norm", "tokens_per_s", "tokens_seen"} <= r.keys()
            assert r["tokens_seen"] == r["step"] * 16 * 64
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert [r["event"] for r in records if "event" in r] == ["start", "checkpoint", "start", "resume", "checkpoint"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "deepspeed.json").is_file()
    # One offline W&B run, continued by the resume: same id, the step axis goes on with no step twice.
    run_id = (run_dir / "wandb_id").read_text()
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.parent.name.endswith(run_id) for f in files)
    records = [r for f in files for r in wandb_records(f)]
    assert {r["run"]["run_id"] for r in records if r["type"] == "run"} == {run_id}
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    steps = [h["_step"] for h in history]
    assert len(steps) == len(set(steps)) and sorted(steps) == [1, 2, 3, 4, 5, 6]
    losses = {h["_step"]: h["loss"] for h in history}
    jsonl = {
        r["step"]: r["loss"]
        for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    }
    # Step 4 comes from the first job; the second retrained it to the same loss and did not log it again.
    assert losses == pytest.approx(jsonl)
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    assert {"deepspeed", "model", "git_commit", "launch_command", "peak_flops_per_rank"} <= set(config)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert config["git_commit"] == head and config["launch_command"].startswith("lmscale train configs/gpt-tiny.yaml")
    assert config["deepspeed"]["zero_optimization"]["stage"] == 2 and config["world_size"] == 2
    for f in files:  # each job measured its own CPU peak and recorded it in its config
        job = wandb_records(f)
        job_config = next(r["run"]["config"]["update"] for r in job if r["type"] == "run")
        flops, peak = job_config["flops_per_token"], job_config["peak_flops_per_rank"]
        for h in (r["history"]["item"] for r in job if r["type"] == "history"):
            assert h["mfu"] == pytest.approx(flops * h["tokens_per_s"] / (peak * 2))
    for h in history:
        assert h["tokens_per_s_per_rank"] == pytest.approx(h["tokens_per_s"] / 2)
        assert h["samples_per_s"] * 64 == pytest.approx(h["tokens_per_s"])
        assert h["tokens_per_s"] * h["step_time_s"] == pytest.approx(16 * 64)
        assert h["memory_gb"] > 0.1 and 0 <= h["data_wait_frac"] < 1 and h["grad_norm"] > 0
        if "val_loss" in h:
            assert h["val_perplexity"] == pytest.approx(math.exp(h["val_loss"]))
    assert [h["_step"] for h in history if "val_loss" in h] == [3, 6]
    # The resume event waits for the first step this job logs (W&B already had step 4 from the first job).
    assert next(h for h in history if "events/resume" in h)["_step"] == 5
    assert next(h for h in history if "events/resume" in h)["events/resume/step"] == 3
    assert f"wandb sync {run_dir}/wandb/offline-run-*-{run_id}" in second.stderr

    # A resume that would change the sample order is refused before any rank starts.
    changed = run_cli(*args, "--set", "trainer.max_steps=7", "--set", "schedule.total_steps=7", "--set", "data.lanes=8")
    assert changed.returncode == 2
    assert changed.stderr.strip().startswith("lmscale: error: data.lanes: 8 here, 16 in checkpoint step_00000006")


def test_world_size_that_does_not_divide_the_batch(dataset: Path) -> None:
    result = run_cli("train", "configs/gpt-tiny.yaml", "--nproc", "3", "--set", f"data.path={dataset}",
                     "--set", "trainer.global_batch_size=16", "--set", "trainer.grad_accum_steps=null")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "lmscale: error: trainer.global_batch_size: 16 is not divisible by micro_batch_size * world_size = 8 * 3"
    )


def test_missing_data_dir_exit_code_2(tmp_path: Path) -> None:
    result = run_cli("train", "configs/gpt-tiny.yaml", "--set", f"data.path={tmp_path / 'none'}")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("lmscale: error: data.path: ")
    assert len(result.stderr.strip().splitlines()) == 1


LMSCALE_LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\[rank \d+\] (INFO|WARNING) |(INFO|WARNING) lmscale\S*: )"
)
"""The launcher's and the ranks' log lines (``lmscale``'s loggers), progress included."""


def test_readme_main_job_runs_end_to_end(tmp_path: Path) -> None:
    """`lmscale demo`, the README's main job, on fewer steps: corpus -> prepare -> train -> export -> sample."""
    result = run_cli("demo", "--workdir", str(tmp_path), "--steps", "4", env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prepared" in result.stdout and "(GPT2LMHeadModel)" in result.stdout
    # A new user's console holds lmscale's own lines: no library's warnings, banners or progress bars.
    foreign = [line for line in result.stderr.splitlines() if line.strip() and not LMSCALE_LOG_LINE.match(line)]
    assert foreign == []
    assert not any("Warning" in line or "it/s" in line for line in result.stdout.splitlines())
    sample = result.stdout.split("sample:\n", 1)[1]
    assert sample.startswith("Return the") and len(sample.strip()) > len("Return the")
    records = [json.loads(line) for line in (tmp_path / "runs" / "gpt-tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4]  # logging.every_steps 10: the last step is logged
    assert (tmp_path / "exported" / "gpt-tiny" / "model.safetensors").is_file()
