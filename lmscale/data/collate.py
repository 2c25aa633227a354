"""Micro-batches of samples -> a model's inputs: ``{"idx", "targets"}`` and, for an encoder, ``pad_mask`` (and
``token_type_ids`` for a classifier; an encoder-decoder's pairs cut to their longest).

Runs in the loader workers, with the global stream position of every sample: masking draws from a generator
seeded by (run seed, position), so each serving of a sample gets fresh masks, and a resume on any world size
or number of loader workers masks exactly as the uninterrupted run did.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MASK_STREAM = 3
"""Tells the masking generators apart from the stream's others (shard order 0, sample order 1, mixture 2)."""


def causal_batch(tokens: np.ndarray, positions: Sequence[int]) -> dict[str, torch.Tensor]:
    """Next-token prediction: each sample's first seq_len tokens, predicting the seq_len after them."""
    rows = torch.from_numpy(tokens.astype(np.int64))
    return {"idx": rows[:, :-1], "targets": rows[:, 1:]}


class MaskedLMBatch:
    """BERT's masking: each ordinary token is chosen with ``probability``; a chosen one becomes [MASK] 80% of the
    time, a random ordinary token 10%, stays itself 10%, and only chosen ones carry a target. Special tokens
    ([CLS], [SEP], [PAD], ...) are never chosen."""

    def __init__(self, special_tokens: dict[str, int], vocab_size: int, probability: float, seed: int) -> None:
        self.mask_id, self.pad_id = special_tokens["[MASK]"], special_tokens["[PAD]"]
        self.special = np.asarray(sorted(special_tokens.values()), dtype=np.int64)
        self.ordinary = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), self.special)
        self.probability, self.seed = probability, seed

    def __call__(self, tokens: np.ndarray, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = tokens.astype(np.int64)
        targets = np.full_like(idx, -100)
        maskable = ~np.isin(idx, self.special)
        for row, position in enumerate(positions):
            rng = np.random.default_rng([self.seed, position, MASK_STREAM])
            chosen = (rng.random(idx.shape[1]) < self.probability) & maskable[row]
            how = rng.random(idx.shape[1])
            random_tokens = self.ordinary[rng.integers(len(self.ordinary), size=idx.shape[1])]
            targets[row, chosen] = idx[row, chosen]
            idx[row] = np.where(chosen & (how < 0.8), self.mask_id, idx[row])
            idx[row] = np.where(chosen & (how >= 0.8) & (how < 0.9), random_tokens, idx[row])
        return {
            "idx": torch.from_numpy(idx),
            "targets": torch.from_numpy(targets),
            "pad_mask": torch.from_numpy(tokens != self.pad_id),
        }


class ClassificationBatch:
    """Rows of ``lmscale.data.labelled`` (label id, token ids, token types) -> a classifier's inputs, cut to the
    batch's longest example. Positions at or past ``examples`` (the end of a validation pass that fills its
    last micro-batches with repeats) get the target -100, so they count towards no score."""

    def __init__(self, pad_id: int, seq_len: int, examples: int | None = None) -> None:
        self.pad_id, self.seq_len, self.examples = pad_id, seq_len, examples

    def __call__(self, tokens: np.ndarray, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = tokens.astype(np.int64)
        idx, types = rows[:, 1 : 1 + self.seq_len], rows[:, 1 + self.seq_len :]
        targets = rows[:, 0].copy()
        if self.examples is not None:
            targets[np.asarray(positions) >= self.examples] = -100
        pad_mask = idx != self.pad_id
        longest = int(pad_mask.sum(axis=1).max())
        return {
            "idx": torch.from_numpy(np.ascontiguousarray(idx[:, :longest])),
            "token_type_ids": torch.from_numpy(np.ascontiguousarray(types[:, :longest])),
            "pad_mask": torch.from_numpy(np.ascontiguousarray(pad_mask[:, :longest])),
            "targets": torch.from_numpy(targets),
        }


HEADER = 3
"""Values before the source's ids: the pair's index, the source's and the target's lengths."""


class Seq2SeqBatch:
    """Rows of ``write_pairs_dataset`` -> an encoder-decoder's inputs (``idx``, ``pad_mask``) and ``targets``
    (-100 past each target), cut to the batch's longest source and target. For validation (``examples``
    given) it adds ``example_ids``, each row's pair in the validation file, -1 at positions at or past
    ``examples`` (the repeats that fill the last micro-batches), whose targets are all -100."""

    def __init__(self, seq_len: int, target_len: int, pad_id: int, examples: int | None = None) -> None:
        self.seq_len, self.target_len, self.pad_id, self.examples = seq_len, target_len, pad_id, examples

    def __call__(self, tokens: np.ndarray, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = tokens.astype(np.int64)
        index, source_len, target_len = rows[:, 0], rows[:, 1], rows[:, 2]
        sources = rows[:, HEADER : HEADER + int(source_len.max())]
        targets = rows[:, HEADER + self.seq_len : HEADER + self.seq_len + int(target_len.max())]
        pad_mask = np.arange(sources.shape[1]) < source_len[:, None]
        scored = np.arange(targets.shape[1]) < target_len[:, None]
        batch = {"idx": torch.from_numpy(np.ascontiguousarray(sources)),
                 "pad_mask": torch.from_numpy(np.ascontiguousarray(pad_mask))}  # fmt: skip
        if self.examples is not None:
            repeat = np.asarray(positions) >= self.examples
            scored &= ~repeat[:, None]
            batch["example_ids"] = torch.from_numpy(np.where(repeat, -1, index))
        batch["targets"] = torch.from_numpy(np.where(scored, targets, -100))
        return batch
