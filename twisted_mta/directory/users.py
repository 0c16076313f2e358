"""The users file, Dovecot's passwd-file format: ``address:password-field``.

Read as ``address -> password field`` (addresses lower-cased); changed
by adding or replacing one account's line atomically. Comments, blank
lines and every other line are kept byte for byte; the new file replaces
the old by rename after an fsync, so a crash leaves either the old file
or the new one. It keeps the old file's mode and owner, so that root
adding an account leaves the file readable by the daemon.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from pathlib import Path

from twisted_mta.directory.watched import content_lines
from twisted_mta.storage.files import write_atomically


def parse_users(lines: Iterable[str]) -> dict[str, str]:
    """``address -> password field`` from Dovecot passwd-file lines."""
    users: dict[str, str] = {}
    for _, text in content_lines(lines):
        name, _, rest = text.partition(":")
        users[name.strip().lower()] = rest.split(":", 1)[0]
    return users


def set_password_line(path: Path, address: str, field: str) -> bool:
    """Write ``address:field`` into ``path``; return True if it replaced a line."""
    lines = path.read_bytes().splitlines(keepends=True) if path.exists() else []
    entry = f"{address}:{field}\n".encode("utf-8")
    replaced = False
    for index, line in enumerate(lines):
        if _account_of(line) == address.lower():
            if not replaced:
                lines[index] = entry
            else:
                lines[index] = b""
            replaced = True
    if not replaced:
        if lines and not lines[-1].endswith(b"\n"):
            lines[-1] += b"\n"
        lines.append(entry)
    _replace(path, b"".join(lines))
    return replaced


def _account_of(line: bytes) -> str | None:
    text = line.split(b"#", 1)[0].strip()
    if b":" not in text:
        return None
    return text.split(b":", 1)[0].strip().decode("utf-8", "replace").lower()


def _replace(path: Path, content: bytes) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        write_atomically(path, content, 0o600)
        return
    write_atomically(path, content, stat.S_IMODE(info.st_mode), (info.st_uid, info.st_gid))
