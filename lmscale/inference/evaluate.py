"""Loss and perplexity of a model on a prepared dataset split or on raw text files, without DeepSpeed."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from lmscale.data.manifest import MANIFEST, read_manifest
from lmscale.data.sources import ReadOptions, ReadStats, expand_inputs, read_documents
from lmscale.data.stream import read_shard, split_shards
from lmscale.data.tokenizer import end_token_id
from lmscale.errors import LmscaleError
from lmscale.models import GPT
from lmscale.progress import Progress


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    tokens: int


def prepared_windows(directory: Path, split: str, tokenizer: Tokenizer) -> tuple[list[np.ndarray], int]:
    """The split's samples; refuses a dataset tokenized with another vocabulary."""
    manifest = read_manifest(directory)
    if manifest.vocab_size != tokenizer.get_vocab_size():
        raise LmscaleError(
            f"{directory}: tokenized with a {manifest.vocab_size}-token vocabulary, the model's tokenizer has "
            f"{tokenizer.get_vocab_size()}"
        )
    shards = split_shards(str(directory), manifest, split)
    rows = [read_shard(s, manifest.sample_len, manifest.np_dtype)[0] for s in shards]
    return [row for block in rows for row in block], manifest.seq_len


def text_windows(inputs: list[str], tokenizer: Tokenizer, seq_len: int) -> list[np.ndarray]:
    """Documents of text files, tokenized, joined with end-of-text, cut into windows of seq_len + 1."""
    eot = end_token_id(tokenizer)
    stream: list[int] = []
    for path in expand_inputs(inputs):
        for doc in read_documents(path, ReadOptions(), ReadStats()):
            stream.extend(tokenizer.encode(doc, add_special_tokens=False).ids)
            stream.append(eot)
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise LmscaleError(f"{' '.join(inputs)}: fewer than {seq_len + 1} tokens of text to evaluate")
    return list(np.asarray(stream[: n * (seq_len + 1)], dtype=np.int64).reshape(n, seq_len + 1))


def batches(windows: list[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(windows), batch_size):
        yield torch.from_numpy(np.stack(windows[i : i + batch_size]).astype(np.int64))


@torch.no_grad()
def evaluate(model: GPT, windows: list[np.ndarray], batch_size: int = 8, max_batches: int | None = None) -> EvalResult:
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    count = min(-(-len(windows) // batch_size), max_batches or 10**12)
    with Progress("eval", total=count, unit="batches") as progress:
        for i, tokens in enumerate(batches(windows, batch_size)):
            if i == count:
                break
            tokens = tokens.to(device)
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
            n = tokens[:, 1:].numel()
            total_loss += float(loss) * n
            total_tokens += n
            progress.advance(loss=f"{total_loss / total_tokens:.4f}")
    mean = total_loss / total_tokens
    return EvalResult(mean, math.exp(mean), total_tokens)


def is_prepared(path: str) -> bool:
    return (Path(path) / MANIFEST).is_file()
