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


def write_text(path: Path, text: str, durable: bool = False) -> None:
    with replacing(path, durable=durable) as tmp:
        tmp.write_text(text)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
