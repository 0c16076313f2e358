"""Small durable-file primitives shared by the spool, the queue and the CLI."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    path: Path, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> None:
    """Replace ``path`` with ``data``: a crash leaves the old or the new file.

    The data goes to a temporary name beside ``path``, is fsynced, renamed
    over ``path``, and the directory is fsynced.  ``owner`` (uid, gid) is
    given to the new file when it is not ours already: root editing a file
    the daemon reads must leave it the daemon's.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except BaseException:
        # A full disk must not leave a litter of half-written names.
        _remove_quietly(temporary)
        raise
    fsync_directory(path.parent)


def make_directories(path: Path) -> None:
    """Like ``os.makedirs`` (mode 0700), and durable: the entry of each new
    folder is fsynced in its parent, or a crash could lose the folder with
    every file later made durable inside it."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
    for directory in reversed(missing):
        fsync_directory(str(directory.parent))


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
