"""The task registry: what a model is trained to predict, one entry per kind of prepared data.

A task is named by the ``format`` its dataset's ``manifest.json`` records (``causal``, ``mlm``,
``span_corruption``, ``classification``, ``seq2seq``); a model's config says which one it trains on
(``data_format``). The entry holds everything the rest of the code asks about a task: how long a sample is,
how ``lmscale prepare`` packs it and which tokenizer it needs (or how ``lmscale finetune`` writes it from
examples), the collator that turns samples into the model's inputs, the accuracy a training step reports,
how validation scores the model and which of its metrics keeps the best checkpoint. Code outside the
registries asks the entry; it never compares a task's name.
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
    target_len: int | None


class ExamplesDataset(Protocol):
    """What fine-tuning reads of the dataset it wrote (``lmscale.data.manifest.Manifest`` has it)."""

    labels: list[str]


@dataclass(frozen=True)
class FineTuning:
    """How ``lmscale finetune`` makes a task's dataset from example files (``lmscale.config.FinetuneConfig``)."""

    settings: tuple[str, ...]
    """The ``finetune`` fields the written data depends on: a resumed run must give the same (the writer of the
    data is ``launcher.finetune``'s, since it is above the data modules that import this one)."""
    model_fields: Callable[[ExamplesDataset], dict[str, Any]]
    """The fields that make a pretrained model's section train on this task (its labels, its data_format)."""


@dataclass(frozen=True)
class Task:
    name: str
    """The dataset format, as ``manifest.json`` records it."""
    sample_len: Callable[[int, int | None], int]
    """The tokens (or values) one stored sample holds, for a dataset of ``seq_len`` (and ``target_len``)."""
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
    """Examples with class labels: the dataset's labels must be the model's."""
    validation: str = "loss"
    """What a validation pass computes: ``loss`` (loss and perplexity over ``trainer.eval_batches``),
    ``classifier`` (loss, accuracy and macro-F1) or ``generation`` (the model writes each output: loss, BLEU
    and chrF); all but ``loss`` score every validation example once."""
    best_metric: str | None = None
    """The validation metric whose best value keeps its checkpoint (``checkpoints/best``), higher is better."""
    fine_tuning: FineTuning | None = None
    """``lmscale finetune`` writes its data from examples."""
    accuracy_metric: str | None = None
    """The metric of a training step's right predictions (``val_`` + it at validation), if it has one."""
    best_label: str | None = None
    """How ``lmscale report`` names the best value of its ``reported_metric``."""
    scores_continuations: bool = False
    """The model gives the likelihood of a text after a context: it can take multiple-choice tasks."""
    tokenizer_kind: str | None = None
    """The kind of tokenizer ``lmscale prepare`` must train for it (``--tokenizer-kind``), if it needs one."""
    required_tokens: Callable[[int], list[str]] = lambda seq_len: []
    """The special tokens its samples of ``seq_len`` need the tokenizer to have."""
    model_fields: Callable[[SampleLayout], dict[str, Any]] = lambda layout: {}
    """Fields of the model section it decides from the dataset's lengths and special token ids (beyond
    vocab_size and seq_len, which every model takes)."""
    generates: str | None = None
    """How ``lmscale generate`` writes text with a model trained on it: ``causal`` (a decoder continues a
    prompt, sampled) or ``seq2seq`` (an encoder-decoder's output for an input, greedy or by beam search);
    None: it does not."""
    fine_tunes: str | None = None
    """The task ``lmscale finetune`` trains a model pretrained on this one further for, if any."""

    @property
    def reported_metric(self) -> str | None:
        """The validation metric whose best value ``lmscale report`` shows: ``best_metric``, else the accuracy."""
        return self.best_metric or (f"val_{self.accuracy_metric}" if self.accuracy_metric else None)

    @property
    def every_example(self) -> bool:
        """Validation scores each validation example once, instead of ``trainer.eval_batches``."""
        return self.validation != "loss"


def causal_collator(layout: SampleLayout, seed: int, probability: float, examples: int | None) -> Collate:
    from lmscale.data.collate import causal_batch

    return causal_batch


def masked_lm_collator(layout: SampleLayout, seed: int, probability: float, examples: int | None) -> Collate:
    from lmscale.data.collate import MaskedLMBatch

    return MaskedLMBatch(layout.special_tokens, layout.vocab_size, probability, seed)


def span_lengths(seq_len: int) -> Any:
    """The raw, input and target lengths of span corruption for inputs of ``seq_len``."""
    from lmscale.data.span_corruption import Lengths

    return Lengths.for_inputs(seq_len)


def span_sentinels(seq_len: int) -> list[str]:
    from lmscale.data.span_corruption import MEAN_SPAN, NOISE_DENSITY, noise_counts
    from lmscale.data.tokenizer import sentinel

    _, spans = noise_counts(span_lengths(seq_len).raw, NOISE_DENSITY, MEAN_SPAN)
    return [sentinel(i) for i in range(spans)]


def span_tokens(seq_len: int) -> list[str]:
    from lmscale.data.tokenizer import T5_EOS, T5_PAD, T5_UNK

    return [T5_PAD, T5_EOS, T5_UNK, *span_sentinels(seq_len)]


def bert_tokens(seq_len: int) -> list[str]:
    from lmscale.data.tokenizer import BERT_SPECIALS

    return list(BERT_SPECIALS)


def span_corruption_collator(layout: SampleLayout, seed: int, probability: float, examples: int | None) -> Collate:
    from lmscale.data.span_corruption import SpanCorruptionBatch
    from lmscale.data.tokenizer import T5_EOS

    sentinels = [layout.special_tokens[name] for name in span_sentinels(layout.seq_len)]
    return SpanCorruptionBatch(sentinels, layout.special_tokens[T5_EOS], seed)


def span_model_fields(layout: SampleLayout) -> dict[str, Any]:
    from lmscale.data.tokenizer import T5_PAD

    lengths = span_lengths(layout.seq_len)
    return {"seq_len": lengths.inputs, "target_len": lengths.targets,
            "decoder_start_id": layout.special_tokens[T5_PAD]}  # fmt: skip


def classification_collator(layout: SampleLayout, seed: int, probability: float, examples: int | None) -> Collate:
    from lmscale.data.collate import ClassificationBatch

    return ClassificationBatch(layout.special_tokens["[PAD]"], layout.seq_len, examples)


def seq2seq_collator(layout: SampleLayout, seed: int, probability: float, examples: int | None) -> Collate:
    from lmscale.data.collate import Seq2SeqBatch
    from lmscale.data.tokenizer import T5_PAD

    assert layout.target_len is not None, "a seq2seq dataset records its target length"
    return Seq2SeqBatch(layout.seq_len, layout.target_len, layout.special_tokens[T5_PAD], examples)


def seq2seq_model_fields(layout: SampleLayout) -> dict[str, Any]:
    from lmscale.data.tokenizer import T5_PAD

    return {"target_len": layout.target_len, "decoder_start_id": layout.special_tokens[T5_PAD]}


TASKS: dict[str, Task] = {
    "causal": Task(
        "causal",
        sample_len=lambda seq_len, _: seq_len + 1,  # seq_len inputs and the next token of the last
        collator=causal_collator,
        how_to_prepare="prepare the data with `lmscale prepare --format causal`",
        prepared_from_text=True,
        scores_continuations=True,
        generates="causal",
    ),
    "mlm": Task(
        "mlm",
        sample_len=lambda seq_len, _: seq_len,
        collator=masked_lm_collator,
        how_to_prepare="prepare the data with `lmscale prepare --format mlm`",
        prepared_from_text=True,
        wraps_documents=True,
        masked=True,
        accuracy_metric="mlm_accuracy",
        best_label="best val MLM acc",
        tokenizer_kind="wordpiece",
        required_tokens=bert_tokens,
        fine_tunes="classification",
    ),
    "span_corruption": Task(
        "span_corruption",
        sample_len=lambda seq_len, _: span_lengths(seq_len).raw,  # corrupted into inputs of seq_len at most
        collator=span_corruption_collator,
        how_to_prepare="prepare the data with `lmscale prepare --format span_corruption --tokenizer-kind unigram`",
        prepared_from_text=True,
        tokenizer_kind="unigram",
        required_tokens=span_tokens,
        model_fields=span_model_fields,
        generates="seq2seq",
        fine_tunes="seq2seq",
    ),
    "classification": Task(
        "classification",
        sample_len=lambda seq_len, _: 1 + 2 * seq_len,  # label id, token ids, token types
        collator=classification_collator,
        how_to_prepare="fine-tune with `lmscale finetune` and a finetune section",
        labelled=True,
        validation="classifier",
        best_metric="val_accuracy",
        accuracy_metric="accuracy",
        best_label="best val acc",
        fine_tuning=FineTuning(
            settings=("text_field", "text_pair_field", "label_field", "max_length"),
            model_fields=lambda dataset: {"labels": dataset.labels},
        ),
        fine_tunes="classification",
    ),
    "seq2seq": Task(
        "seq2seq",
        sample_len=lambda seq_len, target_len: 3 + seq_len + (target_len or 0),  # index, lengths, source, target
        collator=seq2seq_collator,
        how_to_prepare="fine-tune with `lmscale finetune` and a finetune section of source/target pairs",
        validation="generation",
        best_metric="val_bleu",
        best_label="best val BLEU",
        model_fields=seq2seq_model_fields,
        fine_tuning=FineTuning(
            settings=("source_field", "target_field", "max_length", "max_target_length"),
            model_fields=lambda dataset: {"data_format": "seq2seq"},
        ),
        generates="seq2seq",
        fine_tunes="seq2seq",
    ),
}


class TrainsOn(Protocol):
    @property
    def data_format(self) -> str: ...


def task_of(model_cfg: TrainsOn) -> Task:
    """The task a model section trains on (every family's config says, by its ``data_format``)."""
    return TASKS[model_cfg.data_format]


def fine_tunable() -> list[str]:
    """The tasks of the models ``lmscale finetune`` trains further."""
    return [task.name for task in TASKS.values() if task.fine_tunes]


def text_formats() -> list[str]:
    """The formats ``lmscale prepare`` writes."""
    return [task.name for task in TASKS.values() if task.prepared_from_text]
