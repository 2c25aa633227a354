"""T5's span corruption (``lmscale.data.span_corruption``) on the samples of real prepared shards."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from lmscale.data.manifest import read_manifest
from lmscale.data.span_corruption import Lengths, SpanCorruptionBatch, noise_counts
from lmscale.data.stream import read_shard, split_shards

SENTINELS = list(range(10_000, 10_100))
EOS = 9_999


def real_samples(dataset: Path) -> np.ndarray:
    manifest = read_manifest(dataset)
    shards = split_shards(str(dataset), manifest, "train")[:8]
    return np.concatenate([read_shard(s, manifest.sample_len, manifest.np_dtype)[0] for s in shards])


def uncorrupted(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The sample back from its input and target: each sentinel of the input replaced by its span."""
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets[:-1].tolist():
        if token in SENTINELS:
            current = spans.setdefault(token, [])
        else:
            assert current is not None
            current.append(token)
    restored: list[int] = []
    for token in inputs[:-1].tolist():
        restored += spans[token] if token in SENTINELS else [token]
    return np.asarray(restored)


def test_t5s_lengths_nothing_pads() -> None:
    # T5's own numbers for inputs of 512 tokens (random_spans_helper): 568 raw tokens, 114 targets.
    assert Lengths.for_inputs(512) == Lengths(568, 512, 114)
    for inputs in (8, 64, 114, 512, 2048):
        lengths = Lengths.for_inputs(inputs)
        assert lengths.inputs == inputs or Lengths.for_inputs(inputs - 1) == lengths  # the longest that fits
        noise, spans = noise_counts(lengths.raw, 0.15, 3.0)
        assert lengths.inputs == lengths.raw - noise + spans + 1 and lengths.targets == noise + spans + 1
    with pytest.raises(ValueError, match="holds no kept token"):
        Lengths.for_inputs(2)


def test_corruption_of_real_samples_has_t5s_statistics_and_loses_no_token(dataset: Path) -> None:
    samples = real_samples(dataset)
    lengths = Lengths.for_inputs(59)  # the 65-token samples of the session's dataset
    assert lengths.raw == samples.shape[1] == 65
    batch = SpanCorruptionBatch(SENTINELS, EOS, seed=7)(samples, range(len(samples)))
    inputs, targets = batch["idx"].numpy(), batch["targets"].numpy()
    # Every row has exactly the computed lengths: no padding, and nothing cut.
    assert inputs.shape == (len(samples), lengths.inputs) and targets.shape == (len(samples), lengths.targets)
    assert (inputs[:, -1] == EOS).all() and (targets[:, -1] == EOS).all()
    span_lengths, noise = [], 0
    for row, (source, target) in enumerate(zip(inputs, targets, strict=True)):
        assert np.array_equal(uncorrupted(source, target), samples[row])
        sentinels = [t for t in target.tolist() if t in SENTINELS]
        assert sentinels == SENTINELS[: len(sentinels)]  # in order, one per span
        starts = [i for i, t in enumerate(target.tolist()) if t in SENTINELS] + [len(target) - 1]
        span_lengths += [b - a - 1 for a, b in itertools.pairwise(starts)]
        noise += len(target) - 1 - len(sentinels)
    assert min(span_lengths) >= 1
    assert noise / samples.size == pytest.approx(0.15, abs=0.01)
    assert np.mean(span_lengths) == pytest.approx(3.0, abs=0.35)
    assert np.std(span_lengths) > 0.5  # random spans, not a fixed length


def test_the_spans_depend_on_the_seed_and_the_stream_position_only(dataset: Path) -> None:
    samples = real_samples(dataset)[:6]
    corrupt = SpanCorruptionBatch(SENTINELS, EOS, seed=7)
    whole = corrupt(samples, range(100, 106))
    # The same positions served in other micro-batches (another world size, another loader worker).
    halves = [corrupt(samples[i : i + 3], range(100 + i, 103 + i)) for i in (0, 3)]
    for key in ("idx", "targets"):
        assert np.array_equal(np.concatenate([h[key].numpy() for h in halves]), whole[key].numpy())
    # Another position of the same sample (its next epoch), or another seed: other spans.
    again = corrupt(samples, range(200, 206))["targets"].numpy()
    other_seed = SpanCorruptionBatch(SENTINELS, EOS, seed=8)(samples, range(100, 106))["targets"].numpy()
    assert not np.array_equal(again, whole["targets"].numpy())
    assert not np.array_equal(other_seed, whole["targets"].numpy())


def test_too_few_sentinels_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="samples of 568 tokens need 28 sentinels, the tokenizer has 10"):
        SpanCorruptionBatch(SENTINELS[:10], EOS, seed=0)(np.zeros((1, 568), np.int64), [0])
