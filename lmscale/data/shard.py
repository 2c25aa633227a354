"""``lmscale prepare``: raw text -> tokenizer -> packed sequences -> WebDataset tar shards + manifest, on Ray.

Two rounds of Ray tasks, both idempotent so Ray may retry them when a worker dies:

1. one task per input unit (a file; a run of row groups of a parquet file) tokenizes its documents
   (appending the end-of-text id) into a token file with document boundaries, split assignment and content
   hashes;
2. the driver concatenates the documents in input order (dropping exact duplicates if asked), cuts the
   stream into samples, and one task per shard writes its tar. A causal sample (``--format causal``, GPT) is
   the next ``seq_len + 1`` tokens of the stream. A masked-LM sample (``--format mlm``, BERT) packs documents
   RoBERTa-style: ``[CLS]``, up to ``seq_len - 2`` tokens of the stream (documents separated by their
   ``[SEP]``, a long document continued in the next sample), ``[SEP]``, then ``[PAD]`` to ``seq_len``.

Every task writes to a temporary name and renames, and the layout is decided by the driver from input
order alone, so the shards are byte-identical whatever the number of workers or retries.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmscale.data import object_store
from lmscale.data.manifest import MANIFEST, Manifest, ShardRecord, SplitRecord, token_dtype
from lmscale.data.ray_cluster import check_cluster, start_ray
from lmscale.data.sources import (
    InputFile,
    InputUnit,
    ReadOptions,
    ReadStats,
    expand_inputs,
    input_units,
    read_documents,
)
from lmscale.data.tokenizer import (
    TokenizerKind,
    end_token_id,
    file_sha256,
    load_tokenizer,
    special_token_ids,
    tokenizer_kind,
    train_tokenizer,
)
from lmscale.errors import LmscaleError, UsageError
from lmscale.files import replacing
from lmscale.progress import Progress
from lmscale.tasks import TASKS

log = logging.getLogger(__name__)

WORK_DIR = ".prepare-work"
ENCODE_BATCH_DOCS = 512


@dataclass(frozen=True)
class PrepareOptions:
    inputs: list[str]
    output: Path | str
    """A local directory, or an ``s3://BUCKET/PREFIX`` that the shards are uploaded to as they are written."""
    seq_len: int = 1024
    vocab_size: int = 8192
    tokenizer: str | None = None
    """An existing tokenizer.json; otherwise one is trained on a sample of the input."""
    tokenizer_kind: TokenizerKind = "bpe"
    format: str = "causal"
    """A ``lmscale.tasks`` entry prepared from text: causal (GPT samples of seq_len + 1 stream tokens) or mlm
    (BERT samples [CLS] ... [SEP] [PAD]... of seq_len)."""
    tokenizer_sample_mb: float = 64.0
    shard_size: str = "64MB"
    """Samples per shard ("10000") or an approximate size ("64MB")."""
    val_fraction: float = 0.01
    """Share of documents (chosen by content hash) that go to the validation split."""
    dedup: bool = False
    """Drop exact duplicate documents (by content hash), keeping the first in input order."""
    workers: int | None = None
    ray_address: str | None = None
    in_process: bool = False
    """Run the tasks one after another in this process instead of on Ray: for small corpora and machines
    without Ray (the GPU check). The shards are the same bytes either way."""
    read: ReadOptions = field(default_factory=ReadOptions)
    overwrite: bool = False
    work_dir: Path | None = None
    """Where the tokenized inputs (and, for an ``s3://`` output, each shard until it is uploaded) are kept while
    prepare runs: default inside a local output, or a temporary directory. Every Ray node must see it."""


def document_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def is_validation(doc_hash: int, val_fraction: float) -> bool:
    # A content hash, not a random draw: the same document lands in the same split on every run.
    return (doc_hash % 1_000_000) < val_fraction * 1_000_000


def samples_per_shard(shard_size: str, sample_len: int, itemsize: int) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(MB|MiB|GB|GiB)?\s*", shard_size, flags=re.IGNORECASE)
    if not match:
        raise UsageError(f"--shard-size {shard_size!r}: expected a sample count (10000) or a size (64MB)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if not unit:
        count = int(number)
    else:
        scale = {"mb": 1e6, "mib": 2**20, "gb": 1e9, "gib": 2**30}[unit]
        # Each sample is a tar header block, the .npy header and payload, padded to 512 bytes.
        per_sample = 512 + 512 * -(-(128 + sample_len * itemsize) // 512)
        count = int(number * scale // per_sample)
    if count < 1:
        raise UsageError(f"--shard-size {shard_size!r}: smaller than one sample")
    return count


# ---------------------------------------------------------------- round 1: tokenize one input unit per task


def _warm_up() -> None:
    import tokenizers  # noqa: F401 - the import is the point: a worker's first task should not pay it

    # Held long enough that the warm-up tasks land on distinct workers instead of queueing on one.
    time.sleep(0.5)


def unit_tokens_path(work_dir: Path, index: int) -> Path:
    return work_dir / f"unit-{index:06d}.tokens.npy"


def unit_index_path(work_dir: Path, index: int) -> Path:
    return work_dir / f"unit-{index:06d}.npz"


def tokenize_unit(
    index: int, unit: InputUnit, tokenizer_json: str, read: ReadOptions, work_dir: str, val_fraction: float, dtype: str
) -> dict[str, Any]:
    """Tokenize one input unit into ``unit-<index>.tokens.npy`` (the token stream, end-of-text after each
    document) and ``unit-<index>.npz`` (document ends, hashes, split); returns its read statistics.

    Tokens are held as numpy arrays of the dataset's dtype (2 or 4 bytes a token, not a Python int's 28+),
    and the shard writers memory-map the token file, so a large input file costs its size, not ten times it.
    """

    tok = Tokenizer.from_str(tokenizer_json)
    eot = end_token_id(tok)
    stats = ReadStats()
    chunks: list[np.ndarray] = []
    ends: list[int] = []
    hashes: list[int] = []
    batch: list[str] = []
    total = 0

    def flush() -> None:
        nonlocal total
        ids: list[int] = []  # one batch as Python ints, then one numpy array
        # encode_batch_fast skips the character offsets, which packing never uses.
        for text, enc in zip(batch, tok.encode_batch_fast(batch, add_special_tokens=False), strict=True):
            ids.extend(enc.ids)
            ids.append(eot)
            ends.append(total + len(ids))
            hashes.append(document_hash(text))
        chunks.append(np.asarray(ids, dtype=dtype))
        total += len(ids)
        batch.clear()

    for document in read_documents(unit.path, read, stats, unit.row_groups):
        batch.append(document)
        if len(batch) >= ENCODE_BATCH_DOCS:
            flush()
    flush()
    hash_array = np.asarray(hashes, dtype=np.uint64)
    validation = np.asarray([is_validation(h, val_fraction) for h in hashes], dtype=bool)
    # Tokens first, index last: a retried task rewrites both, each by rename, and the index names the tokens.
    with replacing(unit_tokens_path(Path(work_dir), index), unique=True) as tmp, open(tmp, "wb") as f:
        np.save(f, np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype), allow_pickle=False)
    chunks.clear()
    with replacing(unit_index_path(Path(work_dir), index), suffix=".npz", unique=True) as tmp:
        np.savez(tmp, ends=np.asarray(ends, dtype=np.int64), hashes=hash_array, validation=validation)
    return {"documents": stats.documents, "bad_lines": stats.bad_lines, "bad_line_examples": stats.bad_line_examples}


# ---------------------------------------------------------------- round 2: write one shard per task


@dataclass(frozen=True)
class DocTable:
    """The documents of one split in stream order: which unit holds them and where."""

    unit: np.ndarray  # (n_docs,) unit index
    start: np.ndarray  # (n_docs,) first token in the unit's token array
    end: np.ndarray  # (n_docs,) one past the last token
    offset: np.ndarray  # (n_docs + 1,) cumulative tokens in the split stream before each document

    @property
    def tokens(self) -> int:
        return int(self.offset[-1])


def _stream_tokens(table: DocTable, work_dir: Path, first: int, last: int, dtype: str) -> np.ndarray:
    """Tokens [first, last) of a split's document stream."""
    out = np.empty(last - first, dtype=dtype)
    doc = int(np.searchsorted(table.offset, first, side="right")) - 1
    units: dict[int, np.ndarray] = {}
    pos = first
    while pos < last:
        unit = int(table.unit[doc])
        if unit not in units:
            units[unit] = np.load(unit_tokens_path(work_dir, unit), mmap_mode="r")
        skip = pos - int(table.offset[doc])
        take = min(int(table.end[doc] - table.start[doc]) - skip, last - pos)
        begin = int(table.start[doc]) + skip
        out[pos - first : pos - first + take] = units[unit][begin : begin + take]
        pos += take
        doc += 1
    return out


def causal_pieces(table: DocTable, sample_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream spans [start, end) of causal samples: back to back, the tail that fills no sample dropped."""
    starts = np.arange(table.tokens // sample_len, dtype=np.int64) * sample_len
    return starts, starts + sample_len


def mlm_pieces(table: DocTable, content_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream spans [start, end) of masked-LM samples, each up to ``content_len`` tokens: a document's closing
    [SEP] stays inside a span where another document follows, and is dropped where the span ends on it (the
    sample's own closing [SEP] stands for it), so no sample holds two [SEP] in a row."""
    separators = set((table.offset[1:] - 1).tolist())  # stream position of every document's closing [SEP]
    starts, ends = [], []
    start, total = 0, table.tokens
    while start < total:
        if start in separators:  # the [SEP] the previous span ended before
            start += 1
            continue
        end = min(start + content_len, total)
        starts.append(start)
        ends.append(end - 1 if end - 1 in separators else end)
        start = end
    return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def pack_samples(
    stream: np.ndarray, starts: np.ndarray, ends: np.ndarray, sample_len: int, wrap: tuple[int, int, int] | None
) -> np.ndarray:
    """The samples of the spans [start, end) of ``stream``: as they are (causal), or each between ``[CLS]`` and
    ``[SEP]`` and padded with ``[PAD]`` when ``wrap`` gives those ids (masked LM)."""
    samples = np.empty((len(starts), sample_len), dtype=stream.dtype)
    for i, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        piece = stream[start:end]
        if wrap is None:
            samples[i] = piece
        else:
            cls, sep, pad = wrap
            samples[i] = pad
            samples[i, 0], samples[i, 1 : 1 + len(piece)], samples[i, 1 + len(piece)] = cls, piece, sep
    return samples


def write_shard(
    table: DocTable,
    work_dir: str,
    output: str,
    relpath: str,
    starts: np.ndarray,
    ends: np.ndarray,
    sample_len: int,
    dtype: str,
    wrap: tuple[int, int, int] | None,
    upload_to: str | None = None,
) -> ShardRecord:
    """Write the samples of the stream spans ``starts``/``ends`` as one tar; ``wrap`` (the [CLS], [SEP] and
    [PAD] ids) turns each span into a masked-LM sample, else a span is a causal sample as it is. With
    ``upload_to`` (an ``s3://`` dataset) the tar is uploaded there and its local copy removed."""
    first = int(starts[0])
    span = _stream_tokens(table, Path(work_dir), first, int(ends[-1]), dtype)
    samples = pack_samples(span, starts - first, ends - first, sample_len, wrap)
    real_tokens = int((ends - starts).sum()) + (2 * len(starts) if wrap else 0)
    record = write_sample_tar(samples, Path(output), relpath, real_tokens)
    if upload_to is not None:
        object_store.upload_file(Path(output) / relpath, f"{upload_to}/{relpath}")
        (Path(output) / relpath).unlink()
    return record


def write_sample_tar(samples: np.ndarray, output: Path, relpath: str, tokens: int) -> ShardRecord:
    """One shard: sample ``i`` of ``samples`` as ``<stem>-<i>.tokens.npy``, written to a temporary name and
    renamed, so a shard either exists whole or not at all."""
    import webdataset as wds

    target = output / relpath
    stem = target.name.removesuffix(".tar")
    # A fixed mtime and owner make the archive a pure function of its samples; an integer mtime keeps the
    # headers plain ustar (a float one adds a pax header to every member, doubling the reader's parsing).
    with (
        replacing(target, unique=True) as tmp,
        open(tmp, "wb") as f,
        wds.TarWriter(f, user="lmscale", group="lmscale", mtime=0, encoder=False) as writer,
    ):
        for i, sample in enumerate(samples):
            buf = io.BytesIO()
            np.save(buf, sample, allow_pickle=False)
            writer.write({"__key__": f"{stem}-{i:06d}", "tokens.npy": buf.getvalue()})
    return ShardRecord(
        file=relpath, samples=len(samples), tokens=tokens, sha256=file_sha256(target), bytes=target.stat().st_size
    )


# ---------------------------------------------------------------- the driver


def _tokenizer_sample(files: list[InputFile], options: PrepareOptions) -> list[str]:
    """Documents taken round-robin over the files until ``tokenizer_sample_mb`` of text."""
    budget = int(options.tokenizer_sample_mb * 1e6)
    quiet = ReadOptions(options.read.text_field, options.read.txt_mode, strict=False)
    readers = [read_documents(p, quiet, ReadStats(quiet=True)) for p in files]
    sample: list[str] = []
    while readers and budget > 0:
        for reader in list(readers):
            document = next(reader, None)
            if document is None:
                readers.remove(reader)
                continue
            sample.append(document)
            budget -= len(document.encode("utf-8"))
    return sample


def _build_tables(work_dir: Path, n_units: int, dedup: bool) -> tuple[dict[str, DocTable], int, int]:
    """Stream order per split (input order), after removing duplicates; returns tables, duplicates, docs."""
    seen: set[int] = set()
    columns: dict[str, list[list[np.ndarray]]] = {"train": [[], [], []], "validation": [[], [], []]}
    duplicates = documents = 0
    for unit in range(n_units):
        with np.load(unit_index_path(work_dir, unit)) as z:
            ends, hashes, validation = z["ends"], z["hashes"], z["validation"]
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        keep = np.ones(len(ends), dtype=bool)
        documents += len(ends)
        if dedup:
            for i, h in enumerate(hashes.tolist()):
                if h in seen:
                    keep[i] = False
                else:
                    seen.add(h)
            duplicates += int((~keep).sum())
        for name, mask in (("train", keep & ~validation), ("validation", keep & validation)):
            columns[name][0].append(np.full(int(mask.sum()), unit, dtype=np.int64))
            columns[name][1].append(starts[mask])
            columns[name][2].append(ends[mask])
    tables = {}
    for name, (unit_cols, start_cols, end_cols) in columns.items():
        start, end = np.concatenate(start_cols), np.concatenate(end_cols)
        offset = np.concatenate([[0], np.cumsum(end - start)]).astype(np.int64)
        tables[name] = DocTable(np.concatenate(unit_cols), start, end, offset)
    return tables, duplicates, documents


def _task(ray: Any, fn: Any, **options: Any) -> Any:
    """``fn`` as a Ray remote function, or itself when the tasks run in this process (``ray`` is None)."""
    return fn if ray is None else ray.remote(**options)(fn)


def _run_tasks(ray: Any, calls: list[tuple[Any, tuple]], limit: int, progress: Progress) -> list[Any]:
    """Run remote calls with at most ``limit`` in flight (or in turn in this process); results in call order."""
    if ray is None:
        results = []
        for fn, args in calls:
            results.append(fn(*args))
            progress.advance()
        return results
    results: list[Any] = [None] * len(calls)
    pending: dict[Any, int] = {}
    next_call = 0
    while next_call < len(calls) or pending:
        while next_call < len(calls) and len(pending) < limit:
            fn, args = calls[next_call]
            pending[fn.remote(*args)] = next_call
            next_call += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            try:
                results[pending.pop(ref)] = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                # A bad input line (with --strict) is the user's error: report it as one line, not Ray's traceback.
                if isinstance(err.cause, LmscaleError):
                    raise err.cause from None
                raise
            progress.advance()
    return results


def _start_ray(options: PrepareOptions, workers: int) -> Any:
    # One tokenizer thread per task: Ray provides the parallelism, and oversubscribed cores would hide it.
    env: dict[str, Any] = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}}
    if options.ray_address:
        import lmscale

        # The cluster's workers may not have lmscale installed: ship this copy with the job.
        env["py_modules"] = [str(Path(lmscale.__file__).parent)]
    return start_ray(options.ray_address, workers, env)


def _check_output(options: PrepareOptions) -> None:
    """The options against the format, then the output: refused if it holds anything, unless overwritten."""
    task = TASKS[options.format]
    least = 3 if task.wraps_documents else 2  # a wrapped sample holds [CLS], a token and [SEP]
    if options.seq_len < least:
        raise UsageError(f"--seq-len {options.seq_len}: must be at least {least} for --format {options.format}")
    try:
        task.sample_len(options.seq_len, None)
    except ValueError as err:
        raise UsageError(f"--seq-len {options.seq_len}: {err} (--format {options.format})") from None
    kind = task.tokenizer_kind
    if kind is not None and not options.tokenizer and options.tokenizer_kind != kind:
        raise UsageError(f"--format {options.format}: needs a {kind} tokenizer (add --tokenizer-kind {kind})")
    if not 0.0 <= options.val_fraction < 1.0:
        raise UsageError(f"--val-fraction {options.val_fraction}: must be in [0, 1)")
    out = options.output
    if isinstance(out, str):
        if object_store.list_objects(out):
            if not options.overwrite:
                raise UsageError(f"{out}: the output prefix holds objects (pass --overwrite to replace them)")
            object_store.delete_prefix(out)
    elif out.exists() and not out.is_dir():
        raise UsageError(f"{out}: output exists and is not a directory")
    elif out.is_dir() and any(out.iterdir()):
        if not options.overwrite:
            raise UsageError(f"{out}: output directory is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)


@dataclass(frozen=True)
class Packing:
    """How the samples of one dataset are cut: from the tokenizer and the task's format."""

    dtype: str
    sample_len: int
    wrap: tuple[int, int, int] | None
    """[CLS], [SEP] and [PAD] ids where the task wraps documents; None for a causal stream."""
    per_shard: int


def _tokenizer(files: list[InputFile], options: PrepareOptions) -> Tokenizer:
    """The given tokenizer, or one trained on a sample of the corpus; checked against what the format needs."""
    if options.tokenizer:
        tok = load_tokenizer(options.tokenizer)
    else:
        log.info(
            "training a %s tokenizer (vocab %d) on a sample of %s", options.tokenizer_kind, options.vocab_size,
            options.output,
        )  # fmt: skip
        sample = _tokenizer_sample(files, options)
        if not sample:
            raise LmscaleError(f"{' '.join(options.inputs)}: the corpus holds no documents")
        tok = train_tokenizer(sample, options.vocab_size, options.tokenizer_kind)
    task = TASKS[options.format]
    missing = [token for token in task.required_tokens(options.seq_len) if tok.token_to_id(token) is None]
    if missing:
        shown = " ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise UsageError(
            f"{options.tokenizer}: --format {options.format} needs the special tokens {shown} "
            f"(a {task.tokenizer_kind} tokenizer)"
        )
    return tok


def _packing(tok: Tokenizer, options: PrepareOptions) -> Packing:
    task, special_ids = TASKS[options.format], special_token_ids(tok)
    dtype = token_dtype(tok.get_vocab_size())
    sample_len = task.sample_len(options.seq_len, None)
    wrap = (special_ids["[CLS]"], special_ids["[SEP]"], special_ids["[PAD]"]) if task.wraps_documents else None
    return Packing(dtype, sample_len, wrap, samples_per_shard(options.shard_size, sample_len, np.dtype(dtype).itemsize))


def _start_workers(ray: Any, options: PrepareOptions, workers: int) -> float:
    """Start every worker (process, imports) before the clock: start-up is per job, not per token. Returns
    the seconds it took."""
    started = time.perf_counter()
    if ray is not None and not options.ray_address:
        warm = ray.remote(num_cpus=1)(_warm_up)
        ray.get([warm.remote() for _ in range(workers)])
    return time.perf_counter() - started


def _tokenize_units(
    ray: Any, units: list[InputUnit], tok: Tokenizer, options: PrepareOptions, work_dir: str, packing: Packing,
    workers: int,
) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
    """Every input unit tokenized into the work directory by one task each; their read statistics and the
    seconds."""
    tokenize = _task(ray, tokenize_unit, num_cpus=1, max_retries=5, retry_exceptions=False)
    tok_json = tok.to_str()
    calls = [
        (tokenize, (i, unit, tok_json, options.read, work_dir, options.val_fraction, packing.dtype))
        for i, unit in enumerate(units)
    ]
    started = time.perf_counter()
    with Progress("tokenize", total=len(calls), unit="inputs") as progress:
        unit_stats = _run_tasks(ray, calls, workers, progress)
    return unit_stats, time.perf_counter() - started


def _write_shards(
    ray: Any, tables: dict[str, DocTable], options: PrepareOptions, staging: Path, packing: Packing, workers: int
) -> tuple[dict[str, SplitRecord], dict[str, int], float]:
    """Every split cut into samples and written as shards by one task each; the splits, the tokens each
    dropped from its stream's tail, and the seconds."""
    writer = _task(ray, write_shard, num_cpus=1, max_retries=5)
    out, work_dir = staging, staging / WORK_DIR
    upload_to = options.output.rstrip("/") if isinstance(options.output, str) else None
    dropped: dict[str, int] = {}
    calls = []
    for name, table in tables.items():
        if packing.wrap is None:
            starts, ends = causal_pieces(table, packing.sample_len)
        else:
            starts, ends = mlm_pieces(table, packing.sample_len - 2)
        dropped[name] = table.tokens - int((ends - starts).sum()) if packing.wrap is None else 0
        table_ref = table if ray is None else ray.put(table)
        for k, first in enumerate(range(0, len(starts), packing.per_shard)):
            relpath = f"shards/{name}-{k:06d}.tar"
            span = slice(first, first + packing.per_shard)
            calls.append((writer, (table_ref, str(work_dir), str(out), relpath, starts[span], ends[span],
                                   packing.sample_len, packing.dtype, packing.wrap, upload_to)))  # fmt: skip
    started = time.perf_counter()
    with Progress("write shards", total=len(calls), unit="shards") as progress:
        records = _run_tasks(ray, calls, workers, progress)
    splits = {name: SplitRecord([r for r in records if Path(r.file).name.startswith(name + "-")]) for name in tables}
    return splits, dropped, time.perf_counter() - started


def prepare(options: PrepareOptions) -> Manifest:
    """Raw text -> tokenizer -> tokenized files (Ray tasks) -> document tables -> shards (Ray tasks) -> the
    manifest, written last: a manifest means a complete dataset."""
    started = time.perf_counter()
    files = expand_inputs(options.inputs)
    units = input_units(files)
    _check_output(options)
    if options.ray_address and not options.in_process:
        check_cluster(options.ray_address)  # before the tokenizer is trained: a wrong address fails at once
    staging = _staging_dir(options)
    try:
        manifest = _build(options, files, units, staging, started)
    except BaseException:
        if staging != options.output and options.work_dir is None:
            shutil.rmtree(staging, ignore_errors=True)  # a temporary directory of this run's
        raise
    _publish(options, staging, manifest)
    return manifest


def _build(
    options: PrepareOptions, files: list[InputFile], units: list[InputUnit], staging: Path, started: float
) -> Manifest:
    """The dataset in ``staging`` (its shards uploaded already where the output is remote), but for the
    manifest, which is returned."""
    work_dir = staging / WORK_DIR
    work_dir.mkdir(parents=True, exist_ok=True)
    (staging / "shards").mkdir(exist_ok=True)
    tok = _tokenizer(files, options)
    tok.save(str(staging / "tokenizer.json"))
    packing = _packing(tok, options)
    workers = 1 if options.in_process else options.workers or os.cpu_count() or 1
    ray = None if options.in_process else _start_ray(options, workers)
    try:
        timings = {"worker_startup_seconds": _start_workers(ray, options, workers)}
        unit_stats, timings["tokenize_seconds"] = _tokenize_units(
            ray, units, tok, options, str(work_dir), packing, workers
        )
        tables, duplicates, documents = _build_tables(work_dir, len(units), options.dedup)
        if documents == 0:
            raise LmscaleError(f"{' '.join(options.inputs)}: the corpus holds no documents")
        splits, dropped, timings["write_seconds"] = _write_shards(ray, tables, options, staging, packing, workers)
    finally:
        if ray is not None:
            ray.shutdown()
    if splits["train"].samples == 0:
        raise LmscaleError(
            f"{' '.join(options.inputs)}: {tables['train'].tokens} training tokens do not fill one sample of "
            f"{packing.sample_len} tokens (use a smaller --seq-len or more text)"
        )
    seconds = time.perf_counter() - started
    total_tokens = tables["train"].tokens + tables["validation"].tokens
    stats = {
        "input_files": len(files),
        "input_units": len(units),
        "documents": documents,
        "duplicates_removed": duplicates,
        "bad_lines": sum(s["bad_lines"] for s in unit_stats),
        "bad_line_examples": [e for s in unit_stats for e in s["bad_line_examples"]][:20],
        "tokens": total_tokens,
        "dropped_tail_tokens": dropped,
        "seconds": round(seconds, 3),
        **{name: round(value, 3) for name, value in timings.items()},
        "tokens_per_s": round(total_tokens / seconds, 1) if seconds else None,
        "workers": workers,
    }
    manifest = _manifest(options, tok, staging / "tokenizer.json", packing, splits, stats)
    shutil.rmtree(work_dir)
    for partial in (staging / "shards").glob(".*.tmp*"):
        partial.unlink()  # left by a shard writer whose worker died; its retry wrote the shard itself
    return manifest


def _staging_dir(options: PrepareOptions) -> Path:
    """The local directory prepare writes into: the output itself, or for an ``s3://`` output the work
    directory (a temporary one by default)."""
    if isinstance(options.output, Path):
        return options.output
    if options.work_dir is not None:
        return options.work_dir
    return Path(tempfile.mkdtemp(prefix="lmscale-prepare-"))


def _publish(options: PrepareOptions, staging: Path, manifest: Manifest) -> None:
    """The manifest last: a manifest means a complete dataset. An ``s3://`` output gets the tokenizer (the
    shards are there already) and then the manifest, and the staging directory is removed."""
    if isinstance(options.output, Path):
        manifest.write(options.output)
        return
    out = options.output.rstrip("/")
    object_store.upload_file(staging / "tokenizer.json", f"{out}/tokenizer.json")
    object_store.put_bytes(f"{out}/{MANIFEST}", manifest.to_json().encode("utf-8"))
    shutil.rmtree(staging)


def _manifest(
    options: PrepareOptions, tok: Tokenizer, tokenizer_file: Path, packing: Packing, splits: dict[str, SplitRecord],
    stats: dict[str, Any],
) -> Manifest:  # fmt: skip
    run_only = ("output", "overwrite", "workers", "ray_address", "in_process", "work_dir")  # how it ran, not what
    settings = {k: v for k, v in asdict(options).items() if k not in run_only}
    return Manifest(
        seq_len=options.seq_len,
        dtype=packing.dtype,
        vocab_size=tok.get_vocab_size(),
        eot_id=end_token_id(tok),
        tokenizer_file="tokenizer.json",
        tokenizer_sha256=file_sha256(tokenizer_file),
        tokenizer_kind=tokenizer_kind(tok),
        splits=splits,
        stats=stats,
        settings=json.loads(json.dumps(settings, default=str)),
        format=options.format,
        special_tokens=special_token_ids(tok),
    )


def summary(manifest: Manifest, output: str | Path) -> str:
    s = manifest.stats
    lines = [f"prepared {output}/{MANIFEST}"]
    for name, split in manifest.splits.items():
        lines.append(
            f"  {name:<10} {len(split.shards):>5} shards {split.samples:>10,} samples {split.tokens:>13,} tokens"
        )
    lines.append(
        f"  documents {s['documents']:,}  duplicates removed {s['duplicates_removed']:,}  bad lines skipped "
        f"{s['bad_lines']:,}  tail tokens dropped {sum(s['dropped_tail_tokens'].values()):,}"
    )
    lines.append(
        f"  {manifest.format} samples, vocab {manifest.vocab_size:,} ({manifest.tokenizer_kind}), "
        f"seq_len {manifest.seq_len}, dtype {manifest.dtype}"
    )
    lines.append(
        f"  {s['tokens']:,} tokens in {s['seconds']:.1f} s ({s['tokens_per_s']:,.0f} tokens/s, {s['workers']} workers)"
    )
    return "\n".join(lines)
