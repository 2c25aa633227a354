"""The training stream: WebDataset shards -> micro-batches, in a global order that no world size changes.

The order is a pure function of (seed, data, lanes, micro-batch size):

    global position p  --mixture-->  (dataset d, position q in d's endless stream)
    q  --epoch e = q // N_d-->  in-epoch position  --lanes-->  position in the epoch's sample sequence
    epoch sequence: shard order shuffled with (seed, d, e), samples within a shard shuffled with (seed, d, e, shard)

Lanes (like MosaicML's canonical nodes) cut the epoch sequence into ``lanes`` contiguous segments and
deal consecutive blocks of ``micro_batch_size`` positions to them in turn: block 0 from lane 0, block 1
from lane 1, ... Each micro-batch then comes from one lane and a global batch from up to ``lanes`` far
apart parts of the corpus, and a rank only reads the shards of its own lanes (exactly 1/world of them
when world_size x loader workers divides ``lanes``) instead of every shard.

Step t consumes the global positions [t * B, (t + 1) * B), B = micro_batch * grad_accum * world. Rank r's
i-th micro-batch after a start position s holds the positions s + (i * world + r) * micro_batch + [0,
micro_batch). So every rank gets the same number of batches whatever the shard sizes, loader worker w of
n yields the rank's micro-batches i = w, w + n, ... (the DataLoader's round-robin restores the order), and
a run resumed from position s on any world size continues the same global sequence. A resume seeks to
the shard that holds position s and indexes into it; it does not read through earlier shards.
"""

from __future__ import annotations

import io
import logging
import math
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lmscale.data.collate import causal_batch
from lmscale.data.manifest import Manifest, ShardRecord, dataset_url, is_remote, read_dataset_file
from lmscale.data.object_store import ObjectStoreError
from lmscale.data.shard_cache import ShardCache
from lmscale.errors import LmscaleError

log = logging.getLogger(__name__)

MIXTURE_BLOCK = 1000
"""Positions per mixture block: each block holds every dataset's exact share (to 1/1000), in seeded order."""


@dataclass(frozen=True)
class ShardRef:
    url: str
    name: str
    samples: int
    sha256: str


def split_shards(dataset: str, manifest: Manifest, split: str) -> list[ShardRef]:
    record = manifest.splits.get(split)
    if record is None or not record.shards:
        raise LmscaleError(f"{dataset}: the dataset has no {split!r} samples")
    return [shard_ref(dataset, s) for s in record.shards]


def shard_ref(dataset: str, shard: ShardRecord) -> ShardRef:
    return ShardRef(dataset_url(dataset, shard.file), Path(shard.file).name, shard.samples, shard.sha256)


class Lanes:
    """Deals blocks of ``block`` positions of an epoch of ``samples`` to ``lanes`` contiguous segments of it.

    A bijection on [0, samples): in-epoch position -> position in the epoch's sequence. Full blocks go
    round-robin to the lanes, lane l holding the l-th contiguous run of blocks; the positions after the
    last full block map to themselves.
    """

    def __init__(self, samples: int, block: int, lanes: int) -> None:
        self.block = block
        self.blocks = samples // block
        self.lanes = max(1, min(lanes, self.blocks))
        self.per_lane, self.longer = divmod(self.blocks, self.lanes)  # the first `longer` lanes hold one more

    def lane_start(self, lane: int) -> int:
        """First block of a lane's segment."""
        return lane * self.per_lane + min(lane, self.longer)

    def __call__(self, position: int) -> int:
        block, within = divmod(position, self.block)
        if block >= self.blocks:
            return position
        lane, index = block % self.lanes, block // self.lanes
        return (self.lane_start(lane) + index) * self.block + within


class SourceOrder:
    """The endless sample order of one dataset split: a new seeded shuffle every epoch, read in lanes."""

    def __init__(
        self, shards: list[ShardRef], seed: int, source_index: int, shuffle: bool, block: int = 1, lanes: int = 1
    ) -> None:
        self.shards = shards
        self.seed, self.source_index, self.shuffle = seed, source_index, shuffle
        self.counts = np.array([s.samples for s in shards], dtype=np.int64)
        self.epoch_samples = int(self.counts.sum())
        self.lanes = Lanes(self.epoch_samples, block, lanes)

    @lru_cache(maxsize=4)  # noqa: B019 - a few epochs are live at once (resume, epoch boundary)
    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard order of an epoch and the first epoch position of each shard in that order."""
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.source_index, epoch]).permutation(len(self.shards))
        starts = np.concatenate([[0], np.cumsum(self.counts[order])[:-1]])
        return order, starts

    @lru_cache(maxsize=16)  # noqa: B019
    def _sample_permutation(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.source_index, epoch, shard, 1]).permutation(
            int(self.counts[shard])
        )

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, index into the epoch's shard order, offset in that shard) of a stream position."""
        epoch, in_epoch = divmod(position, self.epoch_samples)
        in_epoch = self.lanes(in_epoch)
        _, starts = self._epoch_layout(epoch)
        slot = int(np.searchsorted(starts, in_epoch, side="right")) - 1
        return epoch, slot, in_epoch - int(starts[slot])

    def shard_at(self, epoch: int, slot: int) -> int:
        order, _ = self._epoch_layout(epoch)
        return int(order[slot % len(order)])

    def sample_index(self, epoch: int, shard: int, offset: int) -> int:
        if not self.shuffle:
            return offset
        return int(self._sample_permutation(epoch, shard)[offset])


class Mixture:
    """Which dataset each global position draws from, in exact proportion per block of positions."""

    def __init__(self, weights: list[float], seed: int) -> None:
        shares = np.asarray(weights, dtype=np.float64) / sum(weights) * MIXTURE_BLOCK
        quotas = np.floor(shares).astype(np.int64)
        # Largest remainder: hand the positions lost to rounding to the largest fractional parts.
        for i in np.argsort(-(shares - quotas), kind="stable")[: MIXTURE_BLOCK - int(quotas.sum())]:
            quotas[i] += 1
        if (quotas == 0).any():
            raise LmscaleError(f"data.sources: a weight below 1/{MIXTURE_BLOCK} of the total draws no samples")
        self.quotas, self.seed = quotas, seed
        self.pattern = np.repeat(np.arange(len(quotas)), quotas)

    @lru_cache(maxsize=4)  # noqa: B019
    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        sources = np.random.default_rng([self.seed, block, 2]).permutation(self.pattern)
        rank = np.zeros(MIXTURE_BLOCK, dtype=np.int64)
        seen = np.zeros(len(self.quotas), dtype=np.int64)
        for i, s in enumerate(sources):
            rank[i] = seen[s]
            seen[s] += 1
        return sources, rank

    def locate(self, position: int) -> tuple[int, int]:
        """(dataset index, position in that dataset's stream) of a global position."""
        if len(self.quotas) == 1:
            return 0, position
        block, offset = divmod(position, MIXTURE_BLOCK)
        sources, rank = self._block(block)
        source = int(sources[offset])
        return source, block * int(self.quotas[source]) + int(rank[offset])


class CorruptShard(Exception):
    pass


def shard_bytes(shard: ShardRef, cache: ShardCache | None = None) -> bytes:
    """A shard's bytes, checked against the manifest's sha256: from ``cache`` where it holds them, else
    downloaded (and then kept there). A transport error that outlasts its retries, or a missing object,
    raises ``ObjectStoreError`` and stops the run: the shard may be fine, and skipping it would change the
    sample order."""
    import hashlib

    if cache is None or not shard.sha256 or not is_remote(shard.url):
        cache = None  # a local shard is read where it is
    cached = cache.get(shard.sha256) if cache is not None else None
    if cached is not None:
        return cached
    try:
        data = read_dataset_file(shard.url)
    except ObjectStoreError:
        raise
    except Exception as err:  # gopen raises OSError, or IOError-like errors from a pipe: command
        raise CorruptShard(f"cannot open ({err})") from None
    if shard.sha256 and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise CorruptShard("sha256 does not match the manifest")
    if cache is not None:
        cache.put(shard.sha256, data)
    return data


def read_shard(
    shard: ShardRef, sample_len: int, dtype: np.dtype, cache: ShardCache | None = None
) -> tuple[np.ndarray, list[str]]:
    """All samples of a shard as a (samples, sample_len) array with their keys, checked against the manifest."""
    from webdataset.tariterators import tar_file_iterator

    data = shard_bytes(shard, cache)
    tokens = np.empty((shard.samples, sample_len), dtype=dtype)
    keys: list[str] = []
    payload = sample_len * tokens.itemsize
    header = b""  # the .npy header every sample of the shard shares, checked in full on the first one
    try:
        for member in tar_file_iterator(io.BytesIO(data), handler=None):
            name, raw = member["fname"], member["data"]
            if not name.endswith(".tokens.npy"):
                continue
            if len(keys) == shard.samples:
                raise CorruptShard(f"more samples than the manifest's {shard.samples}")
            if header and raw[: len(header)] == header and len(raw) == len(header) + payload:
                tokens[len(keys)] = np.frombuffer(raw, dtype=dtype, offset=len(header))
            else:
                array = np.load(io.BytesIO(raw), allow_pickle=False)
                if array.shape != (sample_len,) or array.dtype != tokens.dtype:
                    raise CorruptShard(
                        f"{name} has {array.dtype} shape {array.shape}, expected {dtype} ({sample_len},)"
                    )
                tokens[len(keys)] = array
                header = raw[: len(raw) - payload]
            keys.append(name.removesuffix(".tokens.npy"))
    except (tarfile.TarError, ValueError, EOFError, OSError) as err:
        raise CorruptShard(f"unreadable tar ({err.__class__.__name__}: {err})") from None
    if len(keys) != shard.samples:
        raise CorruptShard(f"{len(keys)} samples, the manifest says {shard.samples}")
    return tokens, keys


@dataclass(frozen=True)
class StreamSource:
    shards: list[ShardRef]
    weight: float = 1.0


class ShardStream(IterableDataset):
    """Endless micro-batches of one rank: ``{"inputs": {...}, "keys": [...], "skipped_shards": (...)}``, the
    inputs made by ``collate(samples, their global positions)`` (default: a causal LM's ``idx`` and ``targets``,
    lmscale.data.collate)."""

    def __init__(
        self,
        sources: list[StreamSource],
        sample_len: int,
        dtype: str,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start_position: int = 0,
        shuffle: bool = True,
        strict: bool = False,
        max_micro_batches: int | None = None,
        lanes: int = 1,
        collate: Callable[[np.ndarray, Sequence[int]], dict[str, torch.Tensor]] = causal_batch,
        cache: ShardCache | None = None,
    ) -> None:
        super().__init__()
        self.sources = sources
        self.cache = cache
        self.collate = collate
        # A mixture's keys name their source (its position in data.sources): two datasets may hold shards and
        # samples of the same name, and every logged key must trace back to one file.
        self.key_prefixes = [f"{i}:" for i in range(len(sources))] if len(sources) > 1 else [""]
        self.sample_len, self.dtype = sample_len, np.dtype(dtype)
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed, self.start_position = seed, start_position
        self.shuffle, self.strict = shuffle, strict
        self.max_micro_batches = max_micro_batches
        self.lanes = lanes
        self.orders = [
            SourceOrder(s.shards, seed, i, shuffle, block=micro_batch_size, lanes=lanes) for i, s in enumerate(sources)
        ]
        self.mixture = Mixture([s.weight for s in sources], seed)
        self.cache_shards = self.lanes_per_reader(1) + 1
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray, list[str]]] = OrderedDict()
        self._corrupt: set[tuple[int, int]] = set()
        self.skipped_shards: list[str] = []
        """Corrupt shards this reader skipped; every batch carries the list to the trainer, which reports it."""
        self.shards_read = 0

    def lanes_per_reader(self, loader_workers: int) -> int:
        """Lanes one loader worker of this rank draws from: each needs its current shard in memory."""
        return self.lanes // math.gcd(self.lanes, self.world_size * loader_workers)

    def positions(self, micro_batch: int) -> range:
        first = self.start_position + (micro_batch * self.world_size + self.rank) * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    def _load(self, source: int, shard: int) -> tuple[np.ndarray, list[str]] | None:
        key = (source, shard)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if key in self._corrupt:
            return None
        ref = self.sources[source].shards[shard]
        try:
            loaded = read_shard(ref, self.sample_len, self.dtype, self.cache)
            self.shards_read += 1
        except CorruptShard as err:
            if self.strict:
                raise LmscaleError(f"shard {ref.url}: {err} (data.strict is set)") from None
            self._corrupt.add(key)
            self.skipped_shards.append(ref.url)
            log.warning("skipping corrupt shard %s: %s (its samples are drawn from the next shard)", ref.url, err)
            return None
        self._cache[key] = loaded
        while len(self._cache) > self.cache_shards * len(self.sources):
            self._cache.popitem(last=False)
        return loaded

    def sample(self, position: int) -> tuple[np.ndarray, str]:
        source, source_position = self.mixture.locate(position)
        order = self.orders[source]
        epoch, slot, offset = order.locate(source_position)
        # A corrupt shard's positions are served by the next good shard in the epoch's order: every rank
        # makes the same substitution, so batch counts stay equal and nobody waits on a missing sample.
        for step in range(len(order.shards)):
            shard = order.shard_at(epoch, slot + step)
            loaded = self._load(source, shard)
            if loaded is not None:
                tokens, keys = loaded
                index = order.sample_index(epoch, shard, offset) if step == 0 else offset % len(keys)
                return tokens[index], self.key_prefixes[source] + keys[index]
        raise LmscaleError(f"every shard of data source {source} is corrupt")

    def micro_batch(self, index: int) -> dict[str, Any]:
        positions = self.positions(index)
        samples = [self.sample(p) for p in positions]
        inputs = self.collate(np.stack([s[0] for s in samples]), positions)
        return {"inputs": inputs, "keys": [s[1] for s in samples], "skipped_shards": tuple(self.skipped_shards)}

    def __iter__(self) -> Iterator[dict[str, object]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # One shard per lane this worker reads, plus the next one of a lane crossing a shard boundary.
        self.cache_shards = self.lanes_per_reader(workers) + 1
        index = worker
        while self.max_micro_batches is None or index < self.max_micro_batches:
            yield self.micro_batch(index)
            index += workers


def stop_loader_workers(batches: Iterator[Any]) -> None:
    """Stop the worker processes behind a DataLoader's iterator now, through their queues, as its garbage
    collection would. torch 2.13 has no public call for it, so this uses the iterator's ``_shutdown_workers``
    (tests/test_private_apis.py fails if the name disappears); an iterator without workers has none."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
