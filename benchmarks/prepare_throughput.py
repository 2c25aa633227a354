"""`lmscale prepare` tokenization throughput with 1 and 2 Ray workers against plain `tokenizers`.

Baseline: one process calling `Tokenizer.encode_batch` on the same documents with one thread (each Ray
worker runs its tokenizer on one thread too). Also shown: `encode_batch_fast` (no character offsets),
the call `prepare` makes, so the Ray pipeline's own overhead can be read off. Reported: tokens/s of the tokenize phase of `prepare`
(reading, tokenizing and writing token files, Ray scheduling included; Ray start-up excluded), the
ratio to the baseline, and the scaling from 1 to 2 workers.

    python -m benchmarks.prepare_throughput --megabytes 20 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool

from tokenizers import Tokenizer

from benchmarks.common import write_corpus
from lmscale.data.shard import PrepareOptions, prepare
from lmscale.data.tokenizer import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=3, help="medians of this many interleaved runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        documents = write_corpus(root / "corpus", args.megabytes)
        tok = train_tokenizer(documents[:5000], 8192)
        tok.save(str(root / "tokenizer.json"))
        tok = Tokenizer.from_file(str(root / "tokenizer.json"))

        baselines: dict[str, list[float]] = {"encode_batch": [], "encode_batch_fast": []}
        rates_seen: dict[int, list[float]] = {1: [], 2: []}
        for attempt in range(args.repeat):  # interleaved, so drifting machine load hits every variant alike
            for method, seen in baselines.items():
                encode = getattr(tok, method)
                started = time.perf_counter()
                tokens = 0
                for i in range(0, len(documents), 512):
                    tokens += sum(len(e.ids) + 1 for e in encode(documents[i : i + 512], add_special_tokens=False))
                seen.append(tokens / (time.perf_counter() - started))
            for workers in (1, 2):
                manifest = prepare(
                    PrepareOptions(
                        inputs=[str(root / "corpus")], output=root / f"out{workers}-{attempt}", seq_len=1024,
                        tokenizer=str(root / "tokenizer.json"), workers=workers, val_fraction=0.0,
                    )
                )  # fmt: skip
                rates_seen[workers].append(manifest.stats["tokens"] / manifest.stats["tokenize_seconds"])
                assert manifest.stats["tokens"] == tokens
        baseline = statistics.median(baselines["encode_batch"])
        fast = statistics.median(baselines["encode_batch_fast"])
        rates = {w: statistics.median(r) for w, r in rates_seen.items()}

    print(f"medians of {args.repeat} interleaved runs")
    print(f"corpus: {args.megabytes:.0f} MB, {len(documents):,} documents, {tokens:,} tokens")
    print(f"baseline tokenizers encode_batch (1 process, 1 thread): {baseline:,.0f} tokens/s")
    print(f"tokenizers encode_batch_fast, the call prepare makes (1 process, 1 thread): {fast:,.0f} tokens/s")
    for workers, rate in rates.items():
        print(f"lmscale prepare, {workers} Ray worker(s): {rate:,.0f} tokens/s = {rate / baseline:.2f}x baseline")
    print(f"scaling 1 -> 2 workers: {rates[2] / rates[1]:.2f}x")
    print(f"overhead at 1 worker against the same call (encode_batch_fast): {1 - rates[1] / fast:.1%}")


if __name__ == "__main__":
    main()
