"""Throughput and memory at scale on one GPU, in one prepared command (about 8 minutes on an H100/H200), run
after ``benchmarks.gpu_check`` with the same carried wheels:

    python -m benchmarks.gpu_scale [--workdir /tmp/lmscale-gpu-scale]
    python -m benchmarks.gpu_scale --tiny          # one row of each kind, small shapes, CPU ranks (a slow test)

1. the 124M shape (``configs/gpt2-124m.yaml``, ZeRO-1, bf16) eager and compiled at micro-batch 16, 32 and 64;
2. the ~1.3B Llama (``configs/llama-1.3b.yaml``) at seq 2048 under ZeRO-1, activation checkpointing off and full;
3. ZeRO-3 on the largest Llama the memory estimate fits on the GPU, every block recomputed, a few steps;
4. the transformers + DeepSpeed baseline at 124M and 1.3B beside lmscale's step in the same harness
   (``benchmarks.train_vs_transformers``).

Every lmscale row is a real ``lmscale train --nproc 1`` (node launcher, NCCL, the loader, the trainer) and
reports tokens/s and MFU (medians of the logged windows after the first), the peak memory the rank measured and
the estimate its start event recorded before the first step. Rows print as they finish, so a run cut short
still reports what it measured. The targets it is read against: 124M >= 465k tokens/s on one H200; the 1.3B
Llama >= 50% MFU; >= 1.2x transformers + DeepSpeed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_check import REPO, build_dataset, header, records, train

LOG_EVERY = 4
"""Steps per logged window: the trainer reads its metrics back once a window (no host sync in between)."""


@dataclasses.dataclass
class Row:
    name: str
    tokens_per_s: float
    mfu: float | None
    peak_gb: float
    estimate_gb: float
    compile_s: float | None

    def line(self) -> str:
        mfu = f"{self.mfu:.1%}" if self.mfu is not None else "n/a"
        compiled = f"{self.compile_s:.0f}" if self.compile_s is not None else "-"
        return (f"| {self.name} | {self.tokens_per_s:,.0f} | {mfu} | {self.peak_gb:.2f} | {self.estimate_gb:.2f} | "
                f"{compiled} |")  # fmt: skip


def run_row(name: str, config: Path, overrides: list[str], workdir: Path) -> Row:
    run_dir = workdir / "runs" / name.replace(" ", "_").replace(",", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    train(run_dir, overrides, 1, workdir / f"{run_dir.name}.log", config=config)
    logged = records(run_dir)
    windows = [r for r in logged if "tokens_per_s" in r and r["step"] > LOG_EVERY] or [r for r in logged if "loss" in r]
    start = next(r for r in logged if r.get("event") == "start")
    mfus = [r["mfu"] for r in windows if r.get("mfu") is not None]
    row = Row(name, statistics.median(r["tokens_per_s"] for r in windows), statistics.median(mfus) if mfus else None,
              max(r["memory_gb"] for r in logged if "memory_gb" in r), start["memory_estimate_gb"]["total"],
              start.get("compile_seconds"))  # fmt: skip
    print(row.line(), flush=True)
    return row


def largest_llama_for_zero3(memory_gb: float, tiny: bool) -> tuple[str, list[str]]:
    """The largest of a few Llama shapes whose estimate fits 90% of the device under ZeRO-3 with every block
    recomputed, at micro-batch 1 x 2048."""
    from lmscale.config import load_config
    from lmscale.footprint import GB, estimate_memory

    shapes = [("Llama 13B", 5120, 40, 40, 13824), ("Llama 7B", 4096, 32, 32, 11008),
              ("Llama 3B", 3200, 26, 32, 8640), ("Llama 1.3B", 2048, 24, 16, 5504)]  # fmt: skip
    if tiny:
        shapes = [("Llama tiny", 128, 4, 4, 384)]
    base = load_config(REPO / "configs" / "llama-7b.yaml")
    for name, d, layers, heads, ff in shapes:
        sets = [f"model.d_model={d}", f"model.n_layers={layers}", f"model.n_heads={heads}",
                f"model.n_kv_heads={heads}", f"model.d_ff={ff}"]  # fmt: skip
        model = dataclasses.replace(base.model, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=heads, d_ff=ff)
        cfg = dataclasses.replace(base, model=model)
        estimate = estimate_memory(cfg, 1, 1, "cuda" if not tiny else "cpu", 2048 if not tiny else 64)
        if tiny or estimate.total <= 0.9 * memory_gb * GB:
            return name, sets
    return shapes[-1][0], []


def transformers_rows(shape: str, flavor: str, modes: list[str], tiny: bool) -> None:
    """Both sides in benchmarks.train_vs_transformers' harness, printed as it prints them."""
    for mode in modes:
        command = [sys.executable, "-m", "benchmarks.train_vs_transformers", "--shape", shape, "--flavor", flavor,
                   "--precision", "fp32" if tiny else "bf16", "--mode", mode, "--rounds", "1",
                   "--steps", "3" if tiny else "6", "--warmup", "1" if tiny else "3"]  # fmt: skip
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        rows = [line for line in result.stdout.splitlines() if line.startswith(f"| {flavor}")]
        if result.returncode != 0 or not rows:
            print(f"FAIL: {' '.join(command)}: {(result.stdout + result.stderr)[-2000:]}", flush=True)
        for line in rows:
            print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lmscale-gpu-scale"))
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per lmscale row")
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU ranks: a smoke run of the plan")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    header()
    import torch

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_scale needs a GPU (--tiny runs its plan on CPU ranks)")
    memory_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else 0.0
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    seq_short, seq_long = (64, 64) if args.tiny else (1024, 2048)
    data_short = build_dataset(args.workdir / "short", seq_len=seq_short, vocab_size=1024 if args.tiny else 8192,
                               corpus_bytes=300_000 if args.tiny else 4_000_000)  # fmt: skip
    data_long = data_short if args.tiny else build_dataset(args.workdir / "long", seq_len=seq_long, vocab_size=8192,
                                                           corpus_bytes=6_000_000)  # fmt: skip
    common = [f"trainer.max_steps={args.steps}", f"schedule.total_steps={args.steps}", "schedule.warmup_steps=2",
              "trainer.eval_every_steps=0", f"logging.every_steps={LOG_EVERY}", "logging.wandb.mode=disabled",
              "data.num_workers=2", "checkpoint.every_steps=0"]  # fmt: skip
    tiny = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=1024", "optim.lr=3e-3",
            "trainer.precision=fp32"] if args.tiny else []  # fmt: skip
    small, large = REPO / "configs" / "gpt2-124m.yaml", REPO / "configs" / "llama-1.3b.yaml"
    print("\n| lmscale train, 1 GPU | tokens/s | MFU | peak memory (GB) | estimate (GB) | compile (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    micro_batches = (2,) if args.tiny else (16, 32, 64)
    for compiled in (False, True):
        for micro in micro_batches:
            name = f"124M, micro-batch {micro}, {'compiled' if compiled else 'eager'}"
            sets = [f"data.path={data_short}", *common, *tiny, f"trainer.micro_batch_size={micro}",
                    f"trainer.global_batch_size={4 * max(micro_batches)}", f"trainer.compile={str(compiled).lower()}",
                    "model.seq_len=64" if args.tiny else "model.seq_len=1024"]  # fmt: skip
            run_row(name, small, sets, args.workdir)
    for setting in ("full",) if args.tiny else ("none", "full"):  # --tiny: one row of each kind
        micro = 2 if args.tiny else 8
        sets = [f"data.path={data_long}", *common, *tiny, f"trainer.micro_batch_size={micro}",
                f"trainer.global_batch_size={2 * micro}", f"trainer.activation_checkpointing={setting}",
                *(["model.seq_len=64", "model.n_kv_heads=4"] if args.tiny else [])]  # fmt: skip
        run_row(f"1.3B Llama, seq {seq_long}, ZeRO-1, checkpointing {setting}", large, sets, args.workdir)
    name, shape = largest_llama_for_zero3(memory_gb, args.tiny)
    sets = [f"data.path={data_long}", *common, *tiny, "trainer.micro_batch_size=1", "trainer.global_batch_size=2",
            "trainer.max_steps=4", "schedule.total_steps=4", "logging.every_steps=2", *shape,
            *(["model.seq_len=64"] if args.tiny else [])]  # fmt: skip
    run_row(f"{name}, ZeRO-3, checkpointing full", REPO / "configs" / "llama-7b.yaml", sets, args.workdir)
    print(
        f"\n# lmscale's step against transformers + DeepSpeed (same harness), {time.perf_counter() - started:.0f} s in"
    )
    print("| case | lmscale tokens/s | transformers tokens/s | ratio | first loss (lmscale / transformers) |")
    print("|---|---:|---:|---:|---|")
    transformers_rows(
        "tiny" if args.tiny else "124m", "gpt2", ["eager"] if args.tiny else ["eager", "compiled"], args.tiny
    )
    transformers_rows("tiny" if args.tiny else "1.3b", "llama", ["eager"], args.tiny)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
