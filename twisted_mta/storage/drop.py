"""The maildrop format: messages handed over by ``twisted-mta-sendmail``.

The command cannot talk to the daemon (it may be down) and must not lose a
message, so it writes each one as a file into ``spool/maildrop/``: a JSON
envelope on the first line, then the message, written atomically (a
visible name is always a complete file).

The directory is made mode 1733 when the daemon creates it (like /tmp but
not listable), so that any local user can drop mail but not see or remove
another's; drops are mode 0644 so that an unprivileged daemon reads them.
This module writes drops (for the command) and reads them (for the
daemon's :mod:`twisted_mta.intake.maildrop`).
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from twisted_mta.storage.files import fsync_directory, write_atomically

DROP_VERSION = 1
MAX_ENVELOPE = 1024 * 1024  # the JSON line; room for thousands of recipients
DIRECTORY_MODE = 0o1733
FILE_MODE = 0o644
BAD = "bad"  # where the daemon sets aside what is not a drop
# A symbolic link (O_NOFOLLOW), or a file the daemon may not read.
_NEVER_READABLE = frozenset({errno.ELOOP, errno.EACCES, errno.EPERM})


class MalformedDrop(ValueError):
    """A maildrop file that is not one this module wrote."""


@dataclass(frozen=True)
class DropEnvelope:
    """Who a dropped message is from and for, and who dropped it when."""

    sender: str
    recipients: tuple[str, ...]
    user: str
    time: float

    def to_line(self) -> bytes:
        document = {
            "version": DROP_VERSION,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "user": self.user,
            "time": self.time,
        }
        return json.dumps(document, ensure_ascii=False).encode("utf-8") + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> DropEnvelope:
        """Parse the first line of a drop; raises MalformedDrop."""
        if not line.endswith(b"\n"):
            raise MalformedDrop("no complete envelope line")
        try:
            document = json.loads(line)
        except ValueError as error:
            raise MalformedDrop(f"envelope is not JSON: {error}") from None
        if not isinstance(document, dict) or document.get("version") != DROP_VERSION:
            raise MalformedDrop("unknown envelope version")
        return cls(
            sender=_field(document, "sender", str),
            recipients=tuple(_recipients(document)),
            user=_field(document, "user", str),
            time=float(_field(document, "time", (int, float))),
        )


def _field(document: dict, key: str, kind: type | tuple[type, ...]):
    value = document.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MalformedDrop(f"envelope field {key!r} missing or of the wrong type")
    return value


def _recipients(document: dict) -> list[str]:
    recipients = _field(document, "recipients", list)
    if not recipients or not all(isinstance(r, str) for r in recipients):
        raise MalformedDrop("envelope field 'recipients' must be a list of addresses")
    return recipients


def write_drop(directory: Path, envelope: DropEnvelope, message: bytes) -> Path:
    """Write one drop durably; its final path.  Raises OSError.

    Once this returns, the message survives a crash, and the daemon never
    sees half a file (it ignores hidden names).
    """
    final = directory / f"{time.time_ns():020d}.{os.getpid()}.{secrets.token_hex(8)}"
    write_atomically(final, (envelope.to_line(), message), FILE_MODE)
    return final


def prepare_directory(directory: Path) -> None:
    """Create the maildrop (mode 1733) if it is missing."""
    try:
        os.mkdir(directory, DIRECTORY_MODE)
    except FileExistsError:
        return
    os.chmod(directory, DIRECTORY_MODE)  # the umask took bits away
    fsync_directory(str(directory.parent))


def is_drop_name(name: str) -> bool:
    """Hidden names are files being written; ``bad`` is the set-aside folder."""
    return not name.startswith(".") and name != BAD


def read_drop(path: Path) -> tuple[BinaryIO, str, DropEnvelope]:
    """Open a drop and read its envelope: the stream, at the message; the
    login name of the file's owner (who really dropped it); the envelope.

    Links are not followed and a FIFO does not block.  Raises
    MalformedDrop for what will never be a drop, OSError otherwise.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in _NEVER_READABLE:
            raise MalformedDrop(f"cannot be opened: {error.strerror}") from None
        raise
    stream = os.fdopen(fd, "rb")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MalformedDrop("not a regular file")
        if info.st_nlink != 1:
            # A hard link to a file its maker could not otherwise send.
            raise MalformedDrop("has other hard links")
        envelope = DropEnvelope.from_line(stream.readline(MAX_ENVELOPE + 1))
    except BaseException:
        stream.close()
        raise
    return stream, _login_name(info.st_uid), envelope


def _login_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
