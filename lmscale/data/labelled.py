"""Labelled examples for sequence classification -> a prepared dataset that fine-tuning streams like any other.

Input: CSV (with a header) or JSONL, one example per row: ``text``, optionally ``text_pair``, and ``label``
(field names configurable; labels may be strings or integers, kept as class names). Output: WebDataset shards
and a manifest of format ``classification``. A sample is one row of ``1 + 2 * seq_len`` token-sized integers:
the label id, the token ids of ``[CLS] text [SEP] (text_pair [SEP])`` padded with ``[PAD]``, and their token
types. Examples longer than ``seq_len`` are truncated (the longer text of a pair first).
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmscale.data.manifest import Manifest, ShardRecord, SplitRecord, token_dtype
from lmscale.data.shard import write_sample_tar
from lmscale.data.tokenizer import file_sha256, load_tokenizer, special_token_ids, with_bert_template
from lmscale.errors import UsageError

FORMAT = "classification"
SHARD_EXAMPLES = 10_000


@dataclass(frozen=True)
class Fields:
    text: str = "text"
    text_pair: str = "text_pair"
    label: str = "label"


@dataclass(frozen=True)
class Examples:
    path: Path
    texts: list[str]
    pairs: list[str] | None
    labels: list[str]
    lines: list[int]
    """Each example's line in its file (for error messages)."""


def _rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line, row) of a CSV or JSONL file whose rows must have the fields ``required``."""
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UsageError(f"{path}:{number}: not valid JSON") from None
                if not isinstance(row, dict):
                    expected = " and ".join(repr(name) for name in required)
                    raise UsageError(f"{path}:{number}: expected an object with {expected}")
                rows.append((number, row))
        return rows
    if path.suffix.lower() != ".csv":
        raise UsageError(f"{path}: expected a .csv or .jsonl file")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for name in required:
            if columns and name not in columns:
                raise UsageError(f"{path}: no column {name!r} (its columns: {', '.join(columns)})")
        # The header is line 1; a row's line is the line it ends on (a quoted field may span lines).
        return [(reader.line_num, row) for row in reader]


def read_rows(path: str | Path, required: tuple[str, ...], where: str) -> tuple[Path, list[tuple[int, dict]]]:
    """The (line, row) of a CSV or JSONL file, each with a non-empty value of every field ``required``;
    ``where`` names what gave the file (finetune.train, --data ...)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{where}: {path}: file not found")
    try:
        rows = _rows(path, required)
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not rows:
        raise UsageError(f"{where}: {path}: no examples")
    for number, row in rows:
        for name in required:
            value = row.get(name)
            if value is None:
                raise UsageError(f"{path}:{number}: no {name!r}")
            if not str(value).strip():
                raise UsageError(f"{path}:{number}: {name!r} is empty")
    return path, rows


def read_examples(path: str | Path, fields: Fields, where: str) -> Examples:
    """The examples of one file; ``where`` names the config field that gave it (finetune.train ...)."""
    path, rows = read_rows(path, (fields.text, fields.label), where)
    texts, pairs, labels, lines = [], [], [], []
    has_pair = all(row.get(fields.text_pair) not in (None, "") for _, row in rows)
    for number, row in rows:
        texts.append(str(row[fields.text]))
        labels.append(str(row[fields.label]))
        lines.append(number)
        if has_pair:
            pairs.append(str(row[fields.text_pair]))
    return Examples(path, texts, pairs if has_pair else None, labels, lines)


def label_names(labels: list[str]) -> list[str]:
    """Class names in label-id order: numeric labels by value (0, 1, 2, ... 10), others alphabetically."""
    distinct = set(labels)
    if all(label.lstrip("-").isdigit() for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def encode_examples(examples: Examples, tokenizer_file: Path, labels: list[str], seq_len: int) -> np.ndarray:
    """(examples, 1 + 2 * seq_len) rows: label id, padded token ids, token types."""
    ids_of = {name: i for i, name in enumerate(labels)}
    for label, number in zip(examples.labels, examples.lines, strict=True):
        if label not in ids_of:
            raise UsageError(
                f"{examples.path}:{number}: label {label!r} is not one of the training labels ({', '.join(labels)})"
            )
    tok = with_bert_template(load_tokenizer(tokenizer_file))
    tok.enable_truncation(seq_len)
    tok.no_padding()
    pad = special_token_ids(tok)["[PAD]"]
    inputs = list(zip(examples.texts, examples.pairs, strict=True)) if examples.pairs else examples.texts
    rows = np.full((len(examples.texts), 1 + 2 * seq_len), pad, dtype=np.int64)
    rows[:, 1 + seq_len :] = 0
    for row, label, enc in zip(rows, examples.labels, tok.encode_batch(inputs), strict=True):
        row[0] = ids_of[label]
        row[1 : 1 + len(enc.ids)] = enc.ids
        row[1 + seq_len : 1 + seq_len + len(enc.type_ids)] = enc.type_ids
    return rows


@dataclass(frozen=True)
class EncodedSplit:
    """One split's examples as stored samples, and the file they were read from."""

    rows: np.ndarray
    tokens: int
    """Real tokens (not padding) in the rows: the manifest's count."""
    path: Path


def write_examples_dataset(
    output: Path, tokenizer_file: Path, splits: dict[str, EncodedSplit | None], **manifest_fields: Any
) -> Manifest:
    """Fine-tuning data of any task: each split's rows as shards, the tokenizer, and the manifest (with the
    task's ``manifest_fields``: its format, seq_len, special tokens ...) written last, in ``output``."""
    (output / "shards").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_file, output / "tokenizer.json")
    records, sources = {}, {}
    for name, split in splits.items():
        shards: list[ShardRecord] = []
        if split is not None:
            for k, first in enumerate(range(0, len(split.rows), SHARD_EXAMPLES)):
                part = split.rows[first : first + SHARD_EXAMPLES]
                share = split.tokens * len(part) // len(split.rows)
                shards.append(write_sample_tar(part, output, f"shards/{name}-{k:06d}.tar", share))
            sources[name] = {"file": str(split.path), "sha256": file_sha256(split.path)}
        records[name] = SplitRecord(shards)
    manifest = Manifest(
        tokenizer_file="tokenizer.json", tokenizer_sha256=file_sha256(output / "tokenizer.json"), splits=records,
        settings={"sources": sources}, **manifest_fields,
    )  # fmt: skip
    manifest.write(output)
    return manifest


def write_task_dataset(
    output: Path, tokenizer_file: Path, train: Examples, validation: Examples | None, seq_len: int
) -> Manifest:
    """Encode the examples into ``output`` (shards, tokenizer, manifest last); labels come from ``train``."""
    labels = label_names(train.labels)
    if len(labels) < 2:
        raise UsageError(f"{train.path}: every example has the label {labels[0]!r}; a classifier needs two classes")
    tok = load_tokenizer(tokenizer_file)
    special = special_token_ids(tok)
    if "[PAD]" not in special or "[CLS]" not in special:
        raise UsageError(f"{tokenizer_file}: not a BERT tokenizer (no [PAD] or [CLS])")
    dtype = token_dtype(max(tok.get_vocab_size(), len(labels)))
    splits = {}
    for name, examples in (("train", train), ("validation", validation)):
        if examples is None:
            splits[name] = None
            continue
        rows = encode_examples(examples, tokenizer_file, labels, seq_len).astype(dtype)
        splits[name] = EncodedSplit(rows, int((rows[:, 1 : 1 + seq_len] != special["[PAD]"]).sum()), examples.path)
    return write_examples_dataset(
        output, tokenizer_file, splits, seq_len=seq_len, dtype=dtype, vocab_size=tok.get_vocab_size(),
        eot_id=special["[SEP]"], tokenizer_kind="wordpiece", format=FORMAT, special_tokens=special, labels=labels,
    )  # fmt: skip
