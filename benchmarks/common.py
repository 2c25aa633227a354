"""Shared set-up for the benchmarks: a corpus of real text of a chosen size, with no download."""

from __future__ import annotations

import json
from pathlib import Path

from lmscale.data.demo_corpus import stdlib_docstrings


def write_corpus(directory: Path, megabytes: float, files: int = 8) -> list[str]:
    """Python's docstrings, repeated with a distinguishing prefix until ``megabytes`` of text."""
    base = stdlib_docstrings(10**9)
    documents: list[str] = []
    size, copy = 0, 0
    while size < megabytes * 1e6:
        for doc in base:
            text = f"[{copy}] {doc}"
            documents.append(text)
            size += len(text)
        copy += 1
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        with open(directory / f"part-{i}.jsonl", "w") as f:
            for doc in documents[i::files]:
                f.write(json.dumps({"text": doc}) + "\n")
    return documents
