"""Checkpoints under faults, on real DeepSpeed ranks: damaged files, saves a crash interrupted, a full and a
read-only disk, kill -9 of a rank mid-run and at each phase of a save. Every resume must repeat the
uninterrupted run loss for loss, with dropout on (each rank's random state is part of the checkpoint).

CI kills rank 0 (the one that logs to W&B) at one phase of a save; ``LMSCALE_FAULT_MATRIX=1`` runs every phase
and kill -9 of a random rank at a random step under ZeRO 1, 2 and 3."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lmscale.errors import UsageError
from lmscale.train.checkpoint import LATEST, check_tag, fallback_order, resume_tag
from lmscale.train.checkpoint_manifest import MANIFEST, read_manifest
from lmscale.train.failpoints import ENV, POINTS

from .conftest import FORTY_STEPS, REPO, error_lines, losses, metrics_records, run_cli, train_args
from .test_cli_e2e import wandb_records

pytestmark = pytest.mark.slow

SAVED = ["trainer.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "model.dropout=0.1"]
"""The run every damage starts from: checkpoints at steps 2 and 4 of a 6-step schedule, dropout on."""


@pytest.fixture(scope="module")
def saved_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    result = run_cli(*train_args(dataset, run_dir, 2, *SAVED))
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def resume(dataset: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """The saved run continued to step 6 (its schedule's end) on 2 ranks."""
    return run_cli(*train_args(dataset, run_dir, 2, *SAVED, "trainer.max_steps=6"), *extra)


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in metrics_records(run_dir) if r.get("event") == name]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def damage(kind: str, tag_dir: Path) -> str:
    """Damage ``tag_dir`` one way; returns the file the verdict must name."""
    if kind == "model byte":
        flip_byte(tag_dir / "mp_rank_00_model_states.pt")
        return "mp_rank_00_model_states.pt: sha256 differs from the manifest"
    if kind == "optimizer byte":
        flip_byte(tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
        return "zero_pp_rank_1_mp_rank_00_optim_states.pt: sha256 differs from the manifest"
    if kind == "truncated":
        path = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        size = path.stat().st_size
        path.write_bytes(path.read_bytes()[: size // 3])
        return f"zero_pp_rank_0_mp_rank_00_optim_states.pt: {size // 3} bytes, the manifest says {size}"
    if kind == "rng missing":
        (tag_dir / "rng" / "rank_1.pt").unlink()
        return "rng/rank_1.pt: missing"
    if kind == "manifest missing":
        (tag_dir / MANIFEST).unlink()
        return f"{MANIFEST}: missing (the save did not finish)"
    (tag_dir / MANIFEST).write_text('{"files": ')
    return f"{MANIFEST}: unreadable"


@pytest.mark.parametrize(
    "kind", ["model byte", "optimizer byte", "truncated", "rng missing", "manifest missing", "manifest garbled"]
)
def test_verification_names_the_damaged_file(kind: str, saved_run: Path, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(saved_run / "checkpoints" / "step_00000004", ckpt_dir / "step_00000004")
    assert check_tag(ckpt_dir, "step_00000004") is None
    expected = damage(kind, ckpt_dir / "step_00000004")
    problem = check_tag(ckpt_dir, "step_00000004")
    assert problem is not None and problem.startswith(f"{ckpt_dir}/step_00000004/{expected}"), problem
    if MANIFEST not in expected:  # each rank checks its share of the bytes: one of two shares holds the file
        verdicts = [check_tag(ckpt_dir, "step_00000004", part, 2) for part in (0, 1)]
        assert sorted(v is None for v in verdicts) == [False, True]


def test_a_damaged_checkpoint_is_named_interrupted_saves_are_removed_and_auto_resume_falls_back(
    saved_run: Path, dataset: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    ckpt_dir = run_dir / "checkpoints"
    four = ckpt_dir / "step_00000004"
    # What a kill leaves at each phase of a save (see lmscale.train.checkpoint): while DeepSpeed wrote or the
    # ranks hashed, a partial directory without a manifest; after the manifest, one with it; while a tag saved
    # again replaced its namesake, the old one moved aside.
    shutil.copytree(four, ckpt_dir / ".step_00000006.partial", ignore=shutil.ignore_patterns(MANIFEST))
    shutil.copytree(four, ckpt_dir / ".step_00000005.partial")
    shutil.copytree(four, ckpt_dir / ".step_00000004.replaced.partial")
    damage("model byte", four)

    named = resume(dataset, run_dir, "--resume", "step_00000004")
    assert named.returncode == 1
    # Every start removes interrupted saves first, this one too.
    names = ".step_00000004.replaced.partial, .step_00000005.partial, .step_00000006.partial"
    assert f"WARNING removed saves that a crash interrupted: {names}" in named.stderr
    assert not list(ckpt_dir.glob(".*"))
    assert error_lines(named.stderr) == [
        f"lmscale: error: checkpoint step_00000004 fails verification: {four}/"
        "mp_rank_00_model_states.pt: sha256 differs from the manifest (the file changed after it was saved)"
    ]
    refused = resume(dataset, run_dir, "--resume", "../../etc")  # a tag is a name among the run's, never a path
    assert refused.returncode == 2
    assert error_lines(refused.stderr) == [
        f"lmscale: error: checkpoint '../../etc': not a complete checkpoint of {ckpt_dir} (its tags: "
        "step_00000002, step_00000004)"
    ]

    fallback = resume(dataset, run_dir)
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    (rejected,) = events(run_dir, "checkpoint_rejected")
    assert rejected["tag"] == "step_00000004" and "mp_rank_00_model_states.pt: sha256 differs" in rejected["reason"]
    assert events(run_dir, "resume")[-1]["tag"] == "step_00000002"
    # Steps 3 and 4 were trained again from step 2, dropout included, to the very same losses.
    assert [losses(run_dir)[s] for s in (3, 4)] == [losses(saved_run)[s] for s in (3, 4)]
    # The step-4 checkpoint was saved again over the damaged one.
    assert check_tag(ckpt_dir, "step_00000004") is None
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) == [f"step_0000000{s}" for s in (2, 4, 6)]
    assert (ckpt_dir / LATEST).read_text() == "step_00000006"


def test_latest_is_the_commit_point_and_a_named_tag_is_never_a_path(saved_run: Path, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(saved_run / "checkpoints", ckpt_dir)
    assert fallback_order(ckpt_dir) == ["step_00000004", "step_00000002"]
    # Killed after the rename, before `latest` moved: the newer tag is complete but never resumed from.
    (ckpt_dir / LATEST).write_text("step_00000002")
    assert fallback_order(ckpt_dir) == ["step_00000002"] and resume_tag(ckpt_dir, "auto") == "step_00000002"
    for bad in ("step_00000099", "../checkpoints/step_00000004", ".step_00000005.partial"):
        with pytest.raises(UsageError, match="not a complete checkpoint"):
            resume_tag(ckpt_dir, bad)


@pytest.fixture
def mounts() -> list[Path]:
    """Mount points a test creates, unmounted after it even when it fails."""
    made: list[Path] = []
    yield made
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def mount(mounts: list[Path], *args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)
    mounts.append(Path(args[-1]))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs and a read-only bind mount (root, as in CI)")
def test_a_full_or_read_only_checkpoint_directory_fails_in_one_line_and_keeps_the_last_checkpoint(
    saved_run: Path, dataset: Path, tmp_path: Path, mounts: list[Path]
) -> None:
    # Read-only (a remounted filesystem, an expired lease): the start refuses, before any step is trained.
    run_dir = tmp_path / "readonly"
    shutil.copytree(saved_run, run_dir)
    ckpt_dir = run_dir / "checkpoints"
    mount(mounts, "--bind", str(ckpt_dir), str(ckpt_dir))
    mount(mounts, "-o", "remount,bind,ro", str(ckpt_dir))
    result = resume(dataset, run_dir)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"lmscale: error: {ckpt_dir}: rank 0 cannot write its checkpoint files: Read-only file system (errno 30)"
    ]
    assert check_tag(ckpt_dir, "step_00000004") is None and (ckpt_dir / LATEST).read_text() == "step_00000004"

    # Full: room for one checkpoint and a half. The second save is refused before it writes a byte.
    checkpoint_bytes = sum(r.size for r in read_manifest(saved_run / "checkpoints" / "step_00000002").values())
    full_run = tmp_path / "full"
    (full_run / "checkpoints").mkdir(parents=True)
    mount(mounts, "-t", "tmpfs", "-o", f"size={checkpoint_bytes * 3 // 2}", "tmpfs", str(full_run / "checkpoints"))
    result = run_cli(*train_args(dataset, full_run, 2, *SAVED))
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert re.fullmatch(
        rf"lmscale: error: {full_run}/checkpoints: no space left for a checkpoint: [\d.]+ MB free, [\d.]+ MB "
        r"needed \(as large as step_00000002\); free space or lower checkpoint.keep_last",
        line,
    ), line
    assert check_tag(full_run / "checkpoints", "step_00000002") is None
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir() if p.is_dir()) == ["step_00000002"]


FAULT_MATRIX = bool(os.environ.get("LMSCALE_FAULT_MATRIX"))
# Seed 1 kills rank 0, the one that logs to W&B, at step 24; seed 0 kills rank 1 at step 30.
KILL_MATRIX = [(stage, seed) for stage in (1, 2, 3) for seed in (0, 1)]


@pytest.mark.skipif(not FAULT_MATRIX, reason="LMSCALE_FAULT_MATRIX=1 (CI kills rank 0 at a save instead)")
@pytest.mark.parametrize(("stage", "seed"), KILL_MATRIX)
def test_kill_9_of_a_random_rank_at_a_random_step_resumes_loss_for_loss(
    stage: int, seed: int, dataset: Path, forty_step_reference: Path, tmp_path: Path
) -> None:
    chosen = random.Random(seed)
    victim, kill_at = chosen.randrange(2), chosen.randrange(6, 36)
    sets = [*FORTY_STEPS, f"zero.stage={stage}"]
    if stage == 2:
        reference = forty_step_reference
    else:
        reference = tmp_path / "reference"
        result = run_cli(*train_args(dataset, reference, 2, *sets, "checkpoint.every_steps=100"))
        assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    args = train_args(dataset, run_dir, 2, *sets, "checkpoint.every_steps=5", "logging.wandb.mode=offline")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true"}
    job = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "metrics.jsonl").is_file() and kill_at in losses(run_dir)):
            assert job.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.05)
        rank = next(
            p
            for p in psutil.process_iter(["cmdline", "environ"])
            if str(run_dir) in " ".join(p.info["cmdline"] or [])
            and (p.info["environ"] or {}).get("RANK") == str(victim)
        )
        rank.send_signal(signal.SIGKILL)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 128 + signal.SIGKILL, err[-3000:]
    # One line: the peer the dead rank left in a collective keeps its traceback to its log.
    assert error_lines(err) == [
        f"lmscale: error: rank {victim} (node 0) exited with code -9 (killed by signal SIGKILL)"
    ]
    assert re.search(r"Connection (closed|reset) by peer", (run_dir / "logs" / f"rank_{1 - victim}.log").read_text())
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_at = events(run_dir, "resume")[-1]["step"]
    assert resumed_at >= 5 and resumed_at % 5 == 0
    assert losses(run_dir) == losses(reference)  # every one of the 40 steps, bit for bit
    # W&B holds every step once: what the killed job's W&B never wrote was logged again from metrics.jsonl.
    logs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    steps = [r["history"]["item"]["_step"] for log in logs for r in wandb_records(log) if r["type"] == "history"]
    assert sorted(steps) == list(range(1, 41))


# (failpoint, step of the save, rank): each job of one run crashes at the next (after the step-5 save), the last
# job finishes it.
SAVE_CRASHES = (
    [(point, 5 * (i + 2), rank) for i, (point, rank) in enumerate(zip(POINTS, (1, 0, 1, 0, 0, 0), strict=True))]
    if FAULT_MATRIX
    else [("save.renamed", 20, 0)]
)


def test_a_kill_at_each_phase_of_a_save_resumes_from_the_last_published_tag_loss_for_loss(
    dataset: Path, forty_step_reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = train_args(dataset, run_dir, 2, *FORTY_STEPS, "checkpoint.every_steps=5", "checkpoint.keep_last=2",
                      "logging.wandb.mode=offline")  # fmt: skip
    ckpt_dir = run_dir / "checkpoints"
    expected_resumes = []
    for point, step, rank in SAVE_CRASHES:
        tag = f"step_{step:08d}"
        crashed = run_cli(*args, env={ENV: f"{point}:{tag}:{rank}"})
        assert crashed.returncode == 128 + signal.SIGKILL, crashed.stderr[-3000:]
        assert error_lines(crashed.stderr) == [
            f"lmscale: error: rank {rank} (node 0) exited with code -9 (killed by signal SIGKILL)"
        ]
        published = point == "save.published"
        # `latest` is the commit point: a tag renamed into place but not yet named by it is not resumed from.
        assert (ckpt_dir / LATEST).read_text() == (tag if published else f"step_{step - 5:08d}")
        assert (ckpt_dir / tag).is_dir() == (point in ("save.renamed", "save.published"))
        assert check_tag(ckpt_dir, (ckpt_dir / LATEST).read_text()) is None
        expected_resumes.append(step if published else step - 5)
    finished = run_cli(*args)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert [e["step"] for e in events(run_dir, "resume")] == expected_resumes
    assert losses(run_dir) == losses(forty_step_reference)  # every one of the 40 steps, bit for bit
    assert not list(ckpt_dir.glob(".*"))
    assert fallback_order(ckpt_dir) == ["step_00000040", "step_00000035"]
    assert all(check_tag(ckpt_dir, t) is None for t in fallback_order(ckpt_dir))
    # W&B holds every step once: what a killed rank 0's W&B never wrote was logged again from metrics.jsonl.
    logs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    steps = [r["history"]["item"]["_step"] for log in logs for r in wandb_records(log) if r["type"] == "history"]
    assert sorted(steps) == list(range(1, 41))
