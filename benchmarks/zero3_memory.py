"""What building the model costs each rank: ZeRO-3 (``deepspeed.zero.Init``) against ZeRO-2 (the full model).

    python -m benchmarks.zero3_memory [--nproc 2] [--d-model 1024] [--n-layers 12]

Trains one step of the same model through ``lmscale train`` with ZeRO stage 2 and stage 3 on CPU ranks and
prints rank 0's ``start`` event: the peak resident memory that building the model (``model_build_gb``) and then
the DeepSpeed engine (``engine_build_gb``) added to what the rank held before, beside the full fp32 model.
The named baseline is ZeRO-2 in the same run, which materialises the whole model on every rank.

The ranks run with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc otherwise serves tensors of up to 32 MB from its
heap and keeps them in the resident set after they are freed, so the figure would count every full module that
ZeRO-3 built and partitioned again, not the memory the rank holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def start_event(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return next(r for r in map(json.loads, lines) if r.get("event") == "start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--n-layers", type=int, default=12)
    args = parser.parse_args()
    print(
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    from lmscale.data.demo_corpus import write_demo_corpus
    from lmscale.data.shard import PrepareOptions, prepare

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_demo_corpus(root / "corpus", max_bytes=300_000, files=1)
        data = root / "data"
        prepare(PrepareOptions(inputs=[str(root / "corpus")], output=data, seq_len=64, vocab_size=8192,
                               shard_size="100", in_process=True))  # fmt: skip
        events = {}
        for stage in (2, 3):
            run_dir = root / f"zero{stage}"
            sets = [f"data.path={data}", f"run.dir={run_dir}", f"zero.stage={stage}", f"model.d_model={args.d_model}",
                    f"model.n_layers={args.n_layers}", f"model.n_heads={args.d_model // 64}", "model.seq_len=64",
                    "trainer.micro_batch_size=1", "trainer.grad_accum_steps=1", "trainer.max_steps=1",
                    "trainer.eval_every_steps=0", "logging.wandb.mode=disabled", "data.num_workers=0"]  # fmt: skip
            command = [sys.executable, "-m", "launcher", "train", "configs/gpt-tiny.yaml", "--nproc", str(args.nproc)]
            command += [a for s in sets for a in ("--set", s)]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                print(result.stderr[-4000:])
                return 1
            events[stage] = start_event(run_dir)
    full = events[2]["full_model_fp32_gb"]
    print(f"\nmodel: d_model {args.d_model}, {args.n_layers} layers, {full * 1e3 / 4:.0f}M parameters "
          f"({full:.3f} GB in fp32), {args.nproc} CPU ranks; rank 0's peak resident memory added by")  # fmt: skip
    print("| ZeRO stage | building the model (GB) | x full model | + building the engine (GB) | x full model |")
    print("|---:|---:|---:|---:|---:|")
    for stage, e in events.items():
        print(f"| {stage} | {e['model_build_gb']:.3f} | {e['model_build_gb'] / full:.2f} | "
              f"{e['engine_build_gb']:.3f} | {e['engine_build_gb'] / full:.2f} |")  # fmt: skip
    ratio = events[3]["model_build_gb"] / events[2]["model_build_gb"]
    print(f"\nZeRO-3 model construction holds {ratio:.2f}x of ZeRO-2's (the baseline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
