"""The Transformers against the recurrent models they replaced, at equal parameters and tokens, on the demo
corpora: GPT against LSTM and GRU language models (``--part lm``), and T5 against the recurrent encoder-decoder
with additive and with dot attention on the translation task (``--part translation``).

- **Language models.** The GPT is ``configs/gpt-tiny.yaml`` as ``lmscale demo`` trains it; each recurrent model
  has two layers of the width whose parameter count (tied embedding included) is nearest the GPT's. All
  three train the same steps, batch and windows of the demo dataset on the same ranks and ZeRO stage, are
  scored on its whole validation split by ``lmscale eval --per-position``, and are compared by ``lmscale
  report``. Printed: the table, each recurrent model's validation loss against the GPT's (the named
  baseline), and the loss by position.
- **Translation.** ``configs/t5-tiny.yaml`` and ``configs/rnn-attention.yaml`` (two LSTM layers each side, of
  the width whose parameter count is nearest T5's) are pretrained for the same few steps on the span-corruption
  shards of the demo translation task (``launcher.demo.demo_translation``), then fine-tuned with their
  ``*-translate.yaml`` configs (same pairs, batch, steps, beams and validation). Printed: the report of the
  fine-tunes, each model's best validation BLEU against T5's (the named baseline), and the BLEU of copying
  the source.

    python -m benchmarks.recurrent_baselines [--part lm translation] [--workdir /tmp/lmscale-baselines]
        [--steps 150] [--finetune-steps 1500] [--nproc 2]
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

from launcher.demo import DEMO_LR, demo_dataset, demo_translation
from lmscale.config import load_config
from lmscale.data.manifest import read_manifest
from lmscale.families import build_model
from lmscale.models import count_parameters
from lmscale.models.rnn import RNNConfig

REPO = Path(__file__).resolve().parents[1]
CELLS = ("lstm", "gru")
ATTENTIONS = ("additive", "dot")
PRETRAIN_STEPS = 10
"""As ``tests/test_t5_finetune.py`` pretrains: at this size and corpus longer span-corruption pretraining
makes the same fine-tune worse (README, "Fine-tuning for translation")."""


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"lmscale {' '.join(args[:2])} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def parameters(model_cfg: object) -> int:
    with torch.device("meta"):
        return count_parameters(build_model(model_cfg))


def matching_width(target: int, vocab_size: int, seq_len: int, **fields: object) -> int:
    """The width (a multiple of 8) of a two-layer recurrent model (``fields`` of ``RNNConfig``) with the
    parameter count nearest ``target``."""
    counts = {d: parameters(RNNConfig(d_model=d, n_layers=2, vocab_size=vocab_size, seq_len=seq_len, **fields))  # type: ignore[arg-type]
              for d in range(64, 1025, 8)}  # fmt: skip
    return min(counts, key=lambda d: abs(counts[d] - target))


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def language_models(args: argparse.Namespace) -> None:
    data = demo_dataset(args.workdir)
    manifest = read_manifest(data)
    common = [f"data.path={data}", f"trainer.max_steps={args.steps}", f"optim.lr={DEMO_LR}", "zero.stage=2",
              "logging.wandb.mode=disabled", "trainer.eval_every_steps=50", "checkpoint.every_steps=0"]  # fmt: skip
    gpt = load_config(REPO / "configs" / "gpt-tiny.yaml", [*common, f"model.vocab_size={manifest.vocab_size}",
                                                            f"model.seq_len={manifest.seq_len}"]).model  # fmt: skip
    target = parameters(gpt)
    runs = {"gpt-tiny": ("configs/gpt-tiny.yaml", [])}
    for cell in CELLS:
        width = matching_width(target, manifest.vocab_size, manifest.seq_len, cell=cell)
        runs[f"{cell}-{width}"] = ("configs/rnn-tiny.yaml", [f"model.cell={cell}", f"model.d_model={width}",
                                                              "model.n_layers=2"])  # fmt: skip
    curves = {}
    for name, (config, extra) in runs.items():
        run_dir = args.workdir / "runs" / name
        overrides = [*common, *extra, f"run.dir={run_dir}"]
        if not (run_dir / "metrics.jsonl").is_file():
            cli("train", config, "--nproc", str(args.nproc), *sets(overrides))
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


def translation(args: argparse.Namespace) -> None:
    import sacrebleu

    task = demo_translation(args.workdir / "translation")
    manifest = read_manifest(task["span_corruption"])
    shapes = [f"model.vocab_size={manifest.vocab_size}", f"model.seq_len={manifest.seq_len}"]
    target = parameters(load_config(REPO / "configs" / "t5-tiny.yaml", shapes).model)
    models = {"t5-tiny": ("configs/t5-tiny.yaml", "configs/t5-tiny-translate.yaml", [])}
    for attention in ATTENTIONS:
        width = matching_width(target, manifest.vocab_size, manifest.seq_len, encoder_decoder=True,
                               attention=attention)  # fmt: skip
        models[f"lstm-{attention}-{width}"] = ("configs/rnn-attention.yaml", "configs/rnn-attention-translate.yaml",
                                               [f"model.attention={attention}", f"model.d_model={width}"])  # fmt: skip
    quiet = ["logging.wandb.mode=disabled", "checkpoint.every_steps=0"]
    runs = args.workdir / "translation" / "runs"
    for name, (config, translate, extra) in models.items():
        pretrained, tuned = runs / f"{name}-pretrained", runs / name
        if not (pretrained / "metrics.jsonl").is_file():
            pretrain = [f"data.path={task['span_corruption']}", f"trainer.max_steps={PRETRAIN_STEPS}",
                        "trainer.eval_every_steps=0", f"checkpoint.every_steps={PRETRAIN_STEPS}",
                        "logging.wandb.mode=disabled", f"run.dir={pretrained}", *extra]  # fmt: skip
            cli("train", config, "--nproc", str(args.nproc), *sets(pretrain))
        if not (tuned / "metrics.jsonl").is_file():
            finetune = [f"finetune.train={task['train']}", f"finetune.validation={task['validation']}",
                        f"model.init_from={pretrained}", f"trainer.max_steps={args.finetune_steps}",
                        f"run.dir={tuned}", *quiet]  # fmt: skip
            cli("finetune", translate, "--nproc", str(args.nproc), *sets(finetune))
    output = args.workdir / "translation" / "comparison.png"
    print(cli("report", *(str(runs / name) for name in models), "--output", str(output)), end="")
    rows = [json.loads(line) for line in task["validation"].read_text(encoding="utf-8").splitlines()]
    copying = sacrebleu.corpus_bleu([r["source"] for r in rows], [[r["target"] for r in rows]]).score
    best = {name: max(r["val_bleu"] for r in metrics(runs / name) if "val_bleu" in r) for name in models}
    for name, bleu in best.items():
        print(f"{name:<22} best validation BLEU {bleu:.2f}, {bleu / best['t5-tiny']:.3f}x t5-tiny's")
    print(f"{'copying the source':<22} BLEU {copying:.2f}")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=("lm", "translation"), default=["lm", "translation"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lmscale-baselines"))
    parser.add_argument("--steps", type=int, default=150, help="the language models' training steps")
    parser.add_argument("--finetune-steps", type=int, default=1500, help="the translation fine-tunes' steps")
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, amx: {'amx_bf16' in flags}, torch {torch.__version__}")  # fmt: skip
    if "lm" in args.part:
        language_models(args)
    if "translation" in args.part:
        translation(args)


if __name__ == "__main__":
    main()
