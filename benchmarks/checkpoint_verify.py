"""What verified checkpoints cost: fsync + sha256 of a save, and the check before a load, against the save and
the load themselves.

The checkpoint is what DeepSpeed writes for one tag: one ``torch.save`` file of fp32 tensors per rank (``--ranks``
files, ``--gigabytes`` in all). Baselines, measured in the same run on the same files:

- save: ``torch.save`` of every rank's file, the ranks in parallel (DeepSpeed's save, which does not fsync);
- load: ``torch.load`` of every rank's file, in parallel.

lmscale adds, per save, ``hash_files(sync=True)`` of each rank's share (split by size, in parallel: the ranks
hash right after writing, from the page cache) and, per load, ``check_tag`` of each share; the load side is
measured with a warm page cache and, with ``--cold`` (root: drops the page cache), from the disk.

    python -m benchmarks.checkpoint_verify [--gigabytes 2] [--ranks 2] [--cold] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from lmscale.train.checkpoint import check_tag
from lmscale.train.checkpoint_manifest import hash_files, list_files, share, write_manifest


def save_rank(path: str, megabytes: float, seed: int) -> float:
    """Seconds ``torch.save`` took (building the tensors is not timed)."""
    generator = torch.Generator().manual_seed(seed)
    numel = int(megabytes * 1e6 / 4)
    state = {f"part_{i}": torch.randn(numel // 8, generator=generator) for i in range(8)}
    started = time.perf_counter()
    torch.save(state, path)
    return time.perf_counter() - started


def load_rank(path: str) -> None:
    torch.load(path, weights_only=True)


def hash_share(tag_dir: str, names: list[str], sync: bool) -> list:
    return hash_files(Path(tag_dir), names, sync)


def check_share(tag_dir: str, part: int, parts: int) -> str | None:
    path = Path(tag_dir)
    return check_tag(path.parent, path.name, part, parts)


def timed(pool: ProcessPoolExecutor, fn: Callable, calls: list[tuple]) -> float:
    started = time.perf_counter()
    for future in [pool.submit(fn, *args) for args in calls]:
        future.result()
    return time.perf_counter() - started


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="also check from the disk (drops the page cache)")
    parser.add_argument("--dir", type=Path, default=Path("."), help="filesystem to measure on (default: here)")
    args = parser.parse_args()
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, {platform.machine()}")
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    tag_dir = root / "step_00000001"
    tag_dir.mkdir()
    per_rank = args.gigabytes * 1000 / args.ranks
    files = [str(tag_dir / f"zero_pp_rank_{r}_optim_states.pt") for r in range(args.ranks)]
    try:
        with ProcessPoolExecutor(args.ranks) as pool:
            # The ranks save in parallel: the save takes as long as the slowest rank's.
            save_s = max(pool.map(save_rank, files, [per_rank] * args.ranks, range(args.ranks)))
            shares = share(list_files(tag_dir), args.ranks)
            hash_s = timed(pool, hash_share, [(str(tag_dir), names, True) for names in shares])
            sha_only_s = timed(pool, hash_share, [(str(tag_dir), names, False) for names in shares])
            write_manifest(tag_dir, hash_files(tag_dir, [n for part in shares for n in part], sync=False), 1)
            load_s = timed(pool, load_rank, [(f,) for f in files])
            check_s = timed(pool, check_share, [(str(tag_dir), r, args.ranks) for r in range(args.ranks)])
            rows = [
                ("save: torch.save per rank (baseline)", save_s, save_s),
                ("lmscale on save: fsync + sha256 per rank's share", hash_s, save_s),
                ("  of which sha256 (second pass, data in cache)", sha_only_s, save_s),
                ("load: torch.load per rank (baseline)", load_s, load_s),
                ("lmscale on load: check its share, warm cache", check_s, load_s),
            ]
            if args.cold:
                drop_page_cache()
                cold_check_s = timed(pool, check_share, [(str(tag_dir), r, args.ranks) for r in range(args.ranks)])
                drop_page_cache()
                cold_load_s = timed(pool, load_rank, [(f,) for f in files])
                rows += [
                    ("load from disk: torch.load (baseline)", cold_load_s, cold_load_s),
                    ("lmscale on load from disk: check its share", cold_check_s, cold_load_s),
                ]
    finally:
        shutil.rmtree(root)
    total = args.gigabytes
    print(f"checkpoint: {total:g} GB in {args.ranks} rank files, on {args.dir.resolve()}")
    for name, seconds, baseline in rows:
        print(f"{name:52s} {seconds:7.2f} s  {total / seconds:6.2f} GB/s  {seconds / baseline:5.2f}x baseline")


if __name__ == "__main__":
    main()
