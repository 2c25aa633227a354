"""Scores of a model without DeepSpeed: loss and perplexity of a causal LM, masked-LM loss and accuracy of a BERT
(on a prepared dataset split or on raw text files), accuracy and macro-F1 of a classifier on labelled examples."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from lmscale.confusion import accuracy_and_macro_f1, confusion_counts
from lmscale.data import object_store
from lmscale.data.collate import ClassificationBatch
from lmscale.data.manifest import MANIFEST, dataset_url, is_remote, read_manifest
from lmscale.data.object_store import is_s3
from lmscale.data.shard import DocTable, mlm_pieces, pack_samples
from lmscale.data.sources import ReadOptions, ReadStats, expand_inputs, read_documents
from lmscale.data.stream import read_shard, split_shards
from lmscale.data.tokenizer import end_token_id, special_token_ids
from lmscale.errors import LmscaleError
from lmscale.models.bert import Bert
from lmscale.models.gpt import GPT
from lmscale.progress import Progress
from lmscale.tasks import Collate


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    """Tokens predicted (a masked LM's masked ones)."""
    accuracy: float | None = None
    """A masked LM's share of masked tokens predicted right."""
    per_position: list[float] | None = None
    """A causal LM's mean loss at each position of the window: the i-th predicts token i + 1 from i + 1 tokens
    of context."""


@dataclass(frozen=True)
class ClassifierResult:
    loss: float
    accuracy: float
    macro_f1: float
    examples: int


def prepared_windows(
    directory: str, split: str, tokenizer: Tokenizer, data_format: str
) -> tuple[list[np.ndarray], int]:
    """The split's samples; refuses a dataset of another format or tokenized with another vocabulary."""
    manifest = read_manifest(directory)
    if manifest.format != data_format:
        raise LmscaleError(f"{directory}: holds {manifest.format} samples, the model scores {data_format} ones")
    if manifest.vocab_size != tokenizer.get_vocab_size():
        raise LmscaleError(
            f"{directory}: tokenized with a {manifest.vocab_size}-token vocabulary, the model's tokenizer has "
            f"{tokenizer.get_vocab_size()}"
        )
    shards = split_shards(directory, manifest, split)
    rows = [read_shard(s, manifest.sample_len, manifest.np_dtype)[0] for s in shards]
    return [row for block in rows for row in block], manifest.seq_len


def text_windows(inputs: list[str], tokenizer: Tokenizer, window: int) -> list[np.ndarray]:
    """Documents of text files, tokenized, joined with end-of-text, cut into windows of ``window`` tokens (a
    task's sample: a causal LM's seq_len + 1)."""
    eot = end_token_id(tokenizer)
    stream: list[int] = []
    for path in expand_inputs(inputs):
        for doc in read_documents(path, ReadOptions(), ReadStats()):
            stream.extend(tokenizer.encode(doc, add_special_tokens=False).ids)
            stream.append(eot)
    n = len(stream) // window
    if n == 0:
        raise LmscaleError(f"{' '.join(inputs)}: fewer than {window} tokens of text to evaluate")
    return list(np.asarray(stream[: n * window], dtype=np.int64).reshape(n, window))


def mlm_windows(inputs: list[str], tokenizer: Tokenizer, seq_len: int) -> list[np.ndarray]:
    """Documents of text files packed into masked-LM samples as ``lmscale prepare --format mlm`` packs them."""
    special = special_token_ids(tokenizer)
    documents = [
        [*tokenizer.encode(doc, add_special_tokens=False).ids, special["[SEP]"]]
        for path in expand_inputs(inputs)
        for doc in read_documents(path, ReadOptions(), ReadStats())
    ]
    if not documents:
        raise LmscaleError(f"{' '.join(inputs)}: no text to evaluate")
    ends = np.cumsum([len(d) for d in documents])
    table = DocTable(np.zeros(len(ends), dtype=np.int64), ends - ends, ends, np.concatenate([[0], ends]))
    starts, stops = mlm_pieces(table, seq_len - 2)
    stream = np.concatenate([np.asarray(d, dtype=np.int64) for d in documents])
    wrap = (special["[CLS]"], special["[SEP]"], special["[PAD]"])
    return list(pack_samples(stream, starts, stops, seq_len, wrap))


def batches(windows: list[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(windows), batch_size):
        yield torch.from_numpy(np.stack(windows[i : i + batch_size]).astype(np.int64))


@torch.no_grad()
def evaluate(
    model: GPT,
    windows: list[np.ndarray],
    batch_size: int = 8,
    max_batches: int | None = None,
    per_position: bool = False,
) -> EvalResult:
    """A causal LM's mean next-token loss over the windows (each seq_len + 1 tokens); ``per_position`` also
    averages it at each position of the window, from the full logits (so keep ``batch_size`` small for a large
    vocabulary), where the loss alone is computed in chunks."""
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    by_position: torch.Tensor | None = None  # summed over the windows
    count = min(-(-len(windows) // batch_size), max_batches or 10**12)
    with Progress("eval", total=count, unit="batches") as progress:
        for i, tokens in enumerate(batches(windows, batch_size)):
            if i == count:
                break
            tokens = tokens.to(device)
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            if per_position:
                logits, _ = model(inputs)
                losses = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, T)
                summed = losses.sum(dim=0).double().cpu()
                by_position = summed if by_position is None else by_position + summed
                loss = losses.mean()
            else:
                _, loss = model(inputs, targets)
            n = targets.numel()
            total_loss += float(loss) * n
            total_tokens += n
            progress.advance(loss=f"{total_loss / total_tokens:.4f}")
    mean = total_loss / total_tokens
    curve = None if by_position is None else (by_position * len(by_position) / total_tokens).tolist()
    return EvalResult(mean, math.exp(mean), total_tokens, per_position=curve)


@torch.no_grad()
def evaluate_collated(
    model: nn.Module, windows: list[np.ndarray], collate: Collate, batch_size: int = 8, max_batches: int | None = None
) -> EvalResult:
    """The mean loss and accuracy over the tokens a task's ``collate`` scores (seeded per window: a masked LM's
    masked tokens, a span-corrupted sample's targets)."""
    device = next(model.parameters()).device
    total_loss, right, masked = 0.0, 0, 0
    count = min(-(-len(windows) // batch_size), max_batches or 10**12)
    with Progress("eval", total=count, unit="batches") as progress:
        for i in range(count):
            rows = np.stack(windows[i * batch_size : (i + 1) * batch_size])
            batch = {
                k: v.to(device) for k, v in collate(rows, range(i * batch_size, i * batch_size + len(rows))).items()
            }
            predictions, loss = model(**batch)
            targets = batch["targets"][batch["targets"] != -100]
            total_loss += float(loss) * len(targets)
            right += int((predictions == targets).sum())
            masked += len(targets)
            progress.advance(loss=f"{total_loss / max(masked, 1):.4f}")
    if masked == 0:
        raise LmscaleError("no token was scored: evaluate on more text")
    mean = total_loss / masked
    return EvalResult(mean, math.exp(mean), masked, right / masked)


@torch.no_grad()
def evaluate_classifier(model: Bert, rows: np.ndarray, pad_id: int, batch_size: int = 32) -> ClassifierResult:
    """A classifier's loss, accuracy and macro-F1 over encoded examples (``lmscale.data.labelled`` rows)."""
    device = next(model.parameters()).device
    classes = model.cfg.num_labels
    collate = ClassificationBatch(pad_id, (rows.shape[1] - 1) // 2)
    confusion = torch.zeros(classes, classes)
    total_loss = 0.0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size], range(batch_size)).items()}
        targets = batch.pop("targets")
        logits, _ = model(**batch)
        total_loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        confusion += confusion_counts(targets, logits.argmax(-1), classes).cpu()
    accuracy, macro_f1 = accuracy_and_macro_f1(confusion)
    return ClassifierResult(total_loss / len(rows), accuracy, macro_f1, len(rows))


def is_prepared(path: str) -> bool:
    """A dataset written by ``lmscale prepare`` (rather than text files): a directory or a URL with a manifest."""
    if is_s3(path):
        return object_store.exists(dataset_url(path, MANIFEST))
    if is_remote(path):
        return True  # https:// or pipe:, which only datasets are given as
    return (Path(path) / MANIFEST).is_file()
