"""What the trainer costs around the model's own step: ``lmscale train`` on CPU ranks against one process
running the bare training step on the same shape and batch.

    python -m benchmarks.trainer_overhead [--steps 60] [--nproc 2]

Baseline (measured in the same run): one process, all of the machine's threads, a loop of forward, backward and
``torch.optim.AdamW`` (foreach, as DeepSpeed runs torch's AdamW on CPU ranks) on lmscale's GPT, one batch of
``--micro-batch`` sequences already in memory. lmscale: ``lmscale train`` with ``--nproc`` ranks (one thread each),
ZeRO-2, ``--micro-batch`` sequences per rank, streamed from real shards by a loader worker per rank, with its
logging, W&B off and no checkpoint but the last. Its throughput is wall-clock: the tokens trained between the
first and the last logged step over the time between rank 0's console lines for them. The ratio is lmscale's tokens/s over the bare step's: with perfect scaling
over the cores and a free trainer it would be 1.0.

The default shape is the issue's: six blocks of 384, 256 tokens, 4 sequences per rank, an 8192-token vocabulary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def prepare_dataset(workdir: Path, seq_len: int, vocab_size: int) -> Path:
    from lmscale.data.demo_corpus import write_demo_corpus
    from lmscale.data.shard import PrepareOptions, prepare

    out = workdir / "data"
    if (out / "manifest.json").is_file():
        return out
    write_demo_corpus(workdir / "corpus", max_bytes=4_000_000)
    prepare(PrepareOptions(inputs=[str(workdir / "corpus")], output=out, seq_len=seq_len, vocab_size=vocab_size,
                           shard_size="200", val_fraction=0.01, in_process=True))  # fmt: skip
    return out


def bare_step_tokens_per_s(args: argparse.Namespace, vocab_size: int) -> float:
    from lmscale.families import build_model
    from lmscale.models.gpt import GPTConfig

    cfg = GPTConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, seq_len=args.seq_len,
                    vocab_size=vocab_size)  # fmt: skip
    model = build_model(cfg, torch.Generator().manual_seed(0)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(0, vocab_size, (args.micro_batch, args.seq_len + 1))
    times = []
    for step in range(args.bare_steps + 3):
        started = time.perf_counter()
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 3:
            times.append(time.perf_counter() - started)
    return args.micro_batch * args.seq_len / statistics.median(times)


def lmscale_tokens_per_s(
    args: argparse.Namespace, dataset: Path, run_dir: Path, extra: tuple[str, ...] = ()
) -> tuple[float, list[dict]]:
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume of the last one
    sets = [f"data.path={dataset}", f"run.dir={run_dir}", f"model.d_model={args.d_model}",
            f"model.n_layers={args.n_layers}", f"model.n_heads={args.n_heads}", f"model.seq_len={args.seq_len}",
            "model.dropout=0.0", f"trainer.micro_batch_size={args.micro_batch}", "trainer.grad_accum_steps=1",
            f"trainer.max_steps={args.steps}", "trainer.eval_every_steps=0", "checkpoint.every_steps=0",
            "zero.stage=2", f"logging.every_steps={args.log_every}", "logging.wandb.mode=disabled",
            "logging.peak_flops=1e12", "schedule.warmup_steps=5", *extra]  # fmt: skip
    command = [sys.executable, "-m", "launcher", "train", "configs/gpt-tiny.yaml", "--nproc", str(args.nproc)]
    for item in sets:
        command += ["--set", item]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"lmscale train failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Wall-clock time between two logged steps, from rank 0's console timestamps: independent of how the
    # trainer times its own steps.
    logged = {
        int(m.group(2)): m.group(1) for m in re.finditer(r"^(\S+ \S+) \[rank 0\] INFO step (\d+)/", result.stderr, re.M)
    }
    first, last = min(s for s in logged if s >= args.log_every), max(logged)
    seconds = parse_time(logged[last]) - parse_time(logged[first])
    tokens = (last - first) * args.nproc * args.micro_batch * args.seq_len
    return tokens / seconds, records


def parse_time(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The run both sides train: the issue's shape by default."""
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--bare-steps", type=int, default=20)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--n-layers", type=int, default=6)
    parser.add_argument("--n-heads", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per rank (and of the bare step)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lmscale-trainer-overhead")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements of each side")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_arguments(parser)
    args = parser.parse_args(argv)

    from lmscale.data.manifest import read_manifest
    from lmscale.train.peak import cpu_description

    dataset = prepare_dataset(args.workdir, args.seq_len, args.vocab_size)
    vocab = read_manifest(dataset).vocab_size
    print(f"# lmscale train against the bare training step, {time.strftime('%Y-%m-%d')}")
    print(f"#   {cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads in the bare step")
    print(f"#   shape: {args.n_layers} blocks of {args.d_model}, seq {args.seq_len}, vocab {vocab}, "
          f"{args.micro_batch} sequences per rank; lmscale: {args.nproc} ranks, ZeRO-2, {args.steps} steps")  # fmt: skip
    bare, ours = [], []
    for round_ in range(args.rounds):
        bare.append(bare_step_tokens_per_s(args, vocab))
        tokens_per_s, _ = lmscale_tokens_per_s(args, dataset, args.workdir / f"run{round_}")
        ours.append(tokens_per_s)
    b, o = statistics.median(bare), statistics.median(ours)
    print(
        f"bare step, 1 process (baseline)      {b:10,.0f} tokens/s   1.00x baseline   rounds {[round(x) for x in bare]}"
    )
    print(f"lmscale train, {args.nproc} ranks              {o:10,.0f} tokens/s   {o / b:.2f}x baseline   "
          f"rounds {[round(x) for x in ours]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
