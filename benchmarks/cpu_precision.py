"""bf16 against fp32 on CPU ranks: ``lmscale train`` of the same shape, batch and data in both precisions,
alternating, in one run.

    python -m benchmarks.cpu_precision [--rounds 2]

bf16 weights with fp32 gradient accumulation and fp32 master weights (DeepSpeed's bf16 mode, as on GPUs)
against plain fp32. It pays only on a CPU with native bf16 (AMX or AVX512-BF16: oneDNN's bf16 matrix
products); elsewhere bf16 is emulated and the run warns that it will be slow. The script prints the CPU's
capability and flags, each precision's tokens/s (wall-clock, as benchmarks/trainer_overhead.py measures it) and
its last loss: both must train.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.trainer_overhead import lmscale_tokens_per_s, prepare_dataset, shape_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_arguments(parser)
    args = parser.parse_args(argv)
    from lmscale.train.peak import cpu_description

    dataset = prepare_dataset(args.workdir, args.seq_len, args.vocab_size)
    print(f"# lmscale train in bf16 against fp32 on CPU ranks, {time.strftime('%Y-%m-%d')}")
    print(f"#   {cpu_description()}, torch {torch.__version__}; {args.nproc} ranks, ZeRO-2, {args.n_layers} blocks "
          f"of {args.d_model}, seq {args.seq_len}, {args.micro_batch} sequences per rank, {args.steps} steps")  # fmt: skip
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    last_loss: dict[str, float] = {}
    for round_ in range(args.rounds):
        for precision in rates:
            rate, records = lmscale_tokens_per_s(
                args, dataset, args.workdir / f"{precision}{round_}", (f"trainer.precision={precision}",)
            )
            rates[precision].append(rate)
            last_loss[precision] = next(r["loss"] for r in reversed(records) if "loss" in r)
    fp32 = statistics.median(rates["fp32"])
    for precision, values in rates.items():
        rate = statistics.median(values)
        label = "fp32 (baseline)" if precision == "fp32" else "bf16"
        print(f"{label:16s} {rate:10,.0f} tokens/s   {rate / fp32:.2f}x baseline   last loss {last_loss[precision]:.4f}"
              f"   rounds {[round(v) for v in values]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
