"""``lmscale demo``: the whole path on the embedded default, with no download.

corpus (Python's own docstrings) -> ``prepare`` on local Ray -> ``train`` on CPU ranks with ZeRO stage 2
-> ``export`` to a Hugging Face directory -> a generated sample.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from launcher.infer import cmd_generate
from launcher.parser import build_parser
from launcher.train import train
from lmscale import run_layout
from lmscale.data.demo_corpus import write_demo_corpus
from lmscale.data.manifest import MANIFEST
from lmscale.data.shard import PrepareOptions, prepare, summary
from lmscale.export.export import export_checkpoint

log = logging.getLogger("lmscale")

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gpt-tiny.yaml"
DEMO_VOCAB = 4096
DEMO_LR = 3e-3
"""A vocabulary and learning rate a 1.9M-parameter model learns words with in its 150 steps: with 8192 tokens
and 1e-3 it ends near loss 5.8 and samples mostly newlines; with these, near 5.4 and sentences."""


def demo_dataset(workdir: Path) -> Path:
    """The demo's prepared dataset in ``workdir/data``, built from the demo corpus unless it is there."""
    data_dir = workdir / "data"
    if not (data_dir / MANIFEST).is_file():
        files = write_demo_corpus(workdir / "corpus", prose=True)
        log.info("demo corpus: %d files in %s", len(files), workdir / "corpus")
        options = PrepareOptions(
            inputs=[str(workdir / "corpus")], output=data_dir, seq_len=256, vocab_size=DEMO_VOCAB, val_fraction=0.05,
            shard_size="200", overwrite=True,
        )  # fmt: skip
        print(summary(prepare(options), data_dir))
    return data_dir


def demo(workdir: Path, nproc: int, steps: int) -> int:
    data_dir = demo_dataset(workdir)
    overrides = [f"data.path={data_dir}", f"run.dir={workdir / 'runs' / 'gpt-tiny'}", f"trainer.max_steps={steps}",
                 "zero.stage=2", f"optim.lr={DEMO_LR}"]  # fmt: skip
    # The console holds lmscale's lines; W&B's own (offline) go to its files, named once below.
    os.environ.setdefault("WANDB_SILENT", "true")
    args = build_parser().parse_args(
        ["train", str(TINY_CONFIG), "--nproc", str(nproc), *(a for o in overrides for a in ("--set", o))]
    )
    code = train(args)
    if code != 0:
        return code
    run_dir, exported = workdir / "runs" / "gpt-tiny", workdir / "exported" / "gpt-tiny"
    print(f"trained {run_dir}: metrics in {run_dir / run_layout.METRICS}")
    result = export_checkpoint(run_dir, exported, overwrite=True)
    print(
        f"exported {run_dir} {result.tag} -> {exported} ({result.architecture}); max |diff| {result.max_abs_diff:.3g}"
    )
    print("sample:")
    return cmd_generate(
        argparse.Namespace(
            model=str(exported), prompt=["Return the"], max_new_tokens=60, temperature=0.8, top_k=40, top_p=None,
            seed=0,
        )
    )  # fmt: skip
