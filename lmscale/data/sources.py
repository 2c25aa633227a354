"""Find input files and read documents out of them: .txt and .jsonl (plain, gzip or zstd), parquet files, and
Arrow: the directories ``datasets.save_to_disk`` writes, or single ``.arrow`` files; each on local disk or in
object storage (``s3://BUCKET/PREFIX``, read through ``lmscale.data.object_store``: a prefix is a folder).

Parquet and Arrow are read one column at a time in bounded batches (a 2 GB parquet file costs a batch of
rows in memory, not the file), and a parquet file is split into runs of row groups that tokenize as separate
tasks (``InputUnit``). Bad lines and rows are never dropped silently: each one is reported with its place
(``file:line``, ``file:row_group:row`` in parquet, ``file:row`` in Arrow) and counted, and with ``strict``
the first one is fatal.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from lmscale.data import object_store
from lmscale.data.object_store import is_s3
from lmscale.errors import LmscaleError, UsageError, one_line

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
COMPRESSED_SUFFIXES = ("", ".gz", ".zst")
PARQUET, ARROW = ".parquet", ".arrow"
SAVED_DATASET = "state.json"
"""What ``datasets.save_to_disk`` writes beside a dataset's Arrow files: their names, in order."""
DATASET_DICT = "dataset_dict.json"
"""What it writes for a dataset of several splits, each split a saved dataset in its own directory."""
UNIT_BYTES = 64 * 2**20
"""Uncompressed bytes of parquet row groups one tokenize task reads (at least one row group)."""
READ_BATCH_ROWS = 1024
TxtMode = Literal["paragraphs", "file"]
SUPPORTED = ".txt or .jsonl (optionally .gz or .zst), .parquet, .arrow, or a directory saved by datasets"


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    """The JSONL field, or the parquet or Arrow column, that holds a document's text."""
    txt_mode: TxtMode = "paragraphs"
    """paragraphs: documents in a .txt are separated by blank lines; file: one document per file."""
    strict: bool = False


@dataclass
class ReadStats:
    documents: int = 0
    bad_lines: int = 0
    bad_line_examples: list[str] = field(default_factory=list)
    quiet: bool = False
    """Count bad lines without warning (a second pass over lines already reported)."""

    def bad(self, message: str, strict: bool) -> None:
        if strict:
            raise LmscaleError(f"{message} (drop --strict to skip such lines with a warning)")
        self.bad_lines += 1
        if len(self.bad_line_examples) < 20:
            self.bad_line_examples.append(message)
        if not self.quiet:
            log.warning("skipped: %s", message)


InputFile = Path | str
"""A local file, or an object's ``s3://`` URL."""


@dataclass(frozen=True)
class InputUnit:
    """What one tokenize task reads: a whole file, or a run of a parquet file's row groups."""

    path: InputFile
    row_groups: tuple[int, int] | None = None
    """[first, last) row groups of a parquet file; None: all of the file."""


def input_name(path: InputFile) -> str:
    """The file's name, lower case: what its format is told by."""
    return str(path).rsplit("/", 1)[-1].lower()


def _is_input(path: InputFile) -> bool:
    name = input_name(path)
    return name.endswith(PARQUET) or any(name.endswith(s + c) for s in TEXT_SUFFIXES for c in COMPRESSED_SUFFIXES)


def _folder_inputs(folder: str, names: list[str], read_text: Callable[[str], str]) -> list[str]:
    """The inputs of a folder (a directory, or an object-store prefix) given every file below it as names
    relative to it: a saved dataset's Arrow files in the dataset's order, or every text and parquet file and
    the Arrow files of the saved datasets below it (never other .arrow files: datasets' caches sit beside
    them)."""
    for name in names:
        if input_name(name) == DATASET_DICT:
            where = f"{folder}/{name.removesuffix(DATASET_DICT).rstrip('/')}".rstrip("/")
            splits = json.loads(read_text(name)).get("splits", [])
            raise UsageError(
                f"{where}: a dataset of the splits {', '.join(splits)}: give one split's directory "
                f"(e.g. {where}/{splits[0] if splits else 'train'})"
            )
    saved = sorted(name.removesuffix(SAVED_DATASET) for name in names if input_name(name) == SAVED_DATASET)
    if "" in saved:
        return _saved_dataset_files(folder, "", set(names), read_text)
    # A saved dataset's own .json files (state.json, dataset_info.json) are not JSONL documents.
    found = [n for n in names if _is_input(n) and not any(n.startswith(prefix) for prefix in saved)]
    found += [name for prefix in saved for name in _saved_dataset_files(folder, prefix, set(names), read_text)]
    return sorted(found)


def _saved_dataset_files(folder: str, prefix: str, names: set[str], read_text: Callable[[str], str]) -> list[str]:
    """The Arrow files of the dataset ``datasets.save_to_disk`` wrote at ``prefix`` (relative names), in order."""
    state = f"{folder}/{prefix}{SAVED_DATASET}"
    try:
        files = [prefix + entry["filename"] for entry in json.loads(read_text(prefix + SAVED_DATASET))["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{state}: not a dataset saved by datasets ({one_line(err)})") from None
    missing = [name for name in files if name not in names]
    if missing:
        raise UsageError(f"{folder}/{missing[0]}: missing (listed in {state})")
    return files


def _local_folder_inputs(directory: Path) -> list[Path]:
    names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return [directory / name for name in _folder_inputs(str(directory), names, lambda n: (directory / n).read_text())]


def _remote_inputs(item: str) -> list[str]:
    """An ``s3://`` input: an object, a glob pattern over objects, or a prefix read as a folder."""
    if any(ch in item for ch in "*?["):
        matches = object_store.glob_objects(item)
        if not matches:
            raise UsageError(f"{item}: the pattern matches no object")
        return matches
    if object_store.exists(item):
        if not (_is_input(item) or input_name(item).endswith(ARROW)):
            raise UsageError(f"{item}: unsupported input (expected {SUPPORTED})")
        return [item]
    folder = item.rstrip("/")
    objects = object_store.list_objects(folder)
    if not objects:
        raise UsageError(f"{item}: no such object, and no object below it")
    names = [url.removeprefix(folder + "/") for url in objects]
    found = _folder_inputs(folder, names, lambda n: object_store.read_object(f"{folder}/{n}").decode("utf-8"))
    return [f"{folder}/{name}" for name in found]


def expand_inputs(inputs: list[str]) -> list[InputFile]:
    """Files, directories (searched recursively), glob patterns and ``s3://`` URLs of any of those, in a sorted,
    de-duplicated order."""
    found: list[InputFile] = []
    for item in inputs:
        if is_s3(item):
            found.extend(_remote_inputs(item))
            continue
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise UsageError(f"{item}: the pattern matches no file")
            found.extend(p for p in matches if p.is_file())
            continue
        path = Path(item)
        if not path.exists():
            raise UsageError(f"{path}: input path does not exist")
        if path.is_dir():
            found.extend(_local_folder_inputs(path))
        elif _is_input(path) or path.name.lower().endswith(ARROW):
            found.append(path)
        else:
            raise UsageError(f"{path}: unsupported input (expected {SUPPORTED})")
    unique = list(dict.fromkeys(p if isinstance(p, str) else p.resolve() for p in found))
    if not unique:
        raise UsageError(f"{' '.join(inputs)}: no input files found (expected {SUPPORTED})")
    return unique


def _open_raw(path: InputFile) -> IO[bytes]:
    return object_store.open_object(path) if isinstance(path, str) else open(path, "rb")


def _parquet_file(path: InputFile) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(_open_raw(path) if isinstance(path, str) else path)
    except (OSError, pa.ArrowException) as err:
        raise LmscaleError(f"{path}: cannot read as parquet ({one_line(err)})") from None


def input_units(files: list[InputFile]) -> list[InputUnit]:
    """The tokenize tasks' inputs, in stream order: a parquet file as runs of row groups of about UNIT_BYTES
    (so that one large file tokenizes in parallel), any other file whole."""
    units = []
    for path in files:
        if not input_name(path).endswith(PARQUET):
            units.append(InputUnit(path))
            continue
        metadata = _parquet_file(path).metadata
        first, size = 0, 0
        for group in range(metadata.num_row_groups):
            size += metadata.row_group(group).total_byte_size
            if size >= UNIT_BYTES or group == metadata.num_row_groups - 1:
                units.append(InputUnit(path, (first, group + 1)))
                first, size = group + 1, 0
    return units


def _open_binary(path: InputFile) -> IO[bytes]:
    name = input_name(path)
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=_open_raw(path), mode="rb")
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(_open_raw(path), closefd=True)
    return _open_raw(path)


def _lines(path: InputFile) -> Iterator[tuple[int, bytes]]:
    try:
        with _open_binary(path) as raw:
            yield from enumerate(io.BufferedReader(raw), start=1)
    except (OSError, EOFError) as err:
        # gzip/zstd raise these on a truncated or corrupt stream.
        raise LmscaleError(f"{path}: cannot read ({err})") from None
    except Exception as err:
        if err.__class__.__module__.startswith("zstandard"):
            raise LmscaleError(f"{path}: cannot read ({err})") from None
        raise


def _decode(path: InputFile, number: int, line: bytes, stats: ReadStats, strict: bool) -> str | None:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        stats.bad(f"{path}:{number}: not UTF-8 (byte {err.start})", strict)
        return None


def read_documents(
    path: InputFile, options: ReadOptions, stats: ReadStats, row_groups: tuple[int, int] | None = None
) -> Iterator[str]:
    """Yield the non-empty documents of one input file (of its ``row_groups`` where it is parquet)."""
    name = input_name(path).removesuffix(".gz").removesuffix(".zst")
    if name.endswith(PARQUET):
        yield from _parquet_documents(path, options, stats, row_groups)
    elif name.endswith(ARROW):
        yield from _arrow_documents(path, options, stats)
    elif name.endswith((".jsonl", ".json")):
        yield from _jsonl_documents(path, options, stats)
    elif options.txt_mode == "file":
        text = []
        for number, line in _lines(path):
            decoded = _decode(path, number, line, stats, options.strict)
            if decoded is not None:
                text.append(decoded)
        document = "".join(text).strip()
        if document:
            stats.documents += 1
            yield document
    else:
        yield from _paragraph_documents(path, options, stats)


def _paragraph_documents(path: InputFile, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    paragraph: list[str] = []
    for number, line in _lines(path):
        decoded = _decode(path, number, line, stats, options.strict)
        if decoded is None:
            continue
        if decoded.strip():
            paragraph.append(decoded)
        elif paragraph:
            stats.documents += 1
            yield "".join(paragraph).strip()
            paragraph = []
    if paragraph:
        stats.documents += 1
        yield "".join(paragraph).strip()


def _jsonl_documents(path: InputFile, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    for number, line in _lines(path):
        decoded = _decode(path, number, line, stats, options.strict)
        if decoded is None or not decoded.strip():
            continue
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as err:
            stats.bad(f"{path}:{number}: not JSON ({err.msg})", options.strict)
            continue
        text = record.get(options.text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            stats.bad(f"{path}:{number}: no string field {options.text_field!r}", options.strict)
            continue
        if text.strip():
            stats.documents += 1
            yield text


def _text_column(path: InputFile, schema: Any, field: str) -> None:
    """A table without the text column, or with one that is not text, is a wrong ``--text-field`` for all its
    rows: one line naming the file, not a skip per row."""
    import pyarrow as pa

    if field not in schema.names:
        raise UsageError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}; pass --text-field)")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UsageError(f"{path}: column {field!r} holds {kind}, not text (pass --text-field)")


def _table_documents(values: list[Any], place: str, first_row: int, field: str, options: ReadOptions,
                     stats: ReadStats) -> Iterator[str]:  # fmt: skip
    """The documents of a batch of a table's rows, the first of them row ``first_row`` at ``place``."""
    for row, text in enumerate(values, start=first_row):
        if text is None:
            stats.bad(f"{place}{row}: no {field!r} (null)", options.strict)
        elif text.strip():
            stats.documents += 1
            yield text


def _parquet_documents(
    path: InputFile, options: ReadOptions, stats: ReadStats, row_groups: tuple[int, int] | None
) -> Iterator[str]:
    import pyarrow as pa

    parquet, field = _parquet_file(path), options.text_field
    _text_column(path, parquet.schema_arrow, field)
    first, last = row_groups or (0, parquet.metadata.num_row_groups)
    for group in range(first, last):
        done = 0
        try:
            for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[group], columns=[field]):
                yield from _table_documents(batch.column(0).to_pylist(), f"{path}:{group}:", done, field, options,
                                            stats)  # fmt: skip
                done += batch.num_rows
        except (OSError, pa.ArrowException) as err:
            raise LmscaleError(f"{path}: row group {group}: cannot read ({one_line(err)})") from None


def _arrow_documents(path: InputFile, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    """An Arrow IPC file, memory-mapped where it is local: the stream format ``datasets`` writes, or the
    random-access one."""
    import pyarrow as pa

    field, done = options.text_field, 0
    try:
        source = pa.PythonFile(_open_raw(path)) if isinstance(path, str) else pa.memory_map(str(path))
        try:
            reader: Any = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        _text_column(path, reader.schema, field)
        for batch in batches:
            yield from _table_documents(batch.column(field).to_pylist(), f"{path}:", done, field, options, stats)
            done += batch.num_rows
    except (OSError, pa.ArrowException) as err:
        raise LmscaleError(f"{path}: cannot read as Arrow ({one_line(err)})") from None
