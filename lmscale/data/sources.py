"""Find input files and read documents out of them (.txt, .jsonl; plain, gzip or zstd).

Bad lines are never dropped silently: each one is reported with its file and line number and counted,
and with ``strict`` the first one is fatal.
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
from typing import IO, Literal

from lmscale.errors import LmscaleError, UsageError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
COMPRESSED_SUFFIXES = ("", ".gz", ".zst")
TxtMode = Literal["paragraphs", "file"]


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    """The JSONL field that holds a document's text."""
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


def _is_input(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s + c) for s in TEXT_SUFFIXES for c in COMPRESSED_SUFFIXES)


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
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and _is_input(p)))
        elif _is_input(path):
            found.append(path)
        else:
            raise UsageError(f"{path}: unsupported input (expected .txt or .jsonl, optionally .gz or .zst)")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise UsageError(f"{' '.join(inputs)}: no .txt or .jsonl input files found")
    return unique


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


def read_documents(path: Path, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    """Yield the non-empty documents of one input file."""
    name = path.name.lower().removesuffix(".gz").removesuffix(".zst")
    if name.endswith((".jsonl", ".json")):
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
