"""Find input files and read documents out of them: .txt and .jsonl (plain, gzip or zstd), parquet files, and
Arrow: the directories ``datasets.save_to_disk`` writes, or single ``.arrow`` files.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

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


@dataclass(frozen=True)
class InputUnit:
    """What one tokenize task reads: a whole file, or a run of a parquet file's row groups."""

    path: Path
    row_groups: tuple[int, int] | None = None
    """[first, last) row groups of a parquet file; None: all of the file."""


def _is_input(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(PARQUET) or any(name.endswith(s + c) for s in TEXT_SUFFIXES for c in COMPRESSED_SUFFIXES)


def saved_dataset_files(directory: Path) -> list[Path]:
    """The Arrow files of a directory ``datasets.save_to_disk`` wrote, in the dataset's order."""
    state = directory / SAVED_DATASET
    try:
        names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{state}: not a dataset saved by datasets ({one_line(err)})") from None
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise UsageError(f"{directory / missing[0]}: missing (listed in {state})")
    return [directory / name for name in names]


def _directory_inputs(directory: Path) -> list[Path]:
    """A directory's inputs: a saved dataset's Arrow files, or every text and parquet file below it and the
    Arrow files of the saved datasets below it (never other .arrow files: datasets' caches sit beside them)."""
    for dict_file in [directory / DATASET_DICT, *directory.rglob(DATASET_DICT)]:
        if dict_file.is_file():
            splits = json.loads(dict_file.read_text()).get("splits", [])
            raise UsageError(
                f"{dict_file.parent}: a dataset of the splits {', '.join(splits)}: give one split's directory "
                f"(e.g. {dict_file.parent / (splits[0] if splits else 'train')})"
            )
    if (directory / SAVED_DATASET).is_file():
        return saved_dataset_files(directory)
    saved = {state.parent for state in directory.rglob(SAVED_DATASET)}
    # A saved dataset's own .json files (state.json, dataset_info.json) are not JSONL documents.
    found = [p for p in directory.rglob("*") if p.is_file() and _is_input(p) and not saved & set(p.parents)]
    found += [p for folder in saved for p in saved_dataset_files(folder)]
    return sorted(found)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (searched recursively) and glob patterns, in a sorted, de-duplicated order."""
    found: list[Path] = []
    for item in inputs:
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
            found.extend(_directory_inputs(path))
        elif _is_input(path) or path.name.lower().endswith(ARROW):
            found.append(path)
        else:
            raise UsageError(f"{path}: unsupported input (expected {SUPPORTED})")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise UsageError(f"{' '.join(inputs)}: no input files found (expected {SUPPORTED})")
    return unique


def _parquet_file(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise LmscaleError(f"{path}: cannot read as parquet ({one_line(err)})") from None


def input_units(files: list[Path]) -> list[InputUnit]:
    """The tokenize tasks' inputs, in stream order: a parquet file as runs of row groups of about UNIT_BYTES
    (so that one large file tokenizes in parallel), any other file whole."""
    units = []
    for path in files:
        if not path.name.lower().endswith(PARQUET):
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


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
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


def _decode(path: Path, number: int, line: bytes, stats: ReadStats, strict: bool) -> str | None:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        stats.bad(f"{path}:{number}: not UTF-8 (byte {err.start})", strict)
        return None


def read_documents(
    path: Path, options: ReadOptions, stats: ReadStats, row_groups: tuple[int, int] | None = None
) -> Iterator[str]:
    """Yield the non-empty documents of one input file (of its ``row_groups`` where it is parquet)."""
    name = path.name.lower().removesuffix(".gz").removesuffix(".zst")
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


def _paragraph_documents(path: Path, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
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


def _jsonl_documents(path: Path, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
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


def _text_column(path: Path, schema: Any, field: str) -> None:
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
    path: Path, options: ReadOptions, stats: ReadStats, row_groups: tuple[int, int] | None
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


def _arrow_documents(path: Path, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    """An Arrow IPC file, memory-mapped: the stream format ``datasets`` writes, or the random-access one."""
    import pyarrow as pa

    field, done = options.text_field, 0
    try:
        source = pa.memory_map(str(path))
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
