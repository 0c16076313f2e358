"""Maildir folders: where a mailbox lives, unique file names, safe creation.

Twisted's ``twisted.mail.maildir`` cannot deliver on Python 3 (str/bytes
paths, text-mode files) and never fsyncs, so the writing side is ours.
A message is written to ``tmp/`` with ``O_EXCL | O_NOFOLLOW`` and later
renamed into ``new/`` by the committer, under a name unique across hosts,
processes, restarts and clock jumps::

    <sec>.M<usec>P<pid>V<dev>I<ino>_<seq>.<host>,S=<size>

``,S=`` is the size of the file as stored, which lets Dovecot and other
readers skip a stat.  A file a crash leaves in ``tmp/`` is removed at the
next start once it is 36 hours old, the age after which the Maildir
convention deems a temporary file abandoned.

Maildirs are the daemon's alone (folders 0700, files 0600) unless they are
shared with a group (``[delivery] group``), e.g. an IMAP/POP3 server's:
then every folder under the mail root is 2770 (setgid: what is made in it
inherits the group) and every message file 0660, so the group's members
read, flag, move and expunge messages, and make a new user's maildir when
that user logs in before the first delivery.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from twisted_mta.mail.mailbox import check_path_component
from twisted_mta.storage.files import fsync_directory, make_directories, make_directory

# Readable too: the copies for other mailboxes are taken from the first file.
CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SUBDIRECTORIES = ("tmp", "new", "cur")
_sequence = itertools.count()
STALE_AFTER = 36 * 3600  # seconds
# The temporary names open_temporary makes; other writers' files are theirs.
_OUR_TEMPORARY = re.compile(r"\d+\.M\d+P\d+Q\d+\..+")


@dataclass(frozen=True)
class Sharing:
    """Who may use the maildirs besides the daemon's user: nobody, or the
    members of the group ``gid``."""

    gid: int | None = None

    @property
    def folder_mode(self) -> int:
        return 0o700 if self.gid is None else 0o2770

    @property
    def file_mode(self) -> int:
        return 0o600 if self.gid is None else 0o660

    @property
    def group(self) -> int:
        """The group to give a new folder; -1 keeps the creator's."""
        return -1 if self.gid is None else self.gid


PRIVATE = Sharing()


def may_share(sharing: Sharing) -> bool:
    """Whether this process may give its folders and files the group of
    ``sharing``: only a member of it may, or root."""
    gid = sharing.gid
    return gid is None or os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups()


def mailbox_path(mail_root: Path, domain: str, local: str) -> Path:
    """The Maildir of ``local@domain``: ``mail_root/domain/local``."""
    return mail_root / check_path_component(domain) / check_path_component(local)


def delivery_headers(sender: str, delivered_to: str) -> bytes:
    """What a delivered file starts with: the envelope sender and the
    address it was delivered to, as local delivery agents write them."""
    return f"Return-Path: <{sender}>\nDelivered-To: {delivered_to}\n".encode()


def prepare_mail_root(mail_root: Path, sharing: Sharing) -> bool:
    """Make a shared mail root at start: a user may log in to the IMAP
    server, which then makes the maildir, before the first delivery.

    False if the mail root is to be shared but is not: made before the
    group was set, it is left as it is, for the admin to share it (and
    every maildir in it) once.
    """
    if sharing.gid is None:
        return True
    make_directories(mail_root, sharing.folder_mode, sharing.group)
    return mail_root.stat().st_gid == sharing.gid


def ensure_maildir(path: Path, sharing: Sharing = PRIVATE) -> None:
    """Create ``path`` with tmp/new/cur, and the folders above it that are
    missing, shared as ``sharing`` says, and make them durable."""
    if (path / "new").is_dir() and (path / "tmp").is_dir():
        return
    make_directories(path, sharing.folder_mode, sharing.group)
    for sub in _SUBDIRECTORIES:
        make_directory(path / sub, sharing.folder_mode, sharing.group)
    fsync_directory(str(path))


def _maildir_safe(hostname: str) -> str:
    """The host part of a Maildir name: '/' would be a path, ':' starts the
    flags and ',' the ``S=`` field, so they are written as octal escapes."""
    for char in "\\/:,":
        hostname = hostname.replace(char, f"\\{ord(char):03o}")
    return hostname


_hostname = _maildir_safe(socket.gethostname())


@dataclass
class TemporaryFile:
    """An open file in a Maildir's ``tmp/``, not yet delivered.

    ``unique`` is the final base name without its size.
    """

    fd: int
    path: str
    maildir: Path
    unique: str

    def final_path(self, size: int) -> str:
        """The ``new/`` name for this file once it holds ``size`` bytes."""
        return os.path.join(self.maildir, "new", f"{self.unique},S={size}")


def open_temporary(maildir: Path, sharing: Sharing = PRIVATE) -> TemporaryFile:
    """Create a new empty file in ``maildir/tmp``.

    The temporary name is unique within this process; the final name adds
    the device and inode of the file, so that it stays unique even when a
    restarted process gets the same pid within the same microsecond.
    """
    seconds, micro = divmod(time.time_ns() // 1000, 1_000_000)
    stem = f"{seconds}.M{micro}P{os.getpid()}"
    sequence = next(_sequence)
    path = str(maildir / "tmp" / f"{stem}Q{sequence}.{_hostname}")
    fd = os.open(path, CREATE_FLAGS, sharing.file_mode)
    try:
        info = os.fstat(fd)
        if sharing.gid is not None:
            _share(fd, info, sharing)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    unique = f"{stem}V{info.st_dev:x}I{info.st_ino:x}_{sequence}.{_hostname}"
    return TemporaryFile(fd, path, maildir, unique)


def _share(fd: int, info: os.stat_result, sharing: Sharing) -> None:
    # The setgid folder gave the group, unless the folder predates the
    # option; the umask may have taken the group's bits.
    if info.st_gid != sharing.gid:
        os.fchown(fd, -1, sharing.group)
    os.fchmod(fd, sharing.file_mode)


def sweep_stale_temporaries(mail_root: Path, now: float | None = None) -> int:
    """Remove our temporary files older than ``STALE_AFTER`` from the
    ``tmp/`` of every mailbox under ``mail_root``; how many were removed."""
    cutoff = (time.time() if now is None else now) - STALE_AFTER
    return sum(_sweep(tmp, cutoff) for tmp in mail_root.glob("*/*/tmp"))


def _sweep(tmp: Path, cutoff: float) -> int:
    removed = 0
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return 0
    for entry in entries:
        if not _OUR_TEMPORARY.fullmatch(entry.name):
            continue
        try:
            stale = entry.stat(follow_symlinks=False).st_mtime < cutoff
            if entry.is_file(follow_symlinks=False) and stale:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed
