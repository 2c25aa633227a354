"""Shared fixtures: a small real corpus, a dataset prepared from it with real Ray workers, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmscale.data.demo_corpus import write_demo_corpus
from lmscale.data.shard import PrepareOptions, prepare

REPO = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.seq_len=64",
    "trainer.micro_batch_size=4",
    "trainer.grad_accum_steps=2",
    "trainer.eval_batches=2",
    "logging.every_steps=1",
    "logging.wandb.mode=disabled",
    "schedule.warmup_steps=2",
    "optim.lr=3e-3",
]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(out, max_bytes=250_000, files=3)
    return out


@pytest.fixture(scope="session")
def dataset(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "tiny"
    options = PrepareOptions(
        inputs=[str(corpus_dir)], output=out, seq_len=64, vocab_size=512, shard_size="50", val_fraction=0.1, workers=2
    )
    prepare(options)
    return out


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``lmscale`` as a user would, in a fresh process."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
