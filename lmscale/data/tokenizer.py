"""Train or load a Hugging Face ``tokenizers`` tokenizer; the one file every later stage reads."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmscale.errors import LmscaleError, UsageError

EOT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_SENTINELS = 100
"""Span-corruption sentinels a trained T5 tokenizer holds, ``<extra_id_0>`` ... (as transformers' T5 has)."""
TokenizerKind = Literal["bpe", "wordpiece", "unigram"]


def sentinel(i: int) -> str:
    """The i-th span-corruption sentinel, named as transformers' T5 tokenizers name them."""
    return f"<extra_id_{i}>"


T5_SPECIALS = [T5_PAD, T5_EOS, T5_UNK, *(sentinel(i) for i in range(T5_SENTINELS))]


def train_tokenizer(texts: Iterable[str], vocab_size: int, kind: TokenizerKind = "bpe") -> Tokenizer:
    """Byte-level BPE with an end-of-text token (GPT), uncased WordPiece with BERT's specials, or a
    SentencePiece-style Unigram with T5's (padding, end of sequence, unknown, the sentinels)."""
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer: trainers.Trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=T5_SPECIALS, unk_token=T5_UNK, show_progress=False
        )
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # trim_offsets=False keeps offsets of the raw text; the post-processor adds no special tokens.
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return with_bert_template(tok) if kind == "wordpiece" else tok


def with_bert_template(tok: Tokenizer) -> Tokenizer:
    """``encode(text)`` gives ``[CLS] text [SEP]`` and ``encode(a, b)`` ``[CLS] a [SEP] b [SEP]`` with token types
    0 and 1, as BERT's own tokenizers do (pipelines and fine-tuning rely on it; packing adds the tokens itself)."""
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise LmscaleError(f"{path}: not a valid tokenizer.json ({err})") from None


def end_token_id(tok: Tokenizer) -> int:
    """The id appended after every document: <|endoftext|> (GPT), [SEP] (BERT) or </s> (T5)."""
    for special in (EOT, "[SEP]", T5_EOS):
        token_id = tok.token_to_id(special)
        if token_id is not None:
            return token_id
    raise LmscaleError(f"tokenizer has neither {EOT} nor [SEP]: add an end-of-text special token")


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """The special tokens lmscale knows (GPT's end-of-text, BERT's five, T5's) that ``tok`` has, with their ids."""
    known = [EOT, *BERT_SPECIALS, *T5_SPECIALS]
    return {token: i for token in known if (i := tok.token_to_id(token)) is not None}


def tokenizer_kind(tok: Tokenizer) -> TokenizerKind:
    model = json.loads(tok.to_str())["model"]["type"]
    return {"WordPiece": "wordpiece", "Unigram": "unigram"}.get(model, "bpe")  # type: ignore[return-value]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
