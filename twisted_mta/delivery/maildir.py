"""Maildir folders: where a mailbox lives, unique file names, safe creation.

Twisted's ``twisted.mail.maildir`` cannot deliver on Python 3 (str/bytes
paths, text-mode files) and never fsyncs, so the writing side is ours.
A message is written to ``tmp/`` with ``O_EXCL | O_NOFOLLOW`` and later
renamed into ``new/`` by the committer, under a name unique across hosts,
processes, restarts and clock jumps::

    <sec>.M<usec>P<pid>V<dev>I<ino>_<seq>.<host>,S=<size>
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from twisted_mta.queue.committer import fsync_directory

_SUBDIRECTORIES = ("tmp", "new", "cur")
_sequence = itertools.count()


class UnsafeMailboxName(ValueError):
    """A name that could leave the mail folder or confuse a Maildir reader."""


def check_path_component(name: str) -> str:
    """Return ``name`` if it can be one directory name under the spool."""
    if (
        not name
        or name.startswith(".")
        or ".." in name
        or "/" in name
        or "\\" in name
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
    ):
        raise UnsafeMailboxName(name)
    return name


def mailbox_path(mail_root: Path, domain: str, local: str) -> Path:
    """The Maildir of ``local@domain``: ``mail_root/domain/local``."""
    return mail_root / check_path_component(domain) / check_path_component(local)


def ensure_maildir(path: Path) -> None:
    """Create ``path`` with tmp/new/cur (mode 0700) and make it durable."""
    if (path / "new").is_dir() and (path / "tmp").is_dir():
        return
    created = _make_directories(path)
    for sub in _SUBDIRECTORIES:
        try:
            os.mkdir(path / sub, 0o700)
        except FileExistsError:
            continue
    fsync_directory(str(path))
    for directory in created:
        fsync_directory(str(directory.parent))


def _make_directories(path: Path) -> list[Path]:
    """Like ``os.makedirs`` but return what was made, to fsync its parents."""
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
    return missing


_hostname = socket.gethostname().replace("/", "\\057").replace(":", "\\072")


@dataclass
class TemporaryFile:
    """An open file in a Maildir's ``tmp/``, not yet delivered."""

    fd: int
    path: str
    maildir: Path
    stem: str

    def final_path(self, size: int) -> str:
        """The ``new/`` name for this file once it holds ``size`` bytes.

        Device and inode make the name unique even when a restarted process
        reuses a pid within the same microsecond and counter value.
        """
        info = os.fstat(self.fd)
        unique = self.stem.replace("Q", f"V{info.st_dev:x}I{info.st_ino:x}_", 1)
        return os.path.join(self.maildir, "new", f"{unique}.{_hostname},S={size}")


def open_temporary(maildir: Path) -> TemporaryFile:
    """Create a new empty file in ``maildir/tmp``."""
    now = time.time()
    seconds = int(now)
    micro = int((now - seconds) * 1_000_000)
    stem = f"{seconds}.M{micro}P{os.getpid()}Q{next(_sequence)}"
    path = str(maildir / "tmp" / f"{stem}.{_hostname}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return TemporaryFile(os.open(path, flags, 0o600), path, maildir, stem)
