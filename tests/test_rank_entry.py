"""The per-rank entry point: a prepared run directory starts on any world size that divides its global batch,
under torchrun or with no launcher at all, and the loop's collectives use the engine's device."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import REPO, damage_first_training_shard, keys_per_step, metrics_records, run_cli, train_args

pytestmark = pytest.mark.slow


def prepare(dataset: Path, run_dir: Path, nproc: int) -> subprocess.CompletedProcess:
    return run_cli(*train_args(dataset, run_dir, nproc, "trainer.max_steps=6"), "--prepare-only")


def rank_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def test_a_two_rank_run_directory_trains_unchanged_on_one_and_four_ranks(
    dataset: Path, two_rank_reference: Path, tmp_path: Path
) -> None:
    template = tmp_path / "prepared"
    result = prepare(dataset, template, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prepared" in result.stdout and f"python -m lmscale.train.main {template}" in result.stdout
    assert not (template / "checkpoints").exists()  # nothing was started
    config = (template / "config.yaml").read_text()
    assert "global_batch_size: 16" in config and "grad_accum_steps: null" in config

    one, four = tmp_path / "one", tmp_path / "four"
    for target in (one, four):
        # A copied run directory trains where it is: the rank takes its path from the command line.
        shutil.copytree(template, target)
    single = [sys.executable, "-m", "lmscale.train.main", str(one)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", "29641",
                "-m", "lmscale.train.main", str(four)]  # fmt: skip
    for command in (single, torchrun):
        result = subprocess.run(command, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]

    expected = {r["step"]: r["loss"] for r in metrics_records(two_rank_reference) if "loss" in r}
    for run_dir, world in ((one, 1), (four, 4)):
        assert (run_dir / "config.yaml").read_text() == config  # read, never rewritten by a rank
        assert keys_per_step(run_dir) == keys_per_step(two_rank_reference), world
        losses = {r["step"]: r["loss"] for r in metrics_records(run_dir) if "loss" in r}
        assert losses == pytest.approx(expected, abs=2e-4), world  # another summation order
        state = json.loads((run_dir / "checkpoints" / "step_00000006" / "lmscale_state.json").read_text())
        assert state["world_size"] == world and state["samples_seen"] == 6 * 16
        assert state["config"]["trainer"]["grad_accum_steps"] == 16 // (4 * world)
        assert state["config"]["run"]["dir"] == str(run_dir)
    # A new run is not started over a run's checkpoints, by a rank or by the launcher.
    again = subprocess.run([*single, "--resume", "none"], cwd=REPO, env=rank_env(), capture_output=True, text=True)
    refusal = f"lmscale: error: {one}/checkpoints: the run already has checkpoints; use --resume auto"
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith(refusal)
    relaunch = run_cli(*train_args(dataset, one, 1, "trainer.max_steps=6"), "--resume", "none")
    assert relaunch.returncode == 2 and relaunch.stderr.strip().splitlines()[-1].startswith(refusal)


def test_a_world_size_that_does_not_divide_the_global_batch_fails_before_the_rendezvous(
    dataset: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    assert prepare(dataset, run_dir, 2).returncode == 0
    # Rank 0 of 3: nobody else ever comes, so only a check before the rendezvous can answer.
    env = rank_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="29643")
    result = subprocess.run([sys.executable, "-m", "lmscale.train.main", str(run_dir)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "lmscale: error: trainer.global_batch_size: 16 is not divisible by micro_batch_size * world_size = 4 * 3"
    )
    missing = subprocess.run([sys.executable, "-m", "lmscale.train.main", str(tmp_path / "nowhere")], cwd=REPO,
                             env=rank_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 1 and "config.yaml: missing (prepare the run directory" in missing.stderr


# Runs a rank with every torch.distributed collective wrapped: each call made from the training loop records
# the devices of its tensor arguments and the device the engine trains on.
RECORDING_RANK = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from lmscale.train import engine, main

    calls = []

    def recording(name, original):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__")
            if caller == "lmscale.train.loop":
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                calls.append({"name": name, "devices": [str(t.device) for t in tensors],
                              "engine": str(engine.device())})
            return original(*args, **kwargs)
        return wrapper

    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce_scatter", "barrier",
                 "all_gather_into_tensor", "broadcast_object_list"):
        setattr(dist, name, recording(name, getattr(dist, name)))
    code = main.main([sys.argv[1]])
    print("CALLS " + json.dumps(calls))
    sys.exit(code)
    """
)


def test_every_collective_of_the_loop_gets_tensors_on_the_engine_device(dataset: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    damage_first_training_shard(dataset, broken)  # so that the ranks also agree on a skipped shard
    run_dir = tmp_path / "run"
    assert prepare(broken, run_dir, 1).returncode == 0
    result = subprocess.run([sys.executable, "-c", RECORDING_RANK, str(run_dir)], cwd=REPO, env=rank_env(),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    calls = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("CALLS "))[6:])
    names = {c["name"] for c in calls}
    assert {"all_reduce", "all_gather_object"} <= names  # loss mean, stop flag, skipped-shard agreement
    tensor_calls = [c for c in calls if c["name"] != "all_gather_object"]
    assert tensor_calls and all(c["devices"] and set(c["devices"]) == {c["engine"]} for c in tensor_calls), calls


# Runs a rank with every way of reading a tensor back to the host wrapped: each read made by the training loop
# records the step it happened in.
READING_RANK = textwrap.dedent(
    """
    import json, sys
    import torch
    from lmscale.train import loop, main

    reads, current = [], {"step": 0}
    train_step = loop.Trainer.train_step

    def numbered(self):
        current["step"] = self.state.step + 1
        return train_step(self)

    loop.Trainer.train_step = numbered

    def recording(name, original):
        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == "lmscale.train.loop":
                reads.append({"name": name, "step": current["step"]})
            return original(*args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        setattr(torch.Tensor, name, recording(name, getattr(torch.Tensor, name)))
    code = main.main([sys.argv[1]])
    print("READS " + json.dumps(reads))
    sys.exit(code)
    """
)


def test_the_loop_reads_the_device_back_only_on_logging_checkpoint_and_last_steps(
    dataset: Path, tmp_path: Path
) -> None:
    """Between its sync steps a step leaves the device alone: loss, gradient norm, stop and skipped-shard flags
    are read back (the flags in one all-reduce) on logging steps (every 4), checkpoint steps (every 6) and the
    last (10)."""
    run_dir = tmp_path / "run"
    prepared = run_cli(*train_args(dataset, run_dir, 1, "trainer.max_steps=10", "schedule.total_steps=10",
                                   "logging.every_steps=4", "checkpoint.every_steps=6"), "--prepare-only")  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    result = subprocess.run([sys.executable, "-c", READING_RANK, str(run_dir)], cwd=REPO, env=rank_env(),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    reads = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("READS "))[6:])
    by_step = {r["step"] for r in reads if r["step"] > 0}  # step 0: the stop check before the first step
    assert by_step == {4, 6, 8, 10}, reads
    logged = [r["step"] for r in metrics_records(run_dir) if "loss" in r]
    assert logged == [4, 8, 10]


def test_zero3_builds_the_model_partitioned_and_the_memory_estimate_holds_for_100m_parameters(
    dataset: Path, tmp_path: Path
) -> None:
    """A 101M-parameter GPT trained for a step on 2 ranks under ZeRO-2 and ZeRO-3 (the step allocates all it holds).

    Rank 0's peak while building the model: all of it under ZeRO-2, about half under ZeRO-3 (its partition,
    plus one module at a time before it is partitioned; BENCHMARKS.md has larger models and more ranks,
    benchmarks/zero3_memory.py). Its peak over the run is within 20% of the estimate the start event
    records (lmscale.footprint), the figure --dry-run and lmscale submit's preflight print."""
    shape = ["model.d_model=1024", "model.n_layers=8", "model.n_heads=8", "trainer.max_steps=1", "data.num_workers=0",
             "trainer.micro_batch_size=4", "trainer.grad_accum_steps=1", "trainer.eval_every_steps=0",
             "logging.wandb.mode=disabled", "logging.peak_flops=1e11"]  # fmt: skip
    built, peaks = {}, {}
    for stage in (2, 3):
        run_dir = tmp_path / f"zero{stage}"
        args = ["train", "configs/gpt-tiny.yaml", "--nproc", "2"]
        for item in [*shape, f"zero.stage={stage}", f"data.path={dataset}", f"run.dir={run_dir}"]:
            args += ["--set", item]
        # Freed tensors must leave the resident set (see benchmarks/zero3_memory.py).
        result = run_cli(*args, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
        assert result.returncode == 0, result.stderr[-3000:]
        built[stage] = next(r for r in metrics_records(run_dir) if r.get("event") == "start")
        peaks[stage] = max(r["memory_gb"] for r in metrics_records(run_dir) if "memory_gb" in r)
    full = built[2]["full_model_fp32_gb"]
    assert 0.39 < full < 0.42
    assert built[2]["model_build_gb"] > 0.9 * full
    assert built[3]["model_build_gb"] < 0.75 * full, built
    for stage in (2, 3):
        estimate = built[stage]["memory_estimate_gb"]
        assert 0.8 * peaks[stage] < estimate["total"] < 1.2 * peaks[stage], (stage, peaks[stage], estimate)
    assert built[3]["memory_estimate_gb"]["weights"] == pytest.approx(built[2]["memory_estimate_gb"]["weights"] / 2)
