"""Source/target pairs for sequence to sequence (translation, summarisation ...) -> a prepared dataset that
fine-tuning streams like any other.

Input: CSV (with a header) or JSONL, one pair per row, a ``source`` and a ``target`` text (field names
configurable). Output: WebDataset shards and a manifest of format ``seq2seq`` whose ``seq_len`` is the
longest source and ``target_len`` the longest target, in tokens with the end of sequence. A sample is one row
of ``3 + seq_len + target_len`` integers: the pair's index in its file, the source's and the target's
lengths, then both texts' ids, each followed by end of sequence and padded. The validation targets are kept
as text beside the shards (``references.json``): BLEU is scored against the references as written, not as
the tokenizer gives them back.

A pair does not fit when it is longer than the lengths asked for: it is refused, naming its file and line,
since a cut target would teach the model to stop mid-sentence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmscale.data.collate import HEADER
from lmscale.data.labelled import EncodedSplit, read_rows, write_examples_dataset
from lmscale.data.manifest import Manifest, token_dtype
from lmscale.data.tokenizer import T5_EOS, T5_PAD, load_tokenizer, special_token_ids
from lmscale.errors import UsageError

FORMAT = "seq2seq"
REFERENCES = "references.json"


@dataclass(frozen=True)
class Pairs:
    path: Path
    sources: list[str]
    targets: list[str]
    lines: list[int]
    """Each pair's line in its file (for error messages)."""


def read_pairs(path: str | Path, source_field: str, target_field: str, where: str) -> Pairs:
    """The source/target pairs of a CSV or JSONL file; a row without either, or with an empty one, is one
    line naming its file and line."""
    path, rows = read_rows(path, (source_field, target_field), where)
    return Pairs(path, [str(r[source_field]) for _, r in rows], [str(r[target_field]) for _, r in rows],
                 [number for number, _ in rows])  # fmt: skip


def encoded(tokenizer_file: Path, texts: list[str]) -> list[list[int]]:
    """Each text's ids followed by end of sequence, as an encoder-decoder reads its inputs and writes its
    outputs."""
    tok = load_tokenizer(tokenizer_file)
    eos = tok.token_to_id(T5_EOS)
    return [[*enc.ids, eos] for enc in tok.encode_batch(texts, add_special_tokens=False)]


def check_fits(pairs: Pairs, side: str, ids: list[list[int]], limit: int, field: str) -> None:
    for tokens, number in zip(ids, pairs.lines, strict=True):
        if len(tokens) > limit:
            raise UsageError(
                f"{pairs.path}:{number}: the {side} is {len(tokens)} tokens with end of sequence, more than "
                f"{field}={limit} (raise it, or leave the pair out)"
            )


def encode_pairs(
    pairs: Pairs, tokenizer_file: Path, seq_len: int, target_len: int, pad: int, dtype: str
) -> EncodedSplit:
    """(pairs, 3 + seq_len + target_len) rows: index, lengths, padded source ids, padded target ids."""
    sources, targets = encoded(tokenizer_file, pairs.sources), encoded(tokenizer_file, pairs.targets)
    check_fits(pairs, "source", sources, seq_len, "finetune.max_length")
    check_fits(pairs, "target", targets, target_len, "finetune.max_target_length")
    rows = np.full((len(sources), HEADER + seq_len + target_len), pad, dtype=np.int64)
    for index, (row, source, target) in enumerate(zip(rows, sources, targets, strict=True)):
        row[:HEADER] = index, len(source), len(target)
        row[HEADER : HEADER + len(source)] = source
        row[HEADER + seq_len : HEADER + seq_len + len(target)] = target
    tokens = sum(len(ids) for ids in sources) + sum(len(ids) for ids in targets)
    return EncodedSplit(rows.astype(dtype), tokens, pairs.path)


def write_pairs_dataset(
    output: Path, tokenizer_file: Path, train: Pairs, validation: Pairs | None, seq_len: int, target_len: int
) -> Manifest:
    """Encode the pairs into ``output``: shards, tokenizer, the validation references, the manifest last."""
    tok = load_tokenizer(tokenizer_file)
    special = special_token_ids(tok)
    if T5_PAD not in special or T5_EOS not in special:
        raise UsageError(f"{tokenizer_file}: not a T5 tokenizer (no {T5_PAD} or {T5_EOS})")
    # One dtype holds the ids, the lengths and the pairs' indices.
    most_pairs = max(len(train.sources), len(validation.sources) if validation else 0)
    dtype = token_dtype(max(tok.get_vocab_size(), seq_len + 1, target_len + 1, most_pairs))
    splits = {
        name: encode_pairs(split, tokenizer_file, seq_len, target_len, special[T5_PAD], dtype)
        if split is not None
        else None
        for name, split in (("train", train), ("validation", validation))
    }
    if validation is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / REFERENCES).write_text(json.dumps(validation.targets, ensure_ascii=False) + "\n", encoding="utf-8")
    return write_examples_dataset(
        output, tokenizer_file, splits, seq_len=seq_len, target_len=target_len, dtype=dtype,
        vocab_size=tok.get_vocab_size(), eot_id=special[T5_EOS], tokenizer_kind="unigram", format=FORMAT,
        special_tokens=special,
    )  # fmt: skip


def read_references(dataset: Path) -> list[str]:
    """The validation targets of a seq2seq dataset, in their file's order."""
    path = dataset / REFERENCES
    if not path.is_file():
        raise UsageError(f"{path}: missing (the validation references of a seq2seq dataset)")
    return json.loads(path.read_text(encoding="utf-8"))
