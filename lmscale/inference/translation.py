"""BLEU and chrF of an encoder-decoder's outputs for source texts against their references, with sacrebleu
(corpus BLEU with its default 13a tokenisation, and chrF), the scores MT papers report."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from lmscale.bleu import TranslationScore, score
from lmscale.data.seq2seq import Pairs
from lmscale.errors import UsageError
from lmscale.inference.seq2seq import input_ids, outputs
from lmscale.models.seq2seq_search import EncoderDecoder


def is_pairs_file(path: str, source_field: str) -> bool:
    """A .jsonl or .csv file whose first row has ``source_field``."""
    file = Path(path)
    if file.suffix.lower() not in (".jsonl", ".csv") or not file.is_file():
        return False
    with open(file, encoding="utf-8", errors="replace") as f:
        head = f.readline()
    return f'"{source_field}"' in head if file.suffix.lower() == ".jsonl" else source_field in head.split(",")


def check_lengths(pairs: Pairs, tok: Tokenizer, limit: int | None) -> None:
    """A source longer than the inputs the model was trained on is one line naming its file and line."""
    if limit is None:
        return
    for ids, number in zip(input_ids(tok, pairs.sources), pairs.lines, strict=True):
        if len(ids) > limit:
            raise UsageError(f"{pairs.path}:{number}: the source is {len(ids)} tokens, the model's inputs {limit}")


def translate_and_score(model: EncoderDecoder, tok: Tokenizer, pairs: Pairs, num_beams: int, max_new_tokens: int,
                        batch_size: int) -> tuple[list[str], TranslationScore]:  # fmt: skip
    """The model's output text for every source (special tokens dropped), and its BLEU and chrF."""
    check_lengths(pairs, tok, model.cfg.seq_len)
    ids = outputs(model, tok, pairs.sources, num_beams, max_new_tokens, batch_size)
    hypotheses = [tok.decode(out, skip_special_tokens=True) for out in ids]
    return hypotheses, score(hypotheses, pairs.targets)
