import gzip
import json
from pathlib import Path

import pytest
import zstandard

from lmscale.data.sources import ReadOptions, ReadStats, expand_inputs, read_documents
from lmscale.errors import LmscaleError, UsageError


def docs(path: Path, **kw: object) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    return list(read_documents(path, ReadOptions(**kw), stats)), stats  # type: ignore[arg-type]


def test_txt_paragraphs_and_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("first doc\nline two\n\n\nsecond doc\n")
    assert docs(path)[0] == ["first doc\nline two", "second doc"]
    assert docs(path, txt_mode="file")[0] == ["first doc\nline two\n\n\nsecond doc"]


def test_jsonl_gzip_zstd_and_text_field(tmp_path: Path) -> None:
    lines = "".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(3)).encode()
    gz, zst = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.zst"
    gz.write_bytes(gzip.compress(lines))
    zst.write_bytes(zstandard.ZstdCompressor().compress(lines))
    for path in (gz, zst):
        assert docs(path, text_field="body")[0] == ["doc 0", "doc 1", "doc 2"]


def test_bad_lines_are_counted_with_file_and_line_or_fatal_when_strict(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\nnot json\n{"title": "x"}\n{"text": "caf\xe9"}\n{"text": "fine"}\n')
    found, stats = docs(path)
    assert found == ["ok", "fine"]
    assert stats.bad_lines == 3
    assert stats.bad_line_examples[0] == f"{path}:2: not JSON (Expecting value)"
    assert stats.bad_line_examples[1] == f"{path}:3: no string field 'text'"
    assert stats.bad_line_examples[2].startswith(f"{path}:4: not UTF-8")
    with pytest.raises(LmscaleError, match=r"bad.jsonl:2: not JSON"):
        docs(path, strict=True)


def test_expand_inputs(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for name in ("d/b.txt", "d/a.jsonl.gz", "d/skip.csv", "c.txt"):
        (tmp_path / name).write_text("x")
    found = expand_inputs([str(tmp_path / "d"), str(tmp_path / "*.txt")])
    assert [p.name for p in found] == ["a.jsonl.gz", "b.txt", "c.txt"]
    with pytest.raises(UsageError, match="nope: input path does not exist"):
        expand_inputs([str(tmp_path / "nope")])
    with pytest.raises(UsageError, match="skip.csv: unsupported input"):
        expand_inputs([str(tmp_path / "d" / "skip.csv")])
