"""A local mailbox and the names it may have.

A mailbox is named by its owner's address and stored as the folder
``domain/local`` under the mail root, so both parts must be one safe
directory name: no way out of the folder, nothing a Maildir reader
would take for something else.
"""

from __future__ import annotations

from dataclasses import dataclass

_NAME_MAX = 255  # bytes in one directory entry on Linux file systems


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
        or len(name.encode()) > _NAME_MAX
    ):
        raise UnsafeMailboxName(name)
    return name


@dataclass(frozen=True, order=True)
class Mailbox:
    """A local Maildir, named by its owner's address."""

    domain: str
    local: str

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"
