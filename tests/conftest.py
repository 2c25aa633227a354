"""Shared fixtures: a small real corpus, a dataset prepared from it with real Ray workers, and a CLI runner."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmscale.data.demo_corpus import stdlib_docstrings, write_demo_corpus
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
    "logging.peak_flops=1e11",
]
"""A small, fast run. The peak FLOP/s for MFU is given, not measured (a second of matmuls at every start):
tests/test_cli_e2e.py keeps the measurement."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests need a CUDA device; without one they are skipped (CI has none, the device tool has one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


GLOBAL_BATCH_OVERRIDES = [*TINY_OVERRIDES, "trainer.grad_accum_steps=null", "trainer.global_batch_size=16",
                          "data.log_sample_keys=true", "trainer.eval_every_steps=0", "schedule.total_steps=6",
                          "checkpoint.every_steps=3"]  # fmt: skip
"""A run whose config fixes the global batch (16 sequences) instead of the accumulation: any world size that
divides it trains on the same samples per step."""


def config_args(config: str, nproc: int, settings: list[str], dataset: Path | str, run_dir: Path) -> list[str]:
    """``lmscale train CONFIG`` arguments: ``settings`` (then the dataset and run directory) as --set items."""
    args = ["train", config, "--nproc", str(nproc)]
    for item in [*settings, f"data.path={dataset}", f"run.dir={run_dir}"]:
        args += ["--set", item]
    return args


def train_args(dataset: Path | str, run_dir: Path, nproc: int, *overrides: str) -> list[str]:
    """``lmscale train`` arguments for a GLOBAL_BATCH_OVERRIDES run."""
    return config_args("configs/gpt-tiny.yaml", nproc, GLOBAL_BATCH_OVERRIDES, dataset, run_dir) + sets(overrides)


def sets(overrides: tuple[str, ...] | list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="session")
def two_rank_reference(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps of a GLOBAL_BATCH_OVERRIDES run on one node of 2 ranks: what other world sizes and routes match."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli(*train_args(dataset, run_dir, 2, "trainer.max_steps=6"))
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


FORTY_STEPS = ["trainer.max_steps=40", "schedule.total_steps=40", "model.dropout=0.1"]
"""A GLOBAL_BATCH_OVERRIDES run long enough to interrupt on purpose (a step takes about 0.1 s on 2 CPU ranks),
with dropout, so that an interrupted run matches it only if each rank's random state was restored."""


@pytest.fixture(scope="session")
def forty_step_reference(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted FORTY_STEPS run of ``lmscale train`` on 2 ranks: what interrupted jobs must end on."""
    run_dir = tmp_path_factory.mktemp("forty") / "run"
    result = run_cli(*train_args(dataset, run_dir, 2, *FORTY_STEPS, "checkpoint.every_steps=100"))
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def error_lines(stderr: str) -> list[str]:
    """The ``lmscale: error:`` lines of a command's stderr, which must hold no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("lmscale: error:")]


def final_loss(run_dir: Path) -> float:
    return next(r["loss"] for r in reversed(metrics_records(run_dir)) if "loss" in r)


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss of a run's metrics.jsonl (a step trained again after a resume: its last value)."""
    return {r["step"]: r["loss"] for r in metrics_records(run_dir) if "loss" in r}


def lease_since(run_dir: Path) -> str:
    """When the job holding ``run_dir`` took it, as a refused start prints it."""
    from lmscale.job import lease

    holder = lease.read(run_dir)
    assert holder is not None, f"no job holds {run_dir}"
    return lease.clock(holder.started_at)


def wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and any(r.get("step", 0) >= step and "loss" in r
                                                          for r in metrics_records(run_dir)):  # fmt: skip
            return
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} did not reach step {step}")


def metrics_records(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def keys_per_step(run_dir: Path) -> dict[int, list[str]]:
    """Every rank's logged sample keys per step, merged and sorted."""
    import json

    merged: dict[int, list[str]] = {}
    for path in sorted((run_dir / "sample_keys").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            merged.setdefault(record["step"], []).extend(record["keys"])
    return {step: sorted(keys) for step, keys in merged.items()}


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


@pytest.fixture(scope="session")
def mlm_dataset(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus as masked-LM shards with a WordPiece tokenizer (what BERT trains on)."""
    out = tmp_path_factory.mktemp("prepared-mlm") / "tiny"
    options = PrepareOptions(inputs=[str(corpus_dir)], output=out, seq_len=64, vocab_size=600, shard_size="50",
                             val_fraction=0.1, tokenizer_kind="wordpiece", format="mlm", in_process=True)  # fmt: skip
    prepare(options)
    return out


@pytest.fixture(scope="session")
def t5_dataset(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus as span-corruption shards with a Unigram tokenizer and T5's sentinels (what T5 trains on)."""
    out = tmp_path_factory.mktemp("prepared-t5") / "tiny"
    prepare(PrepareOptions(inputs=[str(corpus_dir)], output=out, seq_len=64, vocab_size=600, shard_size="50",
                           val_fraction=0.1, tokenizer_kind="unigram", format="span_corruption", in_process=True))  # fmt: skip
    return out


CONCURRENCY = ("asyncio", "concurrent", "multiprocessing", "threading", "queue", "selectors", "subprocess", "socket")
TEXT_FORMATS = ("email", "html", "xml", "json", "csv", "configparser", "tomllib", "plistlib", "mailbox", "string",
                "base64", "quopri", "textwrap")  # fmt: skip


@pytest.fixture(scope="session")
def classification_task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tell two kinds of document apart: docstrings of the standard library's concurrency modules and of its
    text-format modules, 280 of each to train on (CSV) and 50 of each to validate on (JSONL)."""
    out = tmp_path_factory.mktemp("task")
    kinds = {"concurrency": stdlib_docstrings(10**8, CONCURRENCY), "formats": stdlib_docstrings(10**8, TEXT_FORMATS)}
    train = [(doc, label) for i in range(280) for label, docs in kinds.items() for doc in [docs[i]]]
    validation = [(doc, label) for i in range(280, 330) for label, docs in kinds.items() for doc in [docs[i]]]
    with open(out / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(train)
    with open(out / "validation.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": doc, "label": label}) + "\n" for doc, label in validation)
    return out / "train.csv", out / "validation.jsonl"


@pytest.fixture(scope="session")
def translation_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo's translation task (``launcher.demo.demo_translation``): English-German pairs of plain prose,
    ``train`` and 400 for ``validation``, and their texts as ``span_corruption`` shards to pretrain on."""
    from launcher.demo import demo_translation

    return demo_translation(tmp_path_factory.mktemp("translation"))


def first_pairs(pairs: Path, count: int, directory: Path) -> Path:
    """A pairs file in ``directory`` of the first ``count`` lines of the JSONL file ``pairs``."""
    subset = directory / f"{pairs.stem}{count}.jsonl"
    subset.write_text("".join(pairs.read_text(encoding="utf-8").splitlines(keepends=True)[:count]), encoding="utf-8")
    return subset


def bleu_of(result: subprocess.CompletedProcess) -> float:
    """The BLEU `lmscale eval MODEL --data PAIRS` printed."""
    assert result.stdout.startswith("bleu "), result.stdout + result.stderr[-2000:]
    return float(result.stdout.split()[1])


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``lmscale`` as a user would, in a fresh process; a variable ``env`` maps to None is unset."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true", **(env or {})}
    full_env = {name: value for name, value in full_env.items() if value is not None}
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def run_here(*args: str) -> subprocess.CompletedProcess:
    """``lmscale ARGS`` in the test's own process, for the commands that start no ranks (export, eval, generate,
    report): a process of their own imports torch and transformers again, about 3 s a call. Its result reads as
    ``run_cli``'s. ``run_cli`` stays for a test of what the command's process does (its imports, its exit),
    and for outputs compared exactly with what ranks decoded: in the full suite, after other tests ran in
    this process, an in-process eval's beams once scored BLEU 0.51 where validation and a fresh process
    scored 0.54."""
    from launcher.cli import main

    assert args[0] in ("export", "eval", "generate", "report"), args
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse's refusals
            code = exit.code if isinstance(exit.code, int) else 2
    return subprocess.CompletedProcess(["lmscale", *args], code, out.getvalue(), err.getvalue())


def damage_first_training_shard(dataset: Path, copy: Path) -> str:
    """Copy ``dataset`` to ``copy`` and truncate the shard that holds the first training position (run.seed
    1234, micro-batches of 4, default lanes); returns the shard's name."""
    import shutil

    from lmscale.config import DataConfig
    from lmscale.data.manifest import read_manifest
    from lmscale.data.stream import SourceOrder, split_shards

    shutil.copytree(dataset, copy)
    shards = split_shards(str(copy), read_manifest(copy), "train")
    order = SourceOrder(shards, 1234, 0, True, block=4, lanes=DataConfig().lanes)
    epoch, slot, _ = order.locate(0)
    victim = shards[order.shard_at(epoch, slot)]
    path = copy / "shards" / victim.name
    path.write_bytes(path.read_bytes()[:-512])
    return victim.name


def ensure_debian_packages(commands: dict[str, str]) -> None:
    """Install the Debian packages providing ``commands`` (command -> package) if any is missing: the test
    machines are root and reach Debian's mirrors, as CI does."""
    missing = [package for command, package in commands.items() if shutil.which(command) is None]
    if not missing:
        return
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)
