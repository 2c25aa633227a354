"""T5's span corruption (Raffel et al. 2020, section 3.1.4): a share of a sample's tokens, in spans of a mean
length, is replaced in the input by one sentinel per span, and the target spells out each span after its
sentinel.

``Lengths`` chooses the raw sample length from the encoder's input length so that, with the noise share and
mean span length rounded as the spans are drawn, every corrupted input and every target has exactly its
length: nothing pads (what T5's ``random_spans_helper`` computes). The spans of a sample are drawn from a
generator seeded by (run seed, the sample's global stream position), so that each serving of a sample is
corrupted afresh and a resume on any world size corrupts exactly as the uninterrupted run did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0
SPAN_STREAM = 4
"""Tells the span generators apart from the stream's others (shard order 0, sample order 1, mixture 2, BERT
masks 3)."""


def noise_counts(raw: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a sample of ``raw`` tokens: at least one of each, and at least one
    token left as it is."""
    noise = min(max(round(raw * density), 1), raw - 1)
    return noise, max(round(noise / mean_span), 1)


@dataclass(frozen=True)
class Lengths:
    raw: int
    """Tokens of a stored sample."""
    inputs: int
    """The encoder's input: the kept tokens, a sentinel per span, end of sequence."""
    targets: int
    """The decoder's: a sentinel and the tokens of each span, end of sequence."""

    @classmethod
    def for_inputs(cls, inputs: int, density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> Lengths:
        """The longest raw sample whose corrupted input fits ``inputs`` tokens, and its exact lengths."""

        def corrupted(raw: int) -> tuple[int, int]:
            noise, spans = noise_counts(raw, density, mean_span)
            return raw - noise + spans + 1, noise + spans + 1

        if inputs < 3:
            raise ValueError(f"an input of {inputs} tokens holds no kept token, sentinel and end of sequence")
        raw = 2
        while corrupted(raw + 1)[0] <= inputs:
            raw += 1
        return cls(raw, *corrupted(raw))


def _segments(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` split into ``parts`` positive lengths, uniformly among such splits."""
    cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False) + 1) if parts > 1 else np.empty(0, np.int64)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(raw: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """Which of ``raw`` tokens are noise: spans of noise and of kept tokens alternate, kept first, their
    lengths drawn as random splits of each total (T5's ``random_spans_noise_mask``)."""
    noise, spans = noise_counts(raw, density, mean_span)
    noise_lengths = _segments(noise, spans, rng)
    kept_lengths = _segments(raw - noise, spans, rng)
    interleaved = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), interleaved)


def corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of one sample: each noise span replaced by the next sentinel in the input; the target
    each sentinel followed by its span. Both end with ``eos``."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    spans = int(starts.sum())
    inputs = np.where(starts, sentinels[np.cumsum(starts) - 1], tokens)[~mask | starts]
    targets = np.insert(tokens[mask], np.flatnonzero(starts[mask]), sentinels[:spans])
    return np.concatenate([inputs, [eos]]), np.concatenate([targets, [eos]])


class SpanCorruptionBatch:
    """Raw samples -> ``{"idx": corrupted inputs, "targets": their spans}``, each of its exact length."""

    def __init__(self, sentinel_ids: Sequence[int], eos_id: int, seed: int, density: float = NOISE_DENSITY,
                 mean_span: float = MEAN_SPAN) -> None:  # fmt: skip
        self.sentinels = np.asarray(sentinel_ids, dtype=np.int64)
        self.eos, self.seed, self.density, self.mean_span = eos_id, seed, density, mean_span

    def __call__(self, tokens: np.ndarray, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = tokens.astype(np.int64)
        _, spans = noise_counts(rows.shape[1], self.density, self.mean_span)
        if spans > len(self.sentinels):
            raise ValueError(f"samples of {rows.shape[1]} tokens need {spans} sentinels, the tokenizer has "
                             f"{len(self.sentinels)}")  # fmt: skip
        inputs, targets = [], []
        for row, position in zip(rows, positions, strict=True):
            rng = np.random.default_rng([self.seed, position, SPAN_STREAM])
            mask = noise_mask(len(row), self.density, self.mean_span, rng)
            source, target = corrupt(row, mask, self.sentinels, self.eos)
            inputs.append(source)
            targets.append(target)
        return {"idx": torch.from_numpy(np.stack(inputs)), "targets": torch.from_numpy(np.stack(targets))}
