"""Small durable-file primitives shared by the spool, the queue and the CLI."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    path: Path,
    data: bytes | Sequence[bytes],
    mode: int = 0o600,
    owner: tuple[int, int] | None = None,
    sync_directory: bool = True,
) -> None:
    """Replace ``path`` with ``data`` (bytes, or chunks written in order):
    a crash leaves the old file or the new one.

    The data goes to a new hidden name beside ``path`` (never an existing
    file or link: the folder may be writable by others), is fsynced,
    renamed over ``path``, and the directory is fsynced, unless the caller
    does that itself (``sync_directory`` false: once for several files).
    The file gets exactly ``mode``, whatever the umask, and ``owner`` (uid,
    gid) when it is not ours already: root editing a file the daemon reads
    must leave it the daemon's.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                os.fchown(fd, *owner)
            for chunk in [data] if isinstance(data, bytes) else data:
                _write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except BaseException:
        # A full disk must not leave a litter of half-written names.
        _remove_quietly(temporary)
        raise
    if sync_directory:
        fsync_directory(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def make_directories(path: Path, mode: int = 0o700, gid: int = -1) -> None:
    """Like ``os.makedirs``, and durable: the entry of each new folder is
    fsynced in its parent, or a crash could lose the folder with every file
    later made durable inside it.  Each new folder gets exactly ``mode``
    and, unless ``gid`` is -1, that group."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        make_directory(directory, mode, gid)
    for directory in reversed(missing):
        fsync_directory(str(directory.parent))


def make_directory(path: Path, mode: int = 0o700, gid: int = -1) -> None:
    """Create ``path`` with exactly ``mode`` whatever the umask, of group
    ``gid`` unless it is -1; one already there is left as it is.

    The folder is private until its group and mode are set, so nobody else
    ever sees it half made.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    if gid != -1:
        os.chown(path, -1, gid)
    # After the chown, which clears the setgid bit; mkdir ignores it anyway.
    os.chmod(path, mode)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
