"""The training stream's tokens/s per rank against what `configs/gpt2-124m.yaml` consumes on one GPU.

The GPU rate is the model's training FLOPs per token at 40% MFU of an H100 (989 TFLOP/s dense bf16),
unless `--gpu-tokens-per-s` gives a measured one. The stream reads real shards of 1024-token samples
and yields micro-batches of 16 as the trainer does (shuffled, rank 0 of 8).

    python -m benchmarks.stream_throughput [--run runs/<name>]   # --run adds that run's data-wait fraction
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_corpus
from lmscale.config import load_config
from lmscale.data.manifest import read_manifest
from lmscale.data.shard import PrepareOptions, prepare
from lmscale.data.stream import ShardStream, StreamSource, split_shards
from lmscale.models import flops_per_token
from lmscale.train.plan import gpt_config

H100_BF16_PEAK = 989.4e12
REPO = Path(__file__).resolve().parents[1]


def gpu_rate() -> float:
    cfg = load_config(REPO / "configs" / "gpt2-124m.yaml")
    model = gpt_config(cfg.model)
    return 0.4 * H100_BF16_PEAK / flops_per_token(model, model.seq_len)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu-tokens-per-s", type=float, help="a measured gpt2-124m rate on one GPU")
    parser.add_argument("--micro-batches", type=int, default=400)
    parser.add_argument("--run", help="a run directory whose metrics.jsonl gives the data-wait fraction")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_corpus(root / "corpus", 30)
        prepare(PrepareOptions(inputs=[str(root / "corpus")], output=root / "data", seq_len=1024, workers=2,
                               val_fraction=0.0, shard_size="32MB"))  # fmt: skip
        manifest = read_manifest(root / "data")
        stream = ShardStream([StreamSource(split_shards(str(root / "data"), manifest, "train"))], manifest.sample_len,
                             manifest.dtype, micro_batch_size=16, rank=0, world_size=8, seed=0)  # fmt: skip
        started = time.perf_counter()
        for i in range(args.micro_batches):
            stream.micro_batch(i)
        rate = args.micro_batches * 16 * 1024 / (time.perf_counter() - started)
    gpu = args.gpu_tokens_per_s or gpu_rate()
    source = "measured" if args.gpu_tokens_per_s else "40% MFU of an H100"
    print(f"stream: {rate:,.0f} tokens/s per rank (micro-batch 16 x 1024, shards read and checked)")
    print(f"gpt2-124m on one GPU ({source}): {gpu:,.0f} tokens/s")
    print(f"ratio: {rate / gpu:.1f}x (target >= 10x)")
    if args.run:
        records = [json.loads(line) for line in (Path(args.run) / "metrics.jsonl").read_text().splitlines()]
        waits = [r["data_wait_frac"] for r in records if r.get("data_wait_frac") is not None]
        print(f"data-wait fraction of {args.run}: mean {sum(waits) / len(waits):.2%} over {len(waits)} logged steps")


if __name__ == "__main__":
    main()
