"""The training stream's tokens/s per rank against what `configs/gpt2-124m.yaml` consumes on one GPU.

The GPU rate is the model's training FLOPs per token at 40% MFU of an H100 (989 TFLOP/s dense bf16),
unless `--gpu-tokens-per-s` gives a measured one. The stream is rank 0 of 8 as the trainer builds it:
micro-batches of 16 x 1024 tokens from a DataLoader with one worker, 16 lanes, shuffled, through one
whole epoch of many small shards, so every shard it needs is fetched, sha256-checked and parsed (no
measurement from a cache of a shard already read). It also prints how many shards the rank read.

    python -m benchmarks.stream_throughput [--run runs/<name>]   # --run adds that run's data-wait fraction
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from benchmarks.common import write_corpus
from lmscale.config import load_config
from lmscale.data.manifest import read_manifest
from lmscale.data.shard import PrepareOptions, prepare
from lmscale.data.stream import ShardStream, StreamSource, split_shards
from lmscale.families import flops_per_token

H100_BF16_PEAK = 989.4e12
REPO = Path(__file__).resolve().parents[1]


def gpu_rate() -> float:
    cfg = load_config(REPO / "configs" / "gpt2-124m.yaml")
    model = cfg.model
    assert model.seq_len is not None
    return 0.4 * H100_BF16_PEAK / flops_per_token(model, model.seq_len)


def shards_read_by(stream: ShardStream, batches: int) -> int:
    """Shards a fresh copy of ``stream`` reads for its first ``batches`` micro-batches (the loader worker's own
    count stays in its process)."""
    fresh = ShardStream(stream.sources, stream.sample_len, str(stream.dtype), stream.micro_batch_size, stream.rank,
                        stream.world_size, stream.seed, lanes=stream.lanes)  # fmt: skip
    for i in range(batches):
        fresh.micro_batch(i)
    return fresh.shards_read


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu-tokens-per-s", type=float, help="a measured gpt2-124m rate on one GPU")
    parser.add_argument("--megabytes", type=float, default=60, help="text to prepare (more gives a longer epoch)")
    parser.add_argument("--run", help="a run directory whose metrics.jsonl gives the data-wait fraction")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_corpus(root / "corpus", args.megabytes)
        prepare(PrepareOptions(inputs=[str(root / "corpus")], output=root / "data", seq_len=1024, workers=2,
                               val_fraction=0.0, shard_size="256"))  # fmt: skip
        manifest = read_manifest(root / "data")
        shards = split_shards(str(root / "data"), manifest, "train")
        world, micro = 8, 16
        stream = ShardStream([StreamSource(shards)], manifest.sample_len, manifest.dtype, micro_batch_size=micro,
                             rank=0, world_size=world, seed=0, lanes=16)  # fmt: skip
        batches = manifest.splits["train"].samples // (micro * world)
        loader = iter(DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4))
        next(loader)  # worker start-up is paid once per run, not per step
        started = time.perf_counter()
        for _ in range(batches - 1):
            next(loader)
        rate = (batches - 1) * micro * 1024 / (time.perf_counter() - started)
        reads = shards_read_by(stream, batches)
    gpu = args.gpu_tokens_per_s or gpu_rate()
    source = "measured" if args.gpu_tokens_per_s else "40% MFU of an H100"
    print(f"stream: {rate:,.0f} tokens/s per rank over one epoch (micro-batch 16 x 1024, rank 0 of 8, 16 lanes)")
    print(f"shards read by the rank in that epoch: {reads} of {len(shards)}")
    print(f"gpt2-124m on one GPU ({source}): {gpu:,.0f} tokens/s")
    print(f"ratio: {rate / gpu:.1f}x (target >= 10x)")
    if args.run:
        records = [json.loads(line) for line in (Path(args.run) / "metrics.jsonl").read_text().splitlines()]
        waits = [r["data_wait_frac"] for r in records if r.get("data_wait_frac") is not None]
        print(f"data-wait fraction of {args.run}: mean {sum(waits) / len(waits):.2%} over {len(waits)} logged steps")


if __name__ == "__main__":
    main()
