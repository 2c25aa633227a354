"""``lmscale finetune``: a BERT sequence classifier from a pretrained encoder and labelled examples.

The config's ``finetune`` section names CSV or JSONL files; they become a prepared dataset of format
``classification`` in ``RUN_DIR/labelled`` (``lmscale.data.labelled``), tokenized with the pretrained model's
tokenizer, and ``data.path`` points there. The model section takes the pretrained model's architecture and the
training file's labels (``model.dropout`` and ``model.init_std`` stay the config's). From there on the run is
an ordinary training run: the same ranks, ZeRO stages, checkpoints, exact resume, W&B and export, with
validation accuracy and macro-F1 every ``trainer.eval_every_steps`` and the best checkpoint kept.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from lmscale import run_layout
from lmscale.config import Config, ConfigError
from lmscale.data.labelled import Fields, read_examples, write_task_dataset
from lmscale.data.manifest import MANIFEST, read_manifest
from lmscale.data.tokenizer import file_sha256
from lmscale.errors import LmscaleError, UsageError
from lmscale.families import FAMILIES, family_of, fine_tunable
from lmscale.files import replacing
from lmscale.models import ModelConfig
from lmscale.train.init_from import pretrained

WAIT_FOR_NODE_0_SECONDS = 600


def resolve_task(cfg: Config, write: bool) -> Config:
    """``cfg`` with its labelled data prepared (by this process when ``write``, else by node 0, waited for) and
    the model section resolved against the pretrained model."""
    labelled = cfg.finetune
    assert labelled is not None and labelled.train is not None
    family = cfg.model.family
    if not FAMILIES[family].fine_tunes:
        raise ConfigError(
            f"model.family: `lmscale finetune` trains a sequence classifier, which {family} has not (family: "
            f"{' or '.join(fine_tunable())})"
        )
    if not cfg.model.init_from:
        raise ConfigError(f"model.init_from: missing (an exported {family} directory or a {family} pretraining run)")
    source = pretrained(Path(cfg.model.init_from).absolute())
    if source.model.family != family:
        raise ConfigError(f"model.init_from: {source.path} holds a {source.model.family} model, not a {family}")
    if not source.tokenizer.is_file():
        raise ConfigError(f"model.init_from: {source.tokenizer}: missing (the tokenizer the model was trained with)")
    check_architecture(cfg.model, source.model, source.path)
    assert source.model.seq_len is not None
    seq_len = labelled.max_length or source.model.seq_len
    if seq_len > source.model.seq_len:
        raise ConfigError(
            f"finetune.max_length: {seq_len} exceeds the pretrained model's {source.model.seq_len} positions"
        )
    files = {
        "train": Path(labelled.train).absolute(),
        "validation": Path(labelled.validation).absolute() if labelled.validation else None,
    }
    labelled_dir = cfg.run.path / run_layout.LABELLED
    fields = Fields(labelled.text_field, labelled.text_pair_field, labelled.label_field)
    if not (labelled_dir / MANIFEST).is_file():
        if write:
            prepare_labelled(labelled_dir, files, fields, source.tokenizer, seq_len)
        else:
            wait_for(labelled_dir / MANIFEST)
    manifest = read_manifest(labelled_dir)
    check_same_labelled_data(manifest.settings, files, fields, seq_len, labelled_dir)
    model = dataclasses.replace(
        source.model, labels=manifest.labels, dropout=cfg.model.dropout, init_std=cfg.model.init_std,
        init_from=str(source.path),
    )  # fmt: skip
    resolved = dataclasses.replace(
        labelled, train=str(files["train"]), validation=str(files["validation"]) if files["validation"] else None,
        max_length=seq_len,
    )  # fmt: skip
    data = dataclasses.replace(cfg.data, path=str(labelled_dir), sources=[])
    return dataclasses.replace(cfg, model=model, data=data, finetune=resolved)


def check_architecture(ours: ModelConfig, theirs: ModelConfig, where: Path) -> None:
    """The architecture comes from the pretrained model: a field the config sets to something else is an error."""
    defaults = family_of(ours).config().architecture()
    given, pretrained_arch = ours.architecture(), theirs.architecture()
    for name, value in given.items():
        if value != defaults[name] and value != pretrained_arch[name]:
            raise ConfigError(f"model.{name}: {value} here, {pretrained_arch[name]} in the pretrained model {where}")


def prepare_labelled(
    labelled_dir: Path, files: dict[str, Path | None], fields: Fields, tokenizer: Path, seq_len: int
) -> None:
    """Write the labelled dataset under a temporary name and rename it into place: it exists whole or not at all."""
    train_file, validation_file = files["train"], files["validation"]
    assert train_file is not None
    train = read_examples(train_file, fields, "finetune.train")
    validation = read_examples(validation_file, fields, "finetune.validation") if validation_file else None
    with replacing(labelled_dir, unique=True) as tmp:
        manifest = write_task_dataset(tmp, tokenizer, train, validation, seq_len)
        manifest.settings.update(fields=dataclasses.asdict(fields), max_length=seq_len)
        manifest.write(tmp)


def check_same_labelled_data(
    settings: dict, files: dict[str, Path | None], fields: Fields, seq_len: int, labelled_dir: Path
) -> None:
    """A resumed run must fine-tune on the data its first start prepared."""
    for name, path in files.items():
        recorded = settings["sources"].get(name)
        now = {"file": str(path), "sha256": file_sha256(path)} if path is not None else None
        if recorded != now:
            raise UsageError(
                f"finetune.{name}: {path} is not the file this run's data was prepared from ({labelled_dir}: "
                f"{recorded['file'] if recorded else 'none'}, changed or another file); start another run.name"
            )
    if settings["fields"] != dataclasses.asdict(fields) or settings["max_length"] != seq_len:
        raise UsageError(f"finetune: its fields or max_length differ from those {labelled_dir} was prepared with")


def wait_for(path: Path) -> None:
    """Another node prepares the data: wait until its manifest appears on the shared filesystem."""
    deadline = time.monotonic() + WAIT_FOR_NODE_0_SECONDS
    while not path.is_file():
        if time.monotonic() > deadline:
            raise LmscaleError(f"{path}: node 0 did not prepare the labelled data in {WAIT_FOR_NODE_0_SECONDS} s")
        time.sleep(1)
