"""The training stream over real shards: rank split, elastic determinism, resume, epochs, mixtures, corruption."""

import re
import shutil
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from lmscale.data.manifest import read_manifest
from lmscale.data.stream import ShardStream, StreamSource, split_shards
from lmscale.errors import LmscaleError


def make_stream(dataset: Path, rank: int, world: int, mb: int = 4, start: int = 0, **kw: object) -> ShardStream:
    manifest = read_manifest(dataset)
    sources = kw.pop("sources", None) or [StreamSource(split_shards(str(dataset), manifest, "train"))]
    kw.setdefault("lanes", 4)  # the order properties below hold for any lane count; 4 is what 2 ranks divide
    return ShardStream(
        sources,
        manifest.sample_len,
        manifest.dtype,
        mb,
        rank,
        world,
        seed=7,
        start_position=start,
        **kw,  # type: ignore[arg-type]
    )


def global_sequence(dataset: Path, world: int, samples: int, start: int = 0, mb: int = 4, **kw: object) -> list[str]:
    """Keys by global position, gathered from every rank's micro-batches."""
    by_position: dict[int, str] = {}
    for rank in range(world):
        stream = make_stream(dataset, rank, world, mb, start, **kw)
        for i in range(samples // (mb * world)):
            batch = stream.micro_batch(i)
            by_position.update(zip(stream.positions(i), batch["keys"], strict=True))  # type: ignore[arg-type]
    return [by_position[p] for p in range(start, start + samples)]


def test_ranks_read_disjoint_samples_covering_the_epoch(dataset: Path) -> None:
    n = read_manifest(dataset).splits["train"].samples
    usable = n - n % 8
    per_rank = [
        [k for i in range(usable // 8) for k in make_stream(dataset, r, 2).micro_batch(i)["keys"]]  # type: ignore[union-attr]
        for r in range(2)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == usable


def test_global_order_is_independent_of_world_size(dataset: Path) -> None:
    one = global_sequence(dataset, 1, 96)
    assert global_sequence(dataset, 2, 96) == one
    assert global_sequence(dataset, 3, 96) == one
    assert len(set(one)) == 96


def test_resume_at_any_position_continues_the_sequence_on_another_world_size(dataset: Path) -> None:
    full = global_sequence(dataset, 2, 240)
    assert global_sequence(dataset, 3, 96, start=48) == full[48:144]
    assert global_sequence(dataset, 1, 96, start=144) == full[144:240]


def test_loader_workers_do_not_change_the_order(dataset: Path) -> None:
    direct = [make_stream(dataset, 1, 2).micro_batch(i)["keys"] for i in range(6)]
    for workers in (1, 3):
        loader = DataLoader(make_stream(dataset, 1, 2), batch_size=None, num_workers=workers)
        it = iter(loader)
        assert [next(it)["keys"] for _ in range(6)] == direct


def test_epochs_cover_every_sample_with_a_new_order(dataset: Path) -> None:
    n = read_manifest(dataset).splits["train"].samples
    seq = global_sequence(dataset, 1, 2 * n, mb=1)
    first, second = seq[:n], seq[n:]
    assert sorted(first) == sorted(second) and len(set(first)) == n
    assert first != second
    unshuffled = global_sequence(dataset, 1, n, mb=1, shuffle=False, lanes=1)
    assert unshuffled == sorted(unshuffled)


def test_lanes_deal_blocks_of_one_contiguous_epoch_order(dataset: Path) -> None:
    n = read_manifest(dataset).splits["train"].samples
    n -= n % 4  # full blocks only (the tail after them keeps its place)
    plain = global_sequence(dataset, 1, n, mb=4, shuffle=False, lanes=1)  # one lane: the epoch in order
    laned = global_sequence(dataset, 1, n, mb=4, shuffle=False, lanes=3)
    assert sorted(laned) == sorted(plain)  # a permutation of the epoch
    blocks = (n // 4 + 2) // 3  # the first lane's length in blocks of 4: ceil(blocks / lanes)
    # Micro-batch 0 opens lane 0 (the epoch's start), micro-batch 1 lane 1, micro-batch 3 continues lane 0.
    assert laned[0:4] == plain[0:4] and laned[4:8] == plain[blocks * 4 : blocks * 4 + 4]
    assert laned[12:16] == plain[4:8]


def test_each_rank_reads_only_its_lanes_shards(dataset: Path) -> None:
    """With world x workers dividing the lanes, an epoch costs each rank about 1/world of the shard reads."""
    manifest = read_manifest(dataset)
    shards = len(manifest.splits["train"].shards)
    n = manifest.splits["train"].samples
    reads = []
    for rank in range(2):
        stream = make_stream(dataset, rank, 2, mb=2, lanes=4)
        for i in range(n // 4):
            stream.micro_batch(i)
        reads.append(stream.shards_read)
    # Each lane crosses into at most one shard it shares with the next lane.
    assert all(r <= shards // 2 + 3 for r in reads) and sum(reads) <= shards + 4
    one_lane = make_stream(dataset, 0, 2, mb=2, lanes=1)  # every rank reads every shard of the epoch
    for i in range(n // 4):
        one_lane.micro_batch(i)
    assert one_lane.shards_read == shards


def test_mixture_draws_in_proportion(dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    manifest = read_manifest(dataset)
    sources = [
        StreamSource(split_shards(str(dataset), manifest, "train"), weight=3.0),
        StreamSource(split_shards(str(other), manifest, "train"), weight=1.0),
    ]
    stream = make_stream(dataset, 0, 1, mb=1, sources=sources)
    urls = []
    for i in range(4000):
        source, _ = stream.mixture.locate(i)
        urls.append(source)
    assert urls.count(0) == 3000 and urls.count(1) == 1000
    # Every key names its source: the two copies hold samples of the same names, yet no two keys are equal
    # within an epoch, and each key's prefix is the source the mixture drew that position from.
    keys = [stream.micro_batch(i)["keys"][0] for i in range(400)]
    assert len(set(keys)) == len(keys)
    assert [int(k.split(":")[0]) for k in keys] == [stream.mixture.locate(i)[0] for i in range(400)]
    assert all(re.fullmatch(r"[01]:train-\d{6}-\d{6}", k) for k in keys)


def test_corrupt_shard_is_skipped_with_a_count_or_fatal_when_strict(dataset: Path, tmp_path: Path, caplog) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    manifest = read_manifest(broken)
    victim = broken / manifest.splits["train"].shards[0].file
    victim.write_bytes(victim.read_bytes()[:3000])  # truncated tar
    n = manifest.splits["train"].samples
    seq = global_sequence(broken, 2, n - n % 8)
    assert not any(k.startswith("train-000000-") for k in seq)
    assert any("skipping corrupt shard" in r.message and "train-000000.tar" in r.message for r in caplog.records)
    stream = make_stream(broken, 0, 1, mb=n, strict=True)
    with pytest.raises(LmscaleError, match=r"train-000000.tar: sha256 does not match the manifest \(data.strict"):
        stream.micro_batch(0)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: b"\x00garbage" * 400, r"unreadable tar|0 samples"),
        (lambda data: data[: len(data) // 2], r"unreadable tar|\d+ samples, the manifest says"),
    ],
    ids=["not-a-tar", "cut-in-half"],
)
def test_a_damaged_tar_with_a_matching_checksum_is_still_caught(dataset: Path, damage, reason: str) -> None:
    """Damage that the manifest cannot see (a shard rewritten with its checksum): the tar itself is checked."""
    import hashlib

    from lmscale.data.stream import CorruptShard, ShardRef, read_shard

    manifest = read_manifest(dataset)
    shard = split_shards(str(dataset), manifest, "train")[0]
    data = damage(Path(shard.url).read_bytes())
    bad = Path(shard.url).with_name("damaged.tar")
    bad.write_bytes(data)
    try:
        ref = ShardRef(str(bad), bad.name, shard.samples, hashlib.sha256(data).hexdigest())
        with pytest.raises(CorruptShard, match=reason):
            read_shard(ref, manifest.sample_len, manifest.np_dtype)
    finally:
        bad.unlink()


@pytest.fixture
def http_root(dataset: Path):
    """A local HTTP server over the prepared dataset's parent, as object storage with an HTTP front would be."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(dataset.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("template", ["file://{dir}", "pipe:cat {dir}/{{file}}", "{http}/{name}"])
def test_shards_stream_from_urls_and_pipe_commands(dataset: Path, template: str, http_root: str) -> None:
    location = template.format(dir=dataset, http=http_root, name=dataset.name)
    manifest = read_manifest(location)
    remote = [StreamSource(split_shards(location, manifest, "train"))]
    assert global_sequence(dataset, 2, 48, sources=remote) == global_sequence(dataset, 2, 48)
