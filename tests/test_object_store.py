"""Datasets in object storage, against a real S3-protocol server (moto's standalone server) on localhost, and a
proxy in front of it that drops connections mid-object."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lmscale.data import object_store
from lmscale.data.manifest import read_manifest
from lmscale.data.shard import PrepareOptions, prepare
from lmscale.data.shard_cache import ShardCache
from lmscale.data.stream import CorruptShard, ShardStream, StreamSource, read_shard, split_shards
from lmscale.errors import UsageError

from .conftest import error_lines, losses, run_cli, run_here, train_args
from .distributed import free_port
from .test_prepare import corpus_documents

BUCKET = "lmscale-test"


def start_server(port: int, **env: str) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return server
        assert server.poll() is None, "the S3 server exited at start"
        time.sleep(0.1)
    stop_server(server)
    raise AssertionError("the S3 server did not listen within 60 s")


def stop_server(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server with one bucket; this process and the commands it runs talk to it through the standard
    variables. Stopped by its PID, test failures included."""
    port = free_port()
    server = start_server(port)
    saved = dict(os.environ)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)  # fmt: skip
    object_store._clients.clear()
    try:
        object_store.client().create_bucket(Bucket=BUCKET)
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        os.environ.clear()
        os.environ.update(saved)
        object_store._clients.clear()
        stop_server(server)


class DroppingProxy:
    """A TCP proxy to the S3 server that counts the GETs of every key and cuts the first transfer of each
    shard (a GET from byte 0) after ``cut_after`` bytes of the response: a server dropping connections
    mid-shard. The reader's resumed request, from the byte it reached, goes through."""

    def __init__(self, upstream: str, cut_after: int) -> None:
        self.upstream = upstream.removeprefix("http://").split(":")
        self.cut_after, self.cuts = cut_after, 0
        self.gets, self.resumed = Counter[str](), Counter[str]()
        """GETs of each path; those of them that started past byte 0."""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection((self.upstream[0], int(self.upstream[1])))
            state = {"cut": False, "sent": 0}
            threading.Thread(target=self._requests, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._responses, args=(server, client, state), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                request = re.match(rb"GET (\S+) HTTP", data)
                if request:
                    path = request.group(1).decode().split("?")[0]
                    first = re.search(rb"(?i)\r\nrange: bytes=0-", data) is not None
                    with self.lock:
                        self.gets[path] += 1
                        self.resumed[path] += not first
                    state.update(cut="/shards/" in path and first, sent=0)
                server.sendall(data)
        self._close(client, server)

    def _responses(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(8192):
                if state["cut"] and state["sent"] + len(data) > self.cut_after:
                    client.sendall(data[: self.cut_after - state["sent"]])
                    with self.lock:
                        self.cuts += 1
                    break
                state["sent"] += len(data)
                client.sendall(data)
        self._close(client, server)

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy(s3: str) -> Iterator[DroppingProxy]:
    proxy = DroppingProxy(s3, cut_after=30_000)  # the test shards are about 50 kB
    try:
        yield proxy
    finally:
        proxy.close()


def upload_tree(local: Path, url: str) -> str:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        object_store.upload_file(path, f"{url}/{path.relative_to(local).as_posix()}")
    return url


@pytest.fixture(scope="module")
def remote_dataset(s3: str, dataset: Path) -> str:
    """The session's prepared dataset, copied to the bucket as it is."""
    return upload_tree(dataset, f"s3://{BUCKET}/tiny")


def shard_shas(dataset: str | Path) -> dict[str, list[str]]:
    return {name: [s.sha256 for s in split.shards] for name, split in read_manifest(dataset).splits.items()}


@pytest.mark.slow
def test_prepare_from_and_to_s3_on_ray_gives_the_local_datasets_bytes(s3: str, corpus_dir: Path, dataset: Path) -> None:
    corpus = upload_tree(corpus_dir, f"s3://{BUCKET}/corpus")
    output = f"s3://{BUCKET}/prepared"
    # The options of the session's local dataset (conftest), with its input and output in the bucket.
    options = PrepareOptions(inputs=[corpus], output=output, seq_len=64, vocab_size=512, shard_size="50",
                             val_fraction=0.1, workers=2)  # fmt: skip
    manifest = prepare(options)
    assert shard_shas(output) == shard_shas(dataset)
    assert manifest.tokenizer_sha256 == read_manifest(dataset).tokenizer_sha256
    assert manifest.stats["input_files"] == len(list(corpus_dir.iterdir()))
    for shard in manifest.splits["train"].shards[:2]:
        assert object_store.read_object(f"{output}/{shard.file}") == (dataset / shard.file).read_bytes()
    with pytest.raises(UsageError, match=f"{output}: the output prefix holds objects .pass --overwrite"):
        prepare(options)


def test_parquet_and_saved_datasets_in_a_bucket_prepare_as_on_local_disk(
    s3: str, corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parquet read by ranged requests (row groups as units of their own) and a directory datasets saved, as
    objects: the shards of the same files on disk, byte for byte, and the same bad rows named by URL."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmscale.data import sources

    rows: list[str | None] = [*corpus_documents(corpus_dir)[:120], None]
    table = pa.table({"text": rows})
    (tmp_path / "local").mkdir()
    pq.write_table(table, tmp_path / "local" / "docs.parquet", row_group_size=30)
    datasets.Dataset(table).save_to_disk(str(tmp_path / "local" / "saved"))
    monkeypatch.setattr(sources, "UNIT_BYTES", 1)  # a unit per row group
    remote = upload_tree(tmp_path / "local", f"s3://{BUCKET}/tables")

    def prepared(source: str, output: str | Path) -> dict:
        options = PrepareOptions(inputs=[source], output=output, seq_len=32, vocab_size=400, shard_size="40",
                                 val_fraction=0.1, in_process=True)  # fmt: skip
        manifest = prepare(options)
        return {"shards": shard_shas(output), "tokenizer": manifest.tokenizer_sha256, "stats": manifest.stats}

    for name in ("docs.parquet", "saved"):
        ours = prepared(f"{remote}/{name}", f"s3://{BUCKET}/from-{name}")
        local = prepared(str(tmp_path / "local" / name), tmp_path / f"from-{name}")
        assert ours["shards"] == local["shards"] and ours["tokenizer"] == local["tokenizer"]
        assert ours["stats"]["input_units"] == local["stats"]["input_units"]
        assert ours["stats"]["bad_line_examples"] == [
            line.replace(str(tmp_path / "local"), remote) for line in local["stats"]["bad_line_examples"]
        ]
    assert ours["stats"]["bad_line_examples"] == [f"{remote}/saved/data-00000-of-00001.arrow:120: no 'text' (null)"]


@pytest.mark.slow
def test_training_from_s3_through_dropped_connections_trains_as_from_local_disk_and_exports(
    remote_dataset: str, dataset: Path, proxy: DroppingProxy, two_rank_reference: Path, tmp_path: Path
) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = train_args(remote_dataset, run_dir, 2, "trainer.max_steps=6", f"data.cache_dir={cache}")  # type: ignore[arg-type]
    result = run_cli(*args, env={"AWS_ENDPOINT_URL": proxy.url})
    assert result.returncode == 0, result.stderr[-4000:]
    assert losses(run_dir) == losses(two_rank_reference)  # the same samples in the same order, to the bit
    # ...although every first transfer of a shard broke off midway, and was resumed from where it broke off.
    assert proxy.cuts > 0 and sum(proxy.resumed.values()) == proxy.cuts
    fetched = {path for path in proxy.gets if "/shards/" in path}
    sha256 = {f"/{BUCKET}/tiny/{s.file}": s.sha256 for split in read_manifest(dataset).splits.values()
              for s in split.shards}  # fmt: skip
    assert sorted(p.name for p in cache.iterdir()) == sorted(sha256[path] + ".tar" for path in fetched)
    # The run keeps the dataset's tokenizer, so that it exports and evaluates without the bucket.
    assert (run_dir / "tokenizer.json").read_bytes() == (dataset / "tokenizer.json").read_bytes()
    export = tmp_path / "export"
    assert run_here("export", str(run_dir), "--output", str(export)).returncode == 0
    remote = run_here("eval", str(export), "--data", remote_dataset)
    local = run_here("eval", str(export), "--data", str(dataset))
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert remote.stdout == local.stdout and "perplexity" in remote.stdout


def test_the_cache_keeps_a_later_epoch_off_the_network_within_its_limit(
    remote_dataset: str, proxy: DroppingProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = read_manifest(remote_dataset)
    shards = split_shards(remote_dataset, manifest, "train")[:5]  # a dataset of its first 5 shards
    sizes = [s.bytes for s in manifest.splits["train"].shards[:5]]

    def two_epochs(cache: ShardCache) -> np.ndarray:
        stream = ShardStream([StreamSource(shards)], manifest.sample_len, manifest.dtype, micro_batch_size=5,
                             rank=0, world_size=1, seed=3, lanes=1, cache=cache,
                             max_micro_batches=2 * sum(s.samples for s in shards) // 5)  # fmt: skip
        return np.concatenate([batch["inputs"]["idx"].numpy() for batch in stream])

    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    object_store._clients.clear()
    try:
        everything = ShardCache(tmp_path / "all", limit_bytes=10**9)
        first = two_epochs(everything)
        # Every shard fetched once (and resumed once where its transfer broke off), though the stream read each
        # twice.
        assert proxy.cuts == len(shards) and sum(proxy.gets.values()) == 2 * len(shards)
        proxy.gets.clear()
        assert np.array_equal(two_epochs(everything), first)  # a restart reads the cache alone
        assert not proxy.gets
        # A damaged entry is fetched again, never taken for a corrupt shard.
        entry = next((tmp_path / "all").iterdir())
        entry.write_bytes(entry.read_bytes()[:-100])
        assert np.array_equal(two_epochs(everything), first)
        assert sum(proxy.gets.values()) >= 1
        small = ShardCache(tmp_path / "small", limit_bytes=sum(sorted(sizes)[:2]))
        assert np.array_equal(two_epochs(small), first)
        assert sum(p.stat().st_size for p in (tmp_path / "small").iterdir()) <= small.limit_bytes
    finally:
        object_store._clients.clear()


def test_a_shard_whose_bytes_fail_the_manifest_is_corrupt_and_a_missing_one_stops_the_run(
    remote_dataset: str, dataset: Path
) -> None:
    manifest = read_manifest(remote_dataset)
    ref = split_shards(remote_dataset, manifest, "train")[0]
    original = object_store.read_object(ref.url)
    try:
        object_store.put_bytes(ref.url, original[:-1024])
        with pytest.raises(CorruptShard, match="sha256 does not match the manifest"):
            read_shard(ref, manifest.sample_len, manifest.np_dtype)
        object_store.client().delete_object(Bucket=BUCKET, Key=object_store.ObjectUrl.parse(ref.url).key)
        with pytest.raises(object_store.ObjectStoreError, match=f"^{re.escape(ref.url)}: no such object$"):
            read_shard(ref, manifest.sample_len, manifest.np_dtype)
    finally:
        object_store.put_bytes(ref.url, original)


@pytest.mark.slow
def test_object_store_failures_end_in_one_line_naming_the_url(s3: str, remote_dataset: str, tmp_path: Path) -> None:
    def failure(*args: str, **env: str) -> str:
        result = run_cli(*args, env=env)
        assert result.returncode != 0
        lines = error_lines(result.stderr)
        assert len(lines) == 1, result.stderr[-3000:]
        return lines[0]

    inspected = run_cli("data", "inspect", remote_dataset, "--samples", "1")
    shards = sum(len(split.shards) for split in read_manifest(remote_dataset).splits.values())
    assert inspected.returncode == 0 and f"checksums: {shards}/{shards} shards ok" in inspected.stdout
    assert f"prepared {remote_dataset}/manifest.json" in inspected.stdout and "\n--- train-" in inspected.stdout
    assert failure("data", "inspect", "s3://no-such-bucket/tiny") == (
        "lmscale: error: s3://no-such-bucket/tiny/manifest.json: the bucket no-such-bucket does not exist"
    )
    assert failure("data", "inspect", f"s3://{BUCKET}/nothing-here") == (
        f"lmscale: error: s3://{BUCKET}/nothing-here/manifest.json: no such object"
    )
    unreachable = failure("data", "inspect", remote_dataset, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    assert unreachable.startswith(f"lmscale: error: {remote_dataset}/manifest.json: cannot reach the endpoint http")
    assert unreachable.endswith("(AWS_ENDPOINT_URL) (after 6 tries at byte 0)")
    assert failure(*train_args(f"s3://{BUCKET}/nothing-here", tmp_path / "run", 1, "trainer.max_steps=6")) == (  # type: ignore[arg-type]
        f"lmscale: error: data.path: s3://{BUCKET}/nothing-here/manifest.json: no such object"
    )
    assert failure("prepare", "--input", f"s3://{BUCKET}/nothing-here", "--output", str(tmp_path / "out")) == (
        f"lmscale: error: s3://{BUCKET}/nothing-here: no such object, and no object below it"
    )
    # A server that checks credentials (moto with its IAM authentication on) refuses unknown keys.
    port = free_port()
    checking = start_server(port, INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        refused = failure("data", "inspect", remote_dataset, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    finally:
        stop_server(checking)
    assert refused.startswith(f"lmscale: error: {remote_dataset}/manifest.json: access refused (InvalidAccessKeyId)")
