"""``lmscale finetune``: a pretrained model trained further on examples, for the task its pretraining task
fine-tunes for (``lmscale.tasks``): a BERT sequence classifier from labelled texts, an encoder-decoder (T5, or
the recurrent one) from source/target pairs.

The config's ``finetune`` section names CSV or JSONL files; they become a prepared dataset of the task's format
(``classification``: ``lmscale.data.labelled``, ``seq2seq``: ``lmscale.data.seq2seq``) in
``RUN_DIR/labelled``, tokenized with the pretrained model's tokenizer, and ``data.path`` points there. The
model section takes the pretrained model's architecture and what the task decides (a classifier's labels)
(``model.dropout`` and ``model.init_std`` stay the config's). From there on the run is an ordinary training
run: the same ranks, ZeRO stages, checkpoints, exact resume, W&B and export, with the task's validation every
``trainer.eval_every_steps`` (accuracy and macro-F1, or generated outputs scored with BLEU and chrF) and the
best checkpoint kept.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmscale import run_layout
from lmscale.config import Config, ConfigError, FinetuneConfig
from lmscale.data.labelled import Fields, read_examples, write_task_dataset
from lmscale.data.manifest import MANIFEST, Manifest, read_manifest
from lmscale.data.seq2seq import Pairs, read_pairs, write_pairs_dataset
from lmscale.data.tokenizer import file_sha256
from lmscale.errors import LmscaleError, UsageError
from lmscale.families import family_of
from lmscale.files import replacing
from lmscale.models import ModelConfig
from lmscale.tasks import TASKS, FineTuning, Task, fine_tunable, task_of
from lmscale.train.init_from import pretrained

WAIT_FOR_NODE_0_SECONDS = 600


def resolve_task(cfg: Config, write: bool) -> Config:
    """``cfg`` with its examples prepared (by this process when ``write``, else by node 0, waited for) and
    the model section resolved against the pretrained model."""
    examples = cfg.finetune
    assert examples is not None and examples.train is not None
    family = cfg.model.family
    if not cfg.model.init_from:
        raise ConfigError(f"model.init_from: missing (an exported {family} directory or a {family} pretraining run)")
    source = pretrained(Path(cfg.model.init_from).absolute())
    if source.model.family != family:
        raise ConfigError(f"model.init_from: {source.path} holds a {source.model.family} model, not a {family}")
    trained_on = task_of(source.model)
    if trained_on.fine_tunes is None:
        raise ConfigError(
            f"model.init_from: {source.path} holds a {family} model trained on {trained_on.name} data, which "
            f"`lmscale finetune` has no task for (it trains further models trained on {', '.join(fine_tunable())})"
        )
    task = TASKS[trained_on.fine_tunes]
    assert task.fine_tuning is not None
    if not source.tokenizer.is_file():
        raise ConfigError(f"model.init_from: {source.tokenizer}: missing (the tokenizer the model was trained with)")
    check_architecture(cfg.model, source.model, source.path)
    assert source.model.seq_len is not None
    seq_len = examples.max_length or source.model.seq_len
    limit = source.model.position_limit
    if limit is not None and seq_len > limit:
        raise ConfigError(f"finetune.max_length: {seq_len} exceeds the pretrained model's {limit} positions")
    files = {
        "train": Path(examples.train).absolute(),
        "validation": Path(examples.validation).absolute() if examples.validation else None,
    }
    resolved = dataclasses.replace(
        examples, train=str(files["train"]), validation=str(files["validation"]) if files["validation"] else None,
        max_length=seq_len, max_target_length=examples.max_target_length or seq_len,
        **metric_signatures(examples.bleu_tokenize) if task.validation == "generation" else {},
    )  # fmt: skip
    labelled_dir = cfg.run.path / run_layout.LABELLED
    if not (labelled_dir / MANIFEST).is_file():
        if write:
            prepare_examples(labelled_dir, files, resolved, source.tokenizer, task)
        else:
            wait_for(labelled_dir / MANIFEST)
    manifest = read_manifest(labelled_dir)
    check_same_examples(manifest.settings, files, recorded_settings(resolved, task.fine_tuning), labelled_dir)
    model = dataclasses.replace(
        source.model, **task.fine_tuning.model_fields(manifest), dropout=cfg.model.dropout,
        init_std=cfg.model.init_std, init_from=str(source.path),
    )  # fmt: skip
    assert task_of(model) is task, f"{family}'s model fields do not make it train on {task.name}"
    data = dataclasses.replace(cfg.data, path=str(labelled_dir), sources=[])
    return dataclasses.replace(cfg, model=model, data=data, finetune=resolved)


def metric_signatures(tokenize: str) -> dict[str, str]:
    """sacrebleu's signatures of val_bleu and val_chrf, recorded in the run's config."""
    import sacrebleu

    try:
        bleu = sacrebleu.metrics.BLEU(tokenize=tokenize)
    except (RuntimeError, KeyError, ValueError):
        raise ConfigError(f"finetune.bleu_tokenize: {tokenize!r} is not a sacrebleu tokenisation") from None
    chrf = sacrebleu.metrics.CHRF()
    for metric in (bleu, chrf):
        metric.corpus_score(["a"], [["a"]])  # a signature names the number of references, known once it scored
    return {"bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def recorded_settings(finetune: FinetuneConfig, fine_tuning: FineTuning) -> dict[str, Any]:
    """The ``finetune`` fields the written examples depend on, as the dataset's manifest records them."""
    return {name: getattr(finetune, name) for name in fine_tuning.settings}


def check_architecture(ours: ModelConfig, theirs: ModelConfig, where: Path) -> None:
    """The architecture comes from the pretrained model: a field the config sets to something else is an error."""
    defaults = family_of(ours).config().architecture()
    given, pretrained_arch = ours.architecture(), theirs.architecture()
    for name, value in given.items():
        if value != defaults[name] and value != pretrained_arch[name]:
            raise ConfigError(f"model.{name}: {value} here, {pretrained_arch[name]} in the pretrained model {where}")


Files = dict[str, Path | None]
"""The example files of a fine-tune: train, and validation or None."""


def write_classification(output: Path, tokenizer_file: Path, files: Files, finetune: FinetuneConfig) -> Manifest:
    fields = Fields(finetune.text_field, finetune.text_pair_field, finetune.label_field)
    assert files["train"] is not None
    train = read_examples(files["train"], fields, "finetune.train")
    validation = read_examples(files["validation"], fields, "finetune.validation") if files["validation"] else None
    return write_task_dataset(output, tokenizer_file, train, validation, finetune.max_length)


def write_seq2seq(output: Path, tokenizer_file: Path, files: Files, finetune: FinetuneConfig) -> Manifest:
    def pairs(name: str) -> Pairs:
        path = files[name]
        assert path is not None
        return read_pairs(path, finetune.source_field, finetune.target_field, f"finetune.{name}")

    validation = pairs("validation") if files["validation"] else None
    return write_pairs_dataset(output, tokenizer_file, pairs("train"), validation, finetune.max_length,
                               finetune.max_target_length)  # fmt: skip


WRITERS: dict[str, Callable[[Path, Path, Files, FinetuneConfig], Manifest]] = {
    "classification": write_classification,
    "seq2seq": write_seq2seq,
}
"""For each task that fine-tunes (``lmscale.tasks``, its ``fine_tuning``), what writes its dataset from the
example files: here, above the data modules, which import the task registry."""


def prepare_examples(
    labelled_dir: Path, files: Files, finetune: FinetuneConfig, tokenizer: Path, task: Task,
) -> None:  # fmt: skip
    """Write the examples' dataset under a temporary name and rename it into place: it exists whole or not at
    all."""
    assert task.fine_tuning is not None
    with replacing(labelled_dir, unique=True) as tmp:
        manifest = WRITERS[task.name](tmp, tokenizer, files, finetune)
        manifest.settings["finetune"] = recorded_settings(finetune, task.fine_tuning)
        manifest.write(tmp)


def check_same_examples(settings: dict, files: Files, finetune: dict[str, Any], labelled_dir: Path) -> None:
    """A resumed run must fine-tune on the data its first start prepared."""
    for name, path in files.items():
        recorded = settings["sources"].get(name)
        now = {"file": str(path), "sha256": file_sha256(path)} if path is not None else None
        if recorded != now:
            raise UsageError(
                f"finetune.{name}: {path} is not the file this run's data was prepared from ({labelled_dir}: "
                f"{recorded['file'] if recorded else 'none'}, changed or another file); start another run.name"
            )
    recorded = settings.get("finetune", {})
    changed = [name for name, value in finetune.items() if recorded.get(name) != value]
    if changed:
        raise UsageError(
            f"finetune.{changed[0]}: {finetune[changed[0]]!r} here, {recorded.get(changed[0])!r} when {labelled_dir} "
            "was prepared; start another run.name"
        )


def wait_for(path: Path) -> None:
    """Another node prepares the data: wait until its manifest appears on the shared filesystem."""
    deadline = time.monotonic() + WAIT_FOR_NODE_0_SECONDS
    while not path.is_file():
        if time.monotonic() > deadline:
            raise LmscaleError(f"{path}: node 0 did not prepare the labelled data in {WAIT_FOR_NODE_0_SECONDS} s")
        time.sleep(1)
