"""``data.cache_dir``: shards of a remote dataset kept on local disk, so that a later epoch (or a restart)
reads them there instead of downloading every shard again.

Entries are named by the shard's sha256 from the manifest, so that two datasets, or two copies of one
dataset under different URLs, share them and no entry can stand for another shard's bytes. Every process
that reads shards on a node (each rank and each of its loader workers) uses the same directory: an entry is
written under a name of its writer's and renamed into place, and a reader checks the bytes against the
sha256 (a damaged entry is removed and the shard downloaded again, never reported as a corrupt shard). Past
``limit_bytes`` the least recently read entries are removed; a process still reading one keeps its open
file. Each process looks at the whole directory every ``SCAN_EVERY_PUTS`` writes and whenever its own
count passes the limit, so the directory may pass the limit by what the node's other processes wrote since
they last looked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from lmscale.files import remove

SUFFIX = ".tar"
SCAN_EVERY_PUTS = 16
"""Writes between two looks at the whole directory (every process of a node adds to it): a look costs a stat
per entry, a write a shard's download."""


class ShardCache:
    def __init__(self, directory: Path, limit_bytes: int) -> None:
        self.directory, self.limit_bytes = directory, limit_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._estimate: int | None = None
        """This process's idea of the cache's size: the last look, plus what it wrote since."""
        self._puts = 0

    def _entry(self, sha256: str) -> Path:
        return self.directory / f"{sha256}{SUFFIX}"

    def get(self, sha256: str) -> bytes | None:
        """The shard's bytes if they are here and intact."""
        entry = self._entry(sha256)
        try:
            data = entry.read_bytes()
            os.utime(entry)  # the modification time orders eviction: reading makes an entry recent
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            remove(entry)
            return None
        return data

    def put(self, sha256: str, data: bytes) -> None:
        """Keep a shard whose bytes were checked against ``sha256``, evicting down to the limit when the
        directory may be over it."""
        if len(data) > self.limit_bytes:
            return
        entry = self._entry(sha256)
        tmp = entry.with_name(f".{entry.name}.tmp{os.getpid()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, entry)
        except OSError:
            remove(tmp)
            return  # a full or failing local disk costs the cache, not the run
        self._puts += 1
        self._estimate = (self._estimate or 0) + len(data)
        if self._puts % SCAN_EVERY_PUTS == 1 or self._estimate > self.limit_bytes:
            self.evict()

    def evict(self) -> None:
        """Remove the least recently read entries until the directory holds at most the limit."""
        entries = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.limit_bytes:
                break
            remove(path)
            total -= size
        self._estimate = total
