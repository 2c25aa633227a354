"""``lmscale submit`` before anything is queued: rendering for the target nodes, preflight checks, the memory
estimate they rest on, and the job script's quoting."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
from pathlib import Path

import psutil
import pytest

from launcher.rank_command import RANK_MODULE
from lmscale.config import load_config
from lmscale.footprint import estimate_memory

from .conftest import (
    FORTY_STEPS,
    GLOBAL_BATCH_OVERRIDES,
    REPO,
    error_lines,
    final_loss,
    lease_since,
    run_cli,
    wait_for_step,
)


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
        "--set", "checkpoint.every_steps=20000", "--set", "trainer.micro_batch_size=2048", "--dry-run",
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


def test_preflight_refuses_a_logging_interval_that_outlasts_the_preemption_warning(tmp_path: Path) -> None:
    """A stop signal waits for the next logged step: the Llama 7B on one node of 8 H100s (45 s a step at 50%
    MFU) logging every 10 steps would still be training when Slurm's 300 s warning runs out."""
    common = ["--backend", "slurm", "--gpus-per-node", "h100:8", "--set", f"data.path={tmp_path / 'none'}",
              "--set", f"run.dir={tmp_path / 'run'}", "--dry-run"]  # fmt: skip
    one_node = run_cli("submit", "configs/llama-7b.yaml", "--nodes", "1", "--set", "logging.every_steps=10", *common)
    assert one_node.returncode == 0, one_node.stderr
    assert "#   logging.every_steps: 10 steps take at least 4" in one_node.stdout
    assert "--signal-lead 300s" in one_node.stdout
    shipped = run_cli("submit", "configs/llama-7b.yaml", "--nodes", "8", *common)  # every step logged, 64 GPUs
    assert shipped.returncode == 0 and "logging.every_steps:" not in shipped.stdout


def test_the_memory_estimate_partitions_model_states_by_stage_and_counts_recomputation() -> None:
    """The arithmetic of lmscale.footprint on the GPT-2 124M shape (16 x 1024 tokens, bf16); its
    measured counterparts are on CPU ranks (tests/test_rank_entry.py, tests/test_levers.py) and in
    BENCHMARKS.md (GPU)."""
    cfg = load_config(REPO / "configs" / "gpt2-124m.yaml")
    one = estimate_memory(cfg, world_size=1, micro_batch=16)
    assert one.parameters == 124_475_904
    assert one.weights == 2 * one.parameters and one.optimizer == 12 * one.parameters  # bf16; fp32 master + Adam
    eight = estimate_memory(cfg, world_size=8, micro_batch=16)
    assert eight.optimizer == pytest.approx(one.optimizer / 8) and eight.weights == one.weights
    stage3 = estimate_memory(dataclasses.replace(cfg, zero=dataclasses.replace(cfg.zero, stage=3)), 8, 16)
    assert stage3.weights == pytest.approx(one.weights / 8) and stage3.gathered > one.weights
    # fp32 gradient accumulation: 4 bytes a parameter, partitioned from ZeRO-2 on (plus DeepSpeed's bucket).
    assert one.gradients > 4 * one.parameters and stage3.gradients < one.gradients / 2
    # The chunked loss never holds the 16 x 1024 x 50304 fp32 logits (3.3 GB each, four of them in a plain loss).
    assert one.loss_buffers < 1e9
    recomputing = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, activation_checkpointing="full"))
    full = estimate_memory(recomputing, 1, 16)
    assert full.activations_without_recompute == one.activations
    assert full.activations < one.activations / 4 and full.total < one.total
    assert one.workspace == 0 and estimate_memory(cfg, 1, 16, device="cpu").workspace > 0  # fused AdamW on GPUs


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


@pytest.mark.slow
def test_a_local_job_requeues_after_a_preemption_and_is_followed_by_its_id(
    dataset: Path, forty_step_reference: Path, tmp_path: Path
) -> None:
    """`lmscale submit --backend local`: the job runs in the background on this machine; its ranks, told by a
    scheduler's preemption warning (SIGUSR1 to them, not to the job), save and exit 3, and the job starts them
    again from that checkpoint; `logs --follow`, `status` and `jobs` find it by its id alone."""
    env = {"LMSCALE_STATE_DIR": str(tmp_path / "state")}
    run_dir = tmp_path / "run"
    sets = [arg for item in [*GLOBAL_BATCH_OVERRIDES, f"data.path={dataset}", f"run.dir={run_dir}", *FORTY_STEPS,
                             "checkpoint.every_steps=100"] for arg in ("--set", item)]  # fmt: skip
    submitted = run_cli("submit", "configs/gpt-tiny.yaml", "--backend", "local", "--nproc", "2", *sets, env=env)
    assert submitted.returncode == 0, submitted.stderr
    found = re.search(r"submitted local job (\S+)", submitted.stdout)
    assert found is not None, submitted.stdout
    job_id = found.group(1)
    try:
        wait_for_step(run_dir, 3)
        started = [p for p in psutil.process_iter(["cmdline"])
                   if RANK_MODULE in (p.info["cmdline"] or []) and str(run_dir) in (p.info["cmdline"] or [])]  # fmt: skip
        ranks = [p for p in started if p.ppid() not in {q.pid for q in started}]  # not their loader workers
        assert len(ranks) == 2
        # The job holds its run directory over its attempts: a second submission for it is refused (the job
        # frozen meanwhile, so that it is still training when the preemption comes).
        job_pid = ranks[0].ppid()
        os.killpg(os.getpgid(job_pid), signal.SIGSTOP)
        try:
            again = run_cli("submit", "configs/gpt-tiny.yaml", "--backend", "local", "--nproc", "2", *sets, env=env)
            status = run_cli("status", str(run_dir), env=env)
        finally:
            os.killpg(os.getpgid(job_pid), signal.SIGCONT)
        assert again.returncode == 2
        assert error_lines(again.stderr) == [
            f"lmscale: error: preflight: {run_dir} is in use by job {job_id} (local job, pid {job_pid}) on "
            f"{os.uname().nodename} since {lease_since(run_dir)}; `lmscale cancel {job_id}`, or wait"
        ]
        assert f"held by job {job_id} (local job, pid {job_pid})" in status.stdout
        for rank in ranks:
            rank.send_signal(signal.SIGUSR1)
        followed = run_cli("logs", job_id, "--follow", env=env)
        assert followed.returncode == 0 and "restarting (1 of 3)" in followed.stdout, followed.stdout[-3000:]
        exits = [json.loads(line) for line in (run_dir / "job_exits.jsonl").read_text().splitlines()]
        assert [(e["attempt"], e["exit_code"]) for e in exits] == [(0, 3), (1, 0)]
        status = run_cli("status", job_id, env=env)
        assert f"local job {job_id} (gpt-tiny): SUCCEEDED" in status.stdout
        listed = run_cli("jobs", env=env).stdout.splitlines()
        assert [line.split()[:3] for line in listed[1:]] == [[job_id, "local", "SUCCEEDED"]]
        # The requeued job ends where an uninterrupted run ends.
        assert final_loss(run_dir) == final_loss(forty_step_reference)
    finally:  # a failed test leaves no job running
        for process in psutil.process_iter(["cmdline"]):
            if job_id in (process.info["cmdline"] or []):
                with contextlib.suppress(psutil.NoSuchProcess):
                    for child in [*process.children(recursive=True), process]:
                        child.kill()
