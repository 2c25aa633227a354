"""Peak memory of reading a large parquet file's documents the way `lmscale prepare` does, against reading
the text column whole.

lmscale: every input unit of the file (runs of row groups of about 64 MB, ``sources.input_units``) read
with ``sources.read_documents``, batches of 1024 rows of the text column, as the tokenize tasks read them
(here one after another in one process: each task holds one unit at a time). Baseline: the naive reader,
``pyarrow.parquet.read_table(path, columns=["text"])`` and the column as Python strings. Each runs in a
fresh process; reported: its peak resident memory (ru_maxrss), its rise above the interpreter with
pyarrow and lmscale loaded, the ratio of the peaks baseline / lmscale, and the file's size. Both read every document (their character counts must
agree).

    python -m benchmarks.parquet_memory --megabytes 2000
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROW_GROUP_ROWS = 20_000
"""About 60 MB of row group with these documents: FineWeb's files hold row groups of this order."""


def write_parquet(path: Path, megabytes: float) -> int:
    """Python's docstrings, repeated with a distinguishing prefix, as a ``text`` column; its bytes on disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmscale.data.demo_corpus import stdlib_docstrings

    base = stdlib_docstrings(10**9)
    written, copy = 0, 0
    with pq.ParquetWriter(path, pa.schema([("id", pa.int64()), ("text", pa.string())])) as writer:
        while written < megabytes * 1e6:
            rows = [f"[{copy}:{i}] {doc}" for i, doc in enumerate(base)]
            while len(rows) < ROW_GROUP_ROWS:
                rows += rows
            rows = rows[:ROW_GROUP_ROWS]
            writer.write_table(pa.table({"id": list(range(len(rows))), "text": rows}), row_group_size=ROW_GROUP_ROWS)
            written += sum(len(r) for r in rows)
            copy += 1
    return path.stat().st_size


READERS = {
    "lmscale": """
from lmscale.data.sources import ReadOptions, ReadStats, input_units, read_documents
chars = 0
for unit in input_units([path]):
    chars += sum(len(d) for d in read_documents(unit.path, ReadOptions(), ReadStats(), unit.row_groups))
""",
    "read_table": """
import pyarrow.parquet as pq
texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
chars = sum(len(t) for t in texts if t and t.strip())
""",
}


def measure(reader: str, path: Path) -> tuple[float, float, int, float]:
    """(peak resident MB, its rise above the start, characters read, seconds) of one reader in a fresh
    process."""
    code = f"""
import resource, time
from pathlib import Path
import pyarrow, pyarrow.parquet
import lmscale.data.sources
path = Path({str(path)!r})
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
began = time.perf_counter()
{READERS[reader]}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak / 1024, (peak - start) / 1024, chars, time.perf_counter() - began)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2]), float(out[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=2000, help="text in the parquet file")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    import pyarrow
    import torch

    print(f"# parquet read memory, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")
    print(f"  machine {platform.processor() or platform.machine()}, {os.cpu_count()} cores, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, pyarrow {pyarrow.__version__}")  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "docs.parquet"
        size = write_parquet(path, args.megabytes)
        print(f"  file {size / 1e6:,.0f} MB on disk, {args.megabytes:,.0f} MB of text, row groups of "
              f"{ROW_GROUP_ROWS:,} rows")  # fmt: skip
        ours = measure("lmscale", path)
        theirs = measure("read_table", path)
    assert ours[2] == theirs[2], (ours[2], theirs[2])
    print("| reader | peak resident memory (MB) | rise above the start (MB) | seconds |")
    print("|---|---:|---:|---:|")
    for name, (peak, rise, _, seconds) in (("lmscale (units of row groups, batches of 1024 rows)", ours),
                                           ("baseline: read_table + to_pylist", theirs)):  # fmt: skip
        print(f"| {name} | {peak:,.0f} | {rise:,.0f} | {seconds:.1f} |")
    print(f"baseline / lmscale peak resident memory: {theirs[0] / ours[0]:.1f}x")


if __name__ == "__main__":
    main()
