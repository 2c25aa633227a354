"""``lmscale prepare`` with real Ray workers writing real tar shards."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from lmscale.data.manifest import MANIFEST, read_manifest
from lmscale.data.shard import PrepareOptions, document_hash, is_validation, prepare
from lmscale.data.sources import ReadOptions, ReadStats, expand_inputs, read_documents
from lmscale.data.stream import read_shard, split_shards
from lmscale.data.tokenizer import file_sha256
from lmscale.errors import LmscaleError, UsageError

from .conftest import run_cli

pytestmark = pytest.mark.slow


def split_tokens(dataset: Path, split: str) -> np.ndarray:
    manifest = read_manifest(dataset)
    rows = [
        read_shard(s, manifest.sample_len, manifest.np_dtype)[0] for s in split_shards(str(dataset), manifest, split)
    ]
    return np.concatenate(rows).reshape(-1)


def test_packing_keeps_every_token_exactly_once(dataset: Path, corpus_dir: Path) -> None:
    manifest = read_manifest(dataset)
    tok = Tokenizer.from_file(str(dataset / "tokenizer.json"))
    expected: dict[str, list[int]] = {"train": [], "validation": []}
    for path in expand_inputs([str(corpus_dir)]):
        for text in read_documents(path, ReadOptions(), ReadStats()):
            split = "validation" if is_validation(document_hash(text), 0.1) else "train"
            expected[split].extend(tok.encode(text).ids + [manifest.eot_id])
    for split, tokens in expected.items():
        packed = split_tokens(dataset, split)
        dropped = manifest.stats["dropped_tail_tokens"][split]
        assert len(packed) + dropped == len(tokens)
        assert dropped < manifest.sample_len
        np.testing.assert_array_equal(packed, np.asarray(tokens[: len(packed)]))
    assert manifest.splits["validation"].samples > 0


def test_manifest_records_shards_and_checksums(dataset: Path) -> None:
    data = json.loads((dataset / MANIFEST).read_text())
    assert data["seq_len"] == 64 and data["vocab_size"] == 512 and data["dtype"] == "uint16"
    assert data["tokenizer_sha256"] == file_sha256(dataset / "tokenizer.json")
    train = data["splits"]["train"]
    assert train["samples"] == sum(s["samples"] for s in train["shards"])
    assert all(s["samples"] == 50 for s in train["shards"][:-1])
    for shard in train["shards"]:
        assert file_sha256(dataset / shard["file"]) == shard["sha256"]
        assert shard["tokens"] == shard["samples"] * 65
    assert data["stats"]["documents"] > 100 and data["stats"]["tokens_per_s"] > 0
    assert not (dataset / ".prepare-work").exists()


def test_output_is_identical_for_any_worker_count(dataset: Path, corpus_dir: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    prepare(
        PrepareOptions(
            inputs=[str(corpus_dir)], output=one, seq_len=64, shard_size="50", val_fraction=0.1, workers=1,
            tokenizer=str(dataset / "tokenizer.json"),
        )
    )  # fmt: skip
    a, b = read_manifest(one), read_manifest(dataset)
    assert [s.sha256 for s in a.splits["train"].shards] == [s.sha256 for s in b.splits["train"].shards]
    assert [s.sha256 for s in a.splits["validation"].shards] == [s.sha256 for s in b.splits["validation"].shards]


def test_dedup_removes_exact_duplicates(tmp_path: Path, dataset: Path) -> None:
    corpus = tmp_path / "dup"
    corpus.mkdir()
    text = "".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(30))
    (corpus / "a.jsonl").write_text(text)
    (corpus / "b.jsonl").write_text(text)  # every document again
    options = dict(
        inputs=[str(corpus)], seq_len=16, tokenizer=str(dataset / "tokenizer.json"), val_fraction=0.0, workers=2
    )
    plain = prepare(PrepareOptions(output=tmp_path / "plain", **options))  # type: ignore[arg-type]
    deduped = prepare(PrepareOptions(output=tmp_path / "dedup", dedup=True, **options))  # type: ignore[arg-type]
    assert deduped.stats["duplicates_removed"] == 30 and plain.stats["duplicates_removed"] == 0
    assert deduped.stats["documents"] == 60
    assert abs(2 * deduped.splits["train"].tokens - plain.splits["train"].tokens) <= 2 * 17


def test_bad_inputs(tmp_path: Path, dataset: Path) -> None:
    with pytest.raises(UsageError, match="missing: input path does not exist"):
        prepare(PrepareOptions(inputs=[str(tmp_path / "missing")], output=tmp_path / "o1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(LmscaleError, match="empty.txt: the corpus holds no documents"):
        prepare(PrepareOptions(inputs=[str(empty)], output=tmp_path / "o2", workers=1))
    with pytest.raises(UsageError, match="output directory is not empty"):
        prepare(PrepareOptions(inputs=[str(empty)], output=dataset))


def test_cli_strict_bad_line_fails_and_leaves_no_manifest(tmp_path: Path, dataset: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine document with some words"}\n{"text": 3}\n')
    out = tmp_path / "out"
    args = ["prepare", "--input", str(bad), "--output", str(out), "--seq-len", "8", "--workers", "1",
            "--tokenizer", str(dataset / "tokenizer.json")]  # fmt: skip
    result = run_cli(*args, "--strict")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("lmscale: error: ")
    assert "bad.jsonl:2: no string field 'text'" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert not (out / MANIFEST).exists()
    result = run_cli(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert read_manifest(out).stats["bad_lines"] == 1
    assert "bad lines skipped 1" in result.stdout


def test_killing_a_ray_worker_mid_run_still_gives_the_complete_dataset(tmp_path: Path, dataset: Path) -> None:
    import subprocess
    import sys
    import time

    import psutil

    corpus = tmp_path / "big"
    corpus.mkdir()
    docs = [json.dumps({"text": f"{i} " + "the quick brown fox jumps over the lazy dog " * 40}) for i in range(4000)]
    for f in range(6):
        (corpus / f"part-{f}.jsonl").write_text("\n".join(docs[f::6]) + "\n")
    common = ["--input", str(corpus), "--seq-len", "64", "--tokenizer", str(dataset / "tokenizer.json"),
              "--workers", "2", "--shard-size", "500"]  # fmt: skip
    reference = run_cli("prepare", "--output", str(tmp_path / "ref"), *common)
    assert reference.returncode == 0, reference.stderr

    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "prepare", "--output", str(tmp_path / "killed"), *common],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    killed: dict[str, int] = {}  # one worker killed in each phase it can be caught in
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        for p in psutil.process_iter(["cmdline"]):
            for task in ("ray::tokenize_unit", "ray::write_shard"):
                if task not in killed and any(task in part for part in (p.info["cmdline"] or [])):
                    p.kill()
                    killed[task] = p.pid
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    assert "ray::tokenize_unit" in killed, "no Ray worker was caught tokenizing"
    assert proc.returncode == 0, err
    a, b = read_manifest(tmp_path / "ref"), read_manifest(tmp_path / "killed")
    assert a.stats["documents"] == b.stats["documents"] == 4000
    assert [s.sha256 for s in a.splits["train"].shards] == [s.sha256 for s in b.splits["train"].shards]
    # A writer killed mid-shard leaves a temporary file; the published dataset holds only its shards.
    assert sorted(p.name for p in (tmp_path / "killed" / "shards").iterdir()) == sorted(
        p.name for p in (tmp_path / "ref" / "shards").iterdir()
    )


def test_inspect_verifies_checksums_and_decodes_samples(dataset: Path, tmp_path: Path) -> None:
    result = run_cli("data", "inspect", str(dataset), "--samples", "1")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(dataset)
    n = len(manifest.splits["train"].shards) + len(manifest.splits["validation"].shards)
    assert f"checksums: {n}/{n} shards ok" in result.stdout and "--- train-000000-000000 (65 tokens)" in result.stdout
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    shard = broken / manifest.splits["train"].shards[1].file
    shard.write_bytes(shard.read_bytes()[:-1024])
    result = run_cli("data", "inspect", str(broken), "--samples", "0")
    assert result.returncode == 1 and "CORRUPT shards/train-000001.tar: sha256 does not match" in result.stdout


def corpus_documents(corpus_dir: Path) -> list[str]:
    return [d for path in expand_inputs([str(corpus_dir)]) for d in read_documents(path, ReadOptions(), ReadStats())]


def test_parquet_arrow_and_jsonl_of_the_same_documents_give_byte_identical_shards(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same documents as JSONL, as parquet (small row groups, tokenized in units of two row groups) and as
    a directory datasets saved: the same tokenizer and the same shards, byte for byte; a null row is skipped,
    counted and named by its place in each format. (In process: the units are the same bytes on Ray.)"""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmscale.data import sources

    documents = corpus_documents(corpus_dir)
    rows: list[str | None] = [*documents[:40], None, "   ", *documents[40:]]  # a null and a blank row
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(rows)))
    table = pa.table({"id": list(range(len(rows))), "text": rows})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=25)
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    # Units of about two row groups, so that the file is tokenized by many tasks.
    group_bytes = pq.ParquetFile(tmp_path / "docs.parquet").metadata.row_group(0).total_byte_size
    monkeypatch.setattr(sources, "UNIT_BYTES", 2 * group_bytes)

    def prepared(name: str, source: str) -> dict:
        out = tmp_path / name
        options = PrepareOptions(inputs=[str(tmp_path / source)], output=out, seq_len=32, vocab_size=400,
                                 shard_size="40", val_fraction=0.1, in_process=True)  # fmt: skip
        manifest = prepare(options)
        shards = {s.file: s.sha256 for split in manifest.splits.values() for s in split.shards}
        return {"tokenizer": file_sha256(out / "tokenizer.json"), "shards": shards, "stats": manifest.stats}

    jsonl = prepared("from-jsonl", "docs.jsonl")
    parquet = prepared("from-parquet", "docs.parquet")
    arrow = prepared("from-arrow", "saved")
    assert parquet["stats"]["input_units"] >= 8
    assert len(jsonl["shards"]) > 5
    for other in (parquet, arrow):
        assert other["tokenizer"] == jsonl["tokenizer"] and other["shards"] == jsonl["shards"]
        assert other["stats"]["documents"] == jsonl["stats"]["documents"] == len(documents)
        assert other["stats"]["bad_lines"] == jsonl["stats"]["bad_lines"] == 1
    assert parquet["stats"]["bad_line_examples"] == [f"{tmp_path / 'docs.parquet'}:1:15: no 'text' (null)"]
    arrow_file = tmp_path / "saved" / "data-00000-of-00001.arrow"
    assert arrow["stats"]["bad_line_examples"] == [f"{arrow_file}:40: no 'text' (null)"]
    # A directory holding a saved dataset: its Arrow files, never its state.json or dataset_info.json.
    assert [p.name for p in expand_inputs([str(tmp_path)]) if "from-" not in str(p)] == [
        "docs.jsonl", "docs.parquet", "data-00000-of-00001.arrow",
    ]  # fmt: skip


def test_bad_parquet_and_arrow_inputs_fail_in_one_line_naming_the_file(tmp_path: Path, dataset: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = str(dataset / "tokenizer.json")

    def attempt(source: Path, **read: object) -> str:
        options = PrepareOptions(inputs=[str(source)], output=tmp_path / "out", seq_len=8, tokenizer=tokenizer,
                                 in_process=True, overwrite=True, read=ReadOptions(**read))  # type: ignore[arg-type]  # fmt: skip
        with pytest.raises(LmscaleError) as caught:
            prepare(options)
        assert not (tmp_path / "out" / MANIFEST).exists()
        return str(caught.value)

    table = pa.table({"body": ["some words here", None, "more words"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "t.parquet")
    assert attempt(tmp_path / "t.parquet") == (
        f"{tmp_path / 't.parquet'}: no column 'text' (columns: body, n; pass --text-field)"
    )
    assert attempt(tmp_path / "t.parquet", text_field="n") == (
        f"{tmp_path / 't.parquet'}: column 'n' holds int64, not text (pass --text-field)"
    )
    assert attempt(tmp_path / "t.parquet", text_field="body", strict=True).startswith(
        f"{tmp_path / 't.parquet'}:0:1: no 'body' (null) (drop --strict"
    )
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    assert attempt(tmp_path / "broken.parquet").startswith(f"{tmp_path / 'broken.parquet'}: cannot read as parquet (")
    splits = datasets.DatasetDict({"train": datasets.Dataset(table), "test": datasets.Dataset(table)})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert attempt(tmp_path / "dict") == (
        f"{tmp_path / 'dict'}: a dataset of the splits train, test: give one split's directory "
        f"(e.g. {tmp_path / 'dict' / 'train'})"
    )
