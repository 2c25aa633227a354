"""Files that readers see whole or not at all: written under a temporary name beside the target, then renamed
into place (a rename within a directory is atomic on POSIX filesystems, shared ones included)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def sync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` survive a crash of the machine."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(target: Path, suffix: str = "", durable: bool = False, unique: bool = False) -> Iterator[Path]:
    """A temporary path beside ``target`` to write a file or a directory tree into; on a clean exit it replaces
    ``target`` (an existing directory is removed first), on an error it is removed. ``suffix`` ends the
    temporary name for writers that append one (``np.savez``: ``.npz``). ``durable``: fsync the file and the
    directory, so that the new contents survive a crash of the machine, not only of the process. ``unique``:
    a name of this process's, where several may write the same target at once (retried Ray tasks); else one
    name, so that what a killed writer left is removed by the next."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid() if unique else ''}{suffix}")
    remove(tmp)
    try:
        yield tmp
        if durable and tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if target.is_dir() and tmp.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
        if durable:
            sync_dir(target.parent)
    finally:
        remove(tmp)


def write_text(path: Path, text: str, durable: bool = False, unique: bool = False) -> None:
    with replacing(path, durable=durable, unique=unique) as tmp:
        tmp.write_text(text)


def create_exclusive(path: Path, text: str) -> bool:
    """Write ``path`` whole if it does not exist; False if it does. A hard link of a complete file with a name of
    this process's: link(2) fails on an existing name atomically on NFS too (the server does it in one operation;
    ``O_EXCL`` is atomic there only from v3 with a recent client), and a link whose reply was lost is recognised
    by the new file's link count."""
    tmp = path.with_name(f".{path.name}.new{os.getpid()}")
    tmp.write_text(text)
    try:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            if os.stat(tmp).st_nlink != 2:
                raise
        sync_dir(path.parent)
        return True
    finally:
        remove(tmp)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
