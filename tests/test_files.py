"""Whole-or-nothing writes (lmscale.files) and the one-line formatter of errors (lmscale.errors)."""

import errno
from pathlib import Path

import pytest

from lmscale.errors import LmscaleError, one_line
from lmscale.files import replacing, write_text


def test_a_replaced_file_or_directory_appears_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_text(target, "old")
    write_text(target, "new", durable=True)
    assert target.read_text() == "new"
    tree = tmp_path / "tree"
    for content in ("first", "second"):
        with replacing(tree) as tmp:
            tmp.mkdir()
            (tmp / "file").write_text(content)
            assert not (tree / "file").is_file() or (tree / "file").read_text() == "first"
    assert (tree / "file").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "tree"]


def test_a_failed_write_keeps_the_old_contents_and_removes_its_temporary(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_what_a_killed_writer_left_is_removed_by_the_next(tmp_path: Path) -> None:
    target = tmp_path / "universal"
    (tmp_path / ".universal.tmp").mkdir()  # a conversion killed half way
    (tmp_path / ".universal.tmp" / "stale").write_text("x")
    with replacing(target) as tmp:
        tmp.mkdir()
        (tmp / "fresh").write_text("y")
    assert [p.name for p in target.iterdir()] == ["fresh"]
    with replacing(tmp_path / "a.npz", suffix=".npz", unique=True) as tmp:
        assert tmp.name.endswith(".npz") and tmp.name != ".a.npz.tmp.npz"  # one of this process's
        tmp.write_bytes(b"npz")
    assert (tmp_path / "a.npz").read_bytes() == b"npz"


def test_one_line_says_what_went_wrong() -> None:
    assert one_line(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device (errno 28)"
    worker = LmscaleError("Caught LmscaleError in DataLoader worker process 0.\nOriginal Traceback:\n  ...\n"
                          "lmscale.errors.LmscaleError: shard-000001.tar: truncated")  # fmt: skip
    assert one_line(worker) == "shard-000001.tar: truncated"
    assert one_line(RuntimeError("first\n  second")) == "first second"
    assert one_line(KeyError()) == "KeyError"
    assert one_line("progress...\nsbatch: error: invalid partition\n\n") == "sbatch: error: invalid partition"
    assert one_line("") == "no output"
    assert one_line(ValueError("x" * 500), limit=300) == "x" * 297 + "..."


def test_a_manifest_of_a_format_no_task_reads_is_named_in_one_line(tmp_path: Path) -> None:
    """Formats are the task registry's names: anything else is refused when the manifest is read, not later
    as a KeyError in the middle of a rank's start-up."""
    import json

    from lmscale.data.manifest import FORMAT_VERSION, read_manifest

    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "format": "speech",
                                                       "splits": {}}))  # fmt: skip
    with pytest.raises(
        LmscaleError,
        match=r"manifest\.json: format 'speech' is none of causal, mlm, span_corruption, classification, seq2seq$",
    ):
        read_manifest(tmp_path)
