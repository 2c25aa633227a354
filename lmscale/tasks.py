"""The task registry: what a model is trained to predict, one entry per kind of prepared data.

A task is named by the ``format`` its dataset's ``manifest.json`` records (``causal``, ``mlm``,
``classification``); a model's config says which one it trains on (``data_format``). The entry holds
everything the rest of the code asks about a task: how long a sample is, how ``lmscale prepare`` packs it,
the collator that turns samples into the model's inputs, the accuracy a training step and a validation pass
report, and whether validation scores every labelled example. Code outside the registries asks the entry;
it never compares a task's name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

Collate = Callable[[Any, Sequence[int]], dict[str, Any]]
"""(samples as a numpy array, their global stream positions) -> the model's inputs as tensors. Written without
numpy and torch so that the command line can read the registry without importing them."""


class SampleLayout(Protocol):
    """What a collator reads of a dataset (``lmscale.data.manifest.Manifest`` has it)."""

    special_tokens: dict[str, int]
    vocab_size: int
    seq_len: int


@dataclass(frozen=True)
class Task:
    name: str
    """The dataset format, as ``manifest.json`` records it."""
    sample_len: Callable[[int], int]
    """The tokens (or values) one stored sample holds, for a dataset of ``seq_len``."""
    collator: Callable[[SampleLayout, int, float, int | None], Collate]
    """``collator(layout, seed, mask_probability, scored_examples)``: samples -> the model's inputs."""
    how_to_prepare: str
    """What makes a dataset of this format (the one line a mismatched dataset gets)."""
    prepared_from_text: bool = False
    """``lmscale prepare --format NAME`` writes it from raw text."""
    wraps_documents: bool = False
    """Samples are [CLS] ... [SEP] packed and padded with [PAD]: the tokenizer needs BERT's special tokens."""
    masked: bool = False
    """The model predicts a sampled share of the positions (``data.mlm_probability``), not all of them."""
    labelled: bool = False
    """Examples with class labels: the dataset's labels must be the model's, and validation scores every
    example once (accuracy, macro-F1 and the best checkpoint) instead of ``trainer.eval_batches``."""
    accuracy_metric: str | None = None
    """The metric of a training step's right predictions (``val_`` + it at validation), if it has one."""
    accuracy_label: str | None = None
    """How ``lmscale report`` names the best validation accuracy."""
    scores_continuations: bool = False
    """The model gives the likelihood of a text after a context: it can take multiple-choice tasks."""


def causal_collator(layout: SampleLayout, seed: int, probability: float, examples: int | None) -> Collate:
    from lmscale.data.collate import causal_batch

    return causal_batch


def masked_lm_collator(layout: SampleLayout, seed: int, probability: float, examples: int | None) -> Collate:
    from lmscale.data.collate import MaskedLMBatch

    return MaskedLMBatch(layout.special_tokens, layout.vocab_size, probability, seed)


def classification_collator(layout: SampleLayout, seed: int, probability: float, examples: int | None) -> Collate:
    from lmscale.data.collate import ClassificationBatch

    return ClassificationBatch(layout.special_tokens["[PAD]"], layout.seq_len, examples)


TASKS: dict[str, Task] = {
    "causal": Task(
        "causal",
        sample_len=lambda seq_len: seq_len + 1,  # seq_len inputs and the next token of the last
        collator=causal_collator,
        how_to_prepare="prepare the data with `lmscale prepare --format causal`",
        prepared_from_text=True,
        scores_continuations=True,
    ),
    "mlm": Task(
        "mlm",
        sample_len=lambda seq_len: seq_len,
        collator=masked_lm_collator,
        how_to_prepare="prepare the data with `lmscale prepare --format mlm`",
        prepared_from_text=True,
        wraps_documents=True,
        masked=True,
        accuracy_metric="mlm_accuracy",
        accuracy_label="best val MLM acc",
    ),
    "classification": Task(
        "classification",
        sample_len=lambda seq_len: 1 + 2 * seq_len,  # label id, token ids, token types
        collator=classification_collator,
        how_to_prepare="fine-tune with `lmscale finetune` and a finetune section",
        labelled=True,
        accuracy_metric="accuracy",
        accuracy_label="best val acc",
    ),
}


class TrainsOn(Protocol):
    @property
    def data_format(self) -> str: ...


def task_of(model_cfg: TrainsOn) -> Task:
    """The task a model section trains on (every family's config says, by its ``data_format``)."""
    return TASKS[model_cfg.data_format]


def text_formats() -> list[str]:
    """The formats ``lmscale prepare`` writes."""
    return [task.name for task in TASKS.values() if task.prepared_from_text]
