"""The files of one checkpoint tag, made durable and checkable: fsync, sha256 and a manifest.

Pure file work, no process group: the collective side (who hashes what, who publishes) is
``lmscale.train.checkpoint``. The work is shared out by size (``share``) so that every rank hashes about the same
number of bytes of a multi-GB checkpoint in parallel, right after writing it, while the pages are still cached.

``manifest.json`` maps every file of the tag (relative path) to its size and sha256; a file not listed in it is
not part of the checkpoint (DeepSpeed's universal conversion, added later, lives beside it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lmscale.files import write_text

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FileRecord:
    path: str
    """Relative to the tag directory."""
    size: int
    sha256: str


def list_files(tag_dir: Path) -> list[tuple[str, int]]:
    """Every file under ``tag_dir`` (relative path, size), the manifest excepted."""
    found = []
    for path in sorted(tag_dir.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            found.append((path.relative_to(tag_dir).as_posix(), path.stat().st_size))
    return found


def share(files: list[tuple[str, int]], parts: int) -> list[list[str]]:
    """Split files into ``parts`` lists of about equal total size (largest first onto the lightest part)."""
    loads = [0] * parts
    shares: list[list[str]] = [[] for _ in range(parts)]
    for name, size in sorted(files, key=lambda f: (-f[1], f[0])):
        lightest = loads.index(min(loads))
        shares[lightest].append(name)
        loads[lightest] += size
    return shares


def digest(path: Path, sync: bool = False) -> tuple[int, str]:
    """Size and sha256 of ``path``; with ``sync`` its data is then forced to stable storage. Hashing first
    reads the freshly written pages from the cache while the kernel is already writing them back, so the
    fsync after it waits for less."""
    with open(path, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        if sync:
            os.fsync(f.fileno())
        return os.fstat(f.fileno()).st_size, sha256


def hash_files(tag_dir: Path, names: list[str], sync: bool) -> list[FileRecord]:
    return [FileRecord(name, *digest(tag_dir / name, sync)) for name in names]


def write_manifest(tag_dir: Path, records: list[FileRecord], step: int) -> None:
    files = {r.path: {"size": r.size, "sha256": r.sha256} for r in sorted(records, key=lambda r: r.path)}
    write_text(tag_dir / MANIFEST, json.dumps({"step": step, "files": files}, indent=1), durable=True)


def read_manifest(tag_dir: Path) -> dict[str, FileRecord]:
    """The manifest's records by path; raises ``ValueError`` naming what is wrong with it."""
    path = tag_dir / MANIFEST
    try:
        files = json.loads(path.read_text())["files"]
        return {name: FileRecord(name, int(v["size"]), str(v["sha256"])) for name, v in files.items()}
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (the save did not finish)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {err})") from None


def check_files(tag_dir: Path, expected: list[FileRecord]) -> str | None:
    """The first of ``expected`` that is missing, of another size or of another sha256, as one line; None when
    all match. Sizes are compared first, so a truncated file costs no hashing."""
    for record in expected:
        path = tag_dir / record.path
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != record.size:
            return f"{path}: {size} bytes, the manifest says {record.size}"
    for record in expected:
        path = tag_dir / record.path
        if digest(path)[1] != record.sha256:
            return f"{path}: sha256 differs from the manifest (the file changed after it was saved)"
    return None
