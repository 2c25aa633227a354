"""The GPU check: the whole training path on one GPU in one command, in a few minutes.

    python -m benchmarks.gpu_check [--steps 40] [--workdir /tmp/lmscale-gpu-check]

Needs torch, deepspeed, numpy, transformers, tokenizers, safetensors, webdataset and the project (run from the
repository root); never Ray or wandb. It

1. builds a dataset from text it finds on the machine (Python's docstrings), tokenized in this process;
2. trains the ``configs/gpt2-124m.yaml`` shape in bf16 for ZeRO stages 1, 2 and 3 through ``lmscale train``
   (the node launcher, the rendezvous store, NCCL), a few dozen steps each;
3. resumes the stage-1 run from its mid-way checkpoint and compares the losses with the uninterrupted run;
4. exports the resumed run to a Hugging Face directory (export checks the logits against ``transformers``);
5. prints tokens/s, MFU and peak memory per stage, and PASS/FAIL per check; exits 1 if any check failed.

``--tiny`` runs the same steps with a small fp32 model on CPU ranks: the test suite's smoke run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "gpt2-124m.yaml"
TINY_SHAPE = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.seq_len=64", "model.vocab_size=1024",
              "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "trainer.precision=fp32", "optim.lr=3e-3"]  # fmt: skip
STEADY_AFTER = 5
"""Steps excluded from the throughput figures (CUDA warm-up, allocator growth, first checkpoint)."""


@dataclass
class StageResult:
    stage: int
    losses: dict[int, float]
    tokens_per_s: float
    mfu: float | None
    peak_memory_gb: float
    model_build_gb: float
    """Device memory that building the model took (the ``start`` event): under ZeRO-3 inside zero.Init."""
    seconds: float


def header() -> None:
    import torch

    lines = [f"date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"python {sys.version.split()[0]}",
             f"torch {torch.__version__}", f"cpu capability {torch.backends.cpu.get_cpu_capability()}"]  # fmt: skip
    for name in ("deepspeed", "transformers", "tokenizers", "webdataset"):
        try:
            module = __import__(name)
            lines.append(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError:
            lines.append(f"{name} missing")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"gpu {props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible")
    else:
        lines.append("gpu none")
    print("# lmscale GPU check\n" + "\n".join(f"  {line}" for line in lines), flush=True)


def build_dataset(workdir: Path, seq_len: int, vocab_size: int, corpus_bytes: int) -> Path:
    from lmscale.data.demo_corpus import write_demo_corpus
    from lmscale.data.shard import PrepareOptions, prepare

    out = workdir / "data"
    write_demo_corpus(workdir / "corpus", max_bytes=corpus_bytes)
    options = PrepareOptions(inputs=[str(workdir / "corpus")], output=out, seq_len=seq_len, vocab_size=vocab_size,
                             shard_size="200", val_fraction=0.02, in_process=True, overwrite=True)  # fmt: skip
    manifest = prepare(options)
    print(f"dataset {out}: {manifest.splits['train'].samples} samples of {seq_len + 1} tokens", flush=True)
    return out


def train(run_dir: Path, overrides: list[str], nproc: int, log: Path, config: Path = CONFIG) -> float:
    """``lmscale train`` of ``config`` as a user runs it; returns the wall time. Stops the check on failure."""
    command = [sys.executable, "-m", "launcher", "train", str(config), "--nproc", str(nproc)]
    command += [a for item in [*overrides, f"run.dir={run_dir}"] for a in ("--set", item)]
    started = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"})  # fmt: skip
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        print(log.read_text()[-6000:])
        raise SystemExit(f"FAIL: {' '.join(command)} exited with {result.returncode} (log {log})")
    return seconds


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def summarise(stage: int, run_dir: Path, seconds: float) -> StageResult:
    steps = step_records(run_dir)
    steady = [r for r in steps if r["step"] > STEADY_AFTER] or steps
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return StageResult(
        stage=stage,
        losses={r["step"]: r["loss"] for r in steps},
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
        mfu=statistics.median(mfus) if mfus else None,
        peak_memory_gb=max(r["memory_gb"] for r in steps),
        model_build_gb=next(r for r in records(run_dir) if r.get("event") == "start")["model_build_gb"],
        seconds=seconds,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per ZeRO stage")
    parser.add_argument("--global-batch", type=int, default=128, help="sequences per step (x 1024 tokens)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lmscale-gpu-check"))
    parser.add_argument("--tiny", action="store_true", help="a small fp32 model on CPU ranks (smoke test)")
    args = parser.parse_args()
    started = time.perf_counter()
    header()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    if args.tiny:
        data = build_dataset(args.workdir, seq_len=64, vocab_size=1024, corpus_bytes=500_000)
    else:
        data = build_dataset(args.workdir, seq_len=1024, vocab_size=8192, corpus_bytes=4_000_000)
    half = args.steps // 2
    common = [f"data.path={data}", f"trainer.max_steps={args.steps}", f"schedule.total_steps={args.steps}",
              f"schedule.warmup_steps={max(1, args.steps // 4)}", "trainer.eval_every_steps=0", "logging.every_steps=1",
              "logging.wandb.mode=disabled", "data.num_workers=2", f"checkpoint.every_steps={half}",
              "checkpoint.keep_last=2"]  # fmt: skip
    if args.tiny:
        common += TINY_SHAPE
    else:
        common += [f"trainer.global_batch_size={args.global_batch}"]
    nproc = 1
    checks: list[tuple[str, bool, str]] = []

    results = []
    for stage in (1, 2, 3):
        run_dir = args.workdir / "runs" / f"zero{stage}"
        seconds = train(run_dir, [*common, f"zero.stage={stage}"], nproc, args.workdir / f"zero{stage}.log")
        results.append(summarise(stage, run_dir, seconds))
        r = results[-1]
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "n/a"
        print(f"ZeRO-{stage}: {r.tokens_per_s:,.0f} tokens/s, MFU {mfu}, peak memory {r.peak_memory_gb:.2f} GB, "
              f"loss {r.losses[1]:.4f} -> {r.losses[args.steps]:.4f}, {seconds:.0f} s", flush=True)  # fmt: skip
        checks.append((f"ZeRO-{stage} loss falls", r.losses[args.steps] < 0.95 * r.losses[1],
                       f"{r.losses[1]:.4f} -> {r.losses[args.steps]:.4f}"))  # fmt: skip
    first = [r.losses[1] for r in results]
    spread = max(first) - min(first)
    checks.append(("same first-step loss in every stage", spread < 1e-2, f"spread {spread:.2e}"))

    # Resume: a copy of the stage-1 run cut back to its mid-way checkpoint, trained on to the end.
    full = args.workdir / "runs" / "zero1"
    resumed = args.workdir / "runs" / "zero1-resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{args.steps:08d}")
    (resumed / "checkpoints" / "latest").write_text(f"step_{half:08d}")
    seconds = train(resumed, [*common, "zero.stage=1"], nproc, args.workdir / "resume.log")
    after = {r["step"]: r["loss"] for r in step_records(resumed)}
    diff = max(abs(after[s] - results[0].losses[s]) for s in range(half + 1, args.steps + 1))
    # GPU kernels (embedding backward's atomics) are not bit-reproducible, so the resumed losses agree to
    # rounding rather than exactly; on CPU they are identical.
    checks.append(("resume continues the run", diff < 2e-2, f"max |loss diff| {diff:.2e} over steps {half + 1}-"
                   f"{args.steps}, {seconds:.0f} s"))  # fmt: skip

    from lmscale.export.export import export_checkpoint

    export_started = time.perf_counter()
    exported = export_checkpoint(resumed, args.workdir / "exported", overwrite=True)
    checks.append(("export matches transformers", exported.max_abs_diff <= exported.tolerance,
                   f"{exported.architecture}: max |logit diff| {exported.max_abs_diff:.2e} <= {exported.tolerance:.2e}, "
                   f"{time.perf_counter() - export_started:.0f} s"))  # fmt: skip

    print("\n| ZeRO stage | tokens/s | MFU | peak memory (GB) | building the model (GB) | wall time (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "n/a"
        print(f"| {r.stage} | {r.tokens_per_s:,.0f} | {mfu} | {r.peak_memory_gb:.2f} | {r.model_build_gb:.3f} | "
              f"{r.seconds:.0f} |")  # fmt: skip
    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
