"""``lmscale demo``: the whole path on the embedded default, with no download.

corpus (Python's own docstrings) -> ``prepare`` on local Ray -> ``train`` on CPU ranks with ZeRO stage 2
-> ``export`` to a Hugging Face directory -> a generated sample.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
from pathlib import Path

from launcher.infer import cmd_generate
from launcher.parser import build_parser
from launcher.train import train
from lmscale import run_layout
from lmscale.data.demo_corpus import write_demo_corpus
from lmscale.data.manifest import MANIFEST
from lmscale.data.shard import PrepareOptions, prepare, summary
from lmscale.data.translation_pairs import Pair, language_pairs
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


PLAIN_WORD = re.compile(r"^[A-Za-z][a-z]*[.,:;!?]?$")
UMLAUTS = str.maketrans("äöüßÄÖÜ", "aousAOU")
DEMO_PAIR_WORDS = 10
DEMO_VALIDATION_PAIRS = 400


def plain_prose(pair: Pair) -> bool:
    """A message of plain words on both sides (no format directives, option names or paths), ten at most: the
    sentences a model of the demo's size can learn to translate in minutes."""
    words, theirs = pair.source.split(), pair.target.translate(UMLAUTS).split()
    short = len(words) <= DEMO_PAIR_WORDS and len(theirs) <= DEMO_PAIR_WORDS
    return short and all(PLAIN_WORD.match(word) for word in words + theirs)


def demo_translation(workdir: Path) -> dict[str, Path]:
    """The demo's translation task in ``workdir``, built unless it is there: English-German pairs of plain
    prose from the training catalogs (``lmscale data pairs``), 400 held out for validation
    (``validation.jsonl``) and the others to train on (``train.jsonl``), and the training pairs' texts, both
    languages, as span-corruption shards with a Unigram tokenizer that learned both (``span_corruption``), to
    pretrain an encoder-decoder on. Prepared in this process: the corpus is small, and Ray's start-up would be
    most of the time."""
    files = {"train": workdir / "train.jsonl", "validation": workdir / "validation.jsonl",
             "span_corruption": workdir / "span_corruption"}  # fmt: skip
    if (files["span_corruption"] / MANIFEST).is_file():
        return files
    pairs = [pair for pair in language_pairs("de")["train"] if plain_prose(pair)]
    random.Random(0).shuffle(pairs)
    validation, train = pairs[:DEMO_VALIDATION_PAIRS], pairs[DEMO_VALIDATION_PAIRS:]
    workdir.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("validation", validation)):
        rows = (json.dumps({"source": p.source, "target": p.target}, ensure_ascii=False) + "\n" for p in split)
        files[name].write_text("".join(rows), encoding="utf-8")
    text = workdir / "text.txt"
    text.write_text("".join(f"{p.source}\n{p.target}\n\n" for p in train), encoding="utf-8")
    prepare(PrepareOptions(inputs=[str(text)], output=files["span_corruption"], seq_len=64, vocab_size=1000,
                           shard_size="200", val_fraction=0.02, tokenizer_kind="unigram", format="span_corruption",
                           in_process=True, overwrite=True))  # fmt: skip
    return files


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
