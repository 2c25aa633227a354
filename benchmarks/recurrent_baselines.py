"""GPT against LSTM and GRU language models at equal parameters and tokens, on the demo corpus.

The GPT is ``configs/gpt-tiny.yaml`` as ``lmscale demo`` trains it; each recurrent model has two layers of the
width whose parameter count (tied embedding included) is nearest the GPT's. All three train the same steps,
batch and windows of the demo dataset on the same ranks and ZeRO stage, are scored on its whole validation
split by ``lmscale eval --per-position``, and are compared by ``lmscale report``. Printed: the table, each
recurrent model's validation loss against the GPT's (the named baseline), and the loss by position.

    python -m benchmarks.recurrent_baselines [--workdir /tmp/lmscale-baselines] [--steps 150] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from launcher.demo import DEMO_LR, demo_dataset
from lmscale.config import load_config
from lmscale.data.manifest import read_manifest
from lmscale.families import build_model
from lmscale.models import count_parameters
from lmscale.models.rnn import RNNConfig

REPO = Path(__file__).resolve().parents[1]
CELLS = ("lstm", "gru")


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"lmscale {' '.join(args[:2])} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def parameters(model_cfg: object) -> int:
    with torch.device("meta"):
        return count_parameters(build_model(model_cfg))


def matching_width(cell: str, target: int, vocab_size: int, seq_len: int) -> int:
    """The width (a multiple of 8) of a two-layer ``cell`` model with the parameter count nearest ``target``."""
    counts = {d: parameters(RNNConfig(cell=cell, d_model=d, n_layers=2, vocab_size=vocab_size, seq_len=seq_len))
              for d in range(64, 1025, 8)}  # fmt: skip
    return min(counts, key=lambda d: abs(counts[d] - target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lmscale-baselines"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, amx: {'amx_bf16' in flags}, torch {torch.__version__}")  # fmt: skip
    data = demo_dataset(args.workdir)
    manifest = read_manifest(data)
    common = [f"data.path={data}", f"trainer.max_steps={args.steps}", f"optim.lr={DEMO_LR}", "zero.stage=2",
              "logging.wandb.mode=disabled", "trainer.eval_every_steps=50", "checkpoint.every_steps=0"]  # fmt: skip
    gpt = load_config(REPO / "configs" / "gpt-tiny.yaml", [*common, f"model.vocab_size={manifest.vocab_size}",
                                                            f"model.seq_len={manifest.seq_len}"]).model  # fmt: skip
    target = parameters(gpt)
    runs = {"gpt-tiny": ("configs/gpt-tiny.yaml", [])}
    for cell in CELLS:
        width = matching_width(cell, target, manifest.vocab_size, manifest.seq_len)
        runs[f"{cell}-{width}"] = ("configs/rnn-tiny.yaml", [f"model.cell={cell}", f"model.d_model={width}",
                                                              "model.n_layers=2"])  # fmt: skip
    curves = {}
    for name, (config, extra) in runs.items():
        run_dir = args.workdir / "runs" / name
        overrides = [*common, *extra, f"run.dir={run_dir}"]
        if not (run_dir / "metrics.jsonl").is_file():
            cli("train", config, "--nproc", str(args.nproc), *(a for o in overrides for a in ("--set", o)))
        cli("eval", str(run_dir), "--data", str(data), "--per-position", "--batch-size", "4")
        curves[name] = json.loads((run_dir / "per_position.json").read_text())
    output = args.workdir / "comparison.png"
    print(cli("report", *(str(args.workdir / "runs" / name) for name in runs), "--output", str(output)), end="")
    baseline = curves["gpt-tiny"]["loss"]
    for name, curve in curves.items():
        losses = curve["per_position_loss"]
        shown = "  ".join(f"{p} {losses[p - 1]:.3f}" for p in (1, 4, 16, 64, len(losses)))
        print(f"{name:<10} validation loss {curve['loss']:.4f} (whole split), {curve['loss'] / baseline:.3f}x "
              f"gpt-tiny's; by position: {shown}")  # fmt: skip


if __name__ == "__main__":
    main()
