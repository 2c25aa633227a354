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
            for task in ("ray::tokenize_file", "ray::write_shard"):
                if task not in killed and any(task in part for part in (p.info["cmdline"] or [])):
                    p.kill()
                    killed[task] = p.pid
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    assert "ray::tokenize_file" in killed, "no Ray worker was caught tokenizing"
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
