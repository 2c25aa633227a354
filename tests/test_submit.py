"""``lmscale submit`` before anything is queued: rendering for the target nodes, preflight checks, the memory
estimate they rest on, and the job script's quoting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmscale.config import load_config
from lmscale.train.footprint import estimate_memory

from .conftest import REPO, run_cli


def dry_run(*args: str) -> tuple[int, str, str]:
    result = run_cli("submit", "configs/gpt2-124m.yaml", *args)
    return result.returncode, result.stdout, result.stderr


def deepspeed_section(stdout: str) -> dict:
    text = stdout.split("# DeepSpeed config", 1)[1].split("\n", 1)[1]
    return json.JSONDecoder().raw_decode(text)[0]


def test_a_gpu_job_dry_runs_for_its_gpus_without_its_data_and_is_refused_for_real(tmp_path: Path) -> None:
    common = ["--backend", "slurm", "--nodes", "2", "--gpus-per-node", "h100:8", "--set", f"run.dir={tmp_path / 'run'}",
              "--set", f"data.path={tmp_path / 'not-prepared'}"]  # fmt: skip
    code, out, err = dry_run(*common, "--dry-run")
    assert code == 0, err
    zero = deepspeed_section(out)
    assert zero["optimizer"]["params"]["fused"] is True and zero["zero_optimization"]["overlap_comm"] is True
    assert zero["gradient_accumulation_steps"] == 512 // (16 * 16)
    assert f"data.path: {tmp_path / 'not-prepared'}: dataset directory does not exist" in out
    assert "sbatch --parsable --job-name=gpt2-124m --nodes=2 --ntasks-per-node=8" in out
    assert "--gpus-per-node=h100:8" in out and "--signal=USR1@300" in out
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"

    code, out, err = dry_run(*common)
    assert code == 2 and not out
    assert err.splitlines() == [f"lmscale: error: preflight: data.path: {tmp_path / 'not-prepared'}: dataset directory "
                                "does not exist (run `lmscale prepare` first)"]  # fmt: skip


def test_preflight_names_each_request_that_cannot_work(dataset: Path, tmp_path: Path) -> None:
    code, out, err = dry_run(
        "--backend", "slurm", "--nodes", "3", "--gpus-per-node", "a10:1", "--time", "00:30:00",
        "--set", f"data.path={dataset}", "--set", f"run.dir={tmp_path / 'run'}",
        "--set", "checkpoint.every_steps=20000", "--set", "trainer.micro_batch_size=32", "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    after = out.split("# preflight", 1)[1].splitlines()[1:]
    lines = [line[4:] for line in after[: next(i for i, line in enumerate(after) if not line.startswith("#   "))]]
    assert len(lines) == 3, out
    assert lines[0].startswith("trainer.global_batch_size: 512 is not divisible by micro_batch_size * world_size")
    assert lines[1].startswith("GPU memory: a rank needs about") and "more than a 24 GB GPU" in lines[1]
    assert lines[2].startswith("--time 1800s: one checkpoint interval (20000 steps) takes at least")

    code, out, err = dry_run("--backend", "slurm", "--nproc", "2", "--mem", "1G", "--set", f"data.path={dataset}",
                             "--set", f"run.dir={tmp_path / 'run'}", "--set", "trainer.global_batch_size=32")  # fmt: skip
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("lmscale: error: preflight: --mem 1G: a rank needs about") and "for the 2 ranks" in err


def test_the_memory_estimate_matches_a_measured_gpu_peak() -> None:
    # GPT-2 124M, micro-batch 16 x 1024, ZeRO-1 bf16 on one H200: 18.7 GB peak allocated (BENCHMARKS.md).
    cfg = load_config(REPO / "configs" / "gpt2-124m.yaml")
    estimate = estimate_memory(cfg, world_size=1, micro_batch=16)
    assert estimate.parameters == 124_475_904
    assert 0.85 * 18.7e9 < estimate.total < 1.1 * 18.7e9
    partitioned = estimate_memory(cfg, world_size=8, micro_batch=16)
    assert partitioned.optimizer == pytest.approx(estimate.optimizer / 8)


def test_the_slurm_script_holds_no_user_value_unquoted(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "it's a $(run) dir"
    code, out, err = dry_run("--backend", "slurm", "--job-name", "x $(touch PWNED)\n`id`", "--nproc", "1",
                             "--set", f"data.path={dataset}", "--set", f"run.dir={run_dir}", "--dry-run")  # fmt: skip
    assert code == 0, err
    script = out.split(f"# {run_dir}/job.sbatch\n", 1)[1]
    assert "PWNED" not in script and "run_dir='" + str(run_dir).replace("'", "'\"'\"'") + "'" in script
    template = tmp_path / "site.sbatch"
    template.write_text("#!/bin/bash\nmodule load cuda\n{{ run_dir }} {{ partition }}\n")
    code, out, err = dry_run("--backend", "slurm", "--template", str(template), "--set", f"data.path={dataset}",
                             "--set", f"run.dir={tmp_path / 'run'}", "--dry-run")  # fmt: skip
    assert code == 2 and err.strip().startswith(f"lmscale: error: {template}: unknown field {{{{ partition }}}}")
