"""Who lives here: accounts from the users file, the aliases file, and the
lookup that turns a local recipient into mailboxes and forwarding targets.

Lookup order for ``local@domain`` (local parts are case-insensitive): the
exact ``local@domain`` alias, the bare ``local`` alias, the account, each
tried for the full local part and then for it without its ``+tag``; then the
domain's catch-all ``@domain``; then ``postmaster``, which always exists.
Aliases expand recursively, at most ``MAX_DEPTH`` aliases deep; an alias
that comes back to itself delivers to the mailbox of that name if there is
one (``alice: alice, archive@example.org``), else it is a loop.  Both files
are re-read when they change.  While one cannot be read, every lookup
raises :class:`DirectoryUnavailable`: a temporary failure, never "unknown".
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from twisted.python import log

from twisted_mta.delivery.maildir import UnsafeMailboxName, check_path_component
from twisted_mta.smtp.address import Address

MAX_DEPTH = 10
POSTMASTER = "postmaster"

# A file changed twice within one timestamp tick keeps its mtime; a file
# younger than this is read again at the next lookup instead of trusted.
_RACY_SECONDS = 2.0
# An alias target is an address or a bare local part; no pipes, files,
# :include:, quoting, or anything that could break a header or a command.
_TARGET_PART = r'[^\s<>()\[\]\\,;:"@|/\x00-\x1f\x7f]+'
_TARGET = re.compile(rf"{_TARGET_PART}(?:@{_TARGET_PART})?")

T = TypeVar("T")


class DirectoryUnavailable(OSError):
    """The users or aliases file cannot be read now; try again later."""


class UnknownRecipient(LookupError):
    """No account, alias or catch-all takes this address."""


class AliasLoop(LookupError):
    """Alias expansion went round in a circle or too deep."""


@dataclass(frozen=True, order=True)
class Mailbox:
    """A local Maildir, named by its owner's address."""

    domain: str
    local: str

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"


@dataclass(frozen=True)
class Resolution:
    """Where mail for one recipient goes.

    ``mailboxes`` maps each local Maildir to the address written in its
    Delivered-To header; ``remote`` holds forwarding addresses to relay.
    Both are in the form an SMTP path takes (quoted where needed).
    """

    mailboxes: Mapping[Mailbox, str]
    remote: frozenset[str]


class _WatchedFile(Generic[T]):
    """A file parsed again whenever its modification time, size or inode
    changes.

    A file that cannot be read raises :class:`DirectoryUnavailable` rather
    than answering from an older copy: an account removed, or a file made
    unreadable by mistake, must not go on as if nothing happened.
    """

    def __init__(self, path: Path | None, parse: Callable[[list[str]], T]) -> None:
        self._path = path
        self._parse = parse
        self._stamp: tuple[int, int, int] | None = None
        self._value = parse([])
        self._problem: str | None = None

    def get(self) -> T:
        if self._path is None:
            return self._value
        try:
            info = os.stat(self._path)
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
            if stamp != self._stamp:
                with open(self._path, encoding="utf-8") as lines:
                    self._value = self._parse(list(lines))
                self._stamp = None if _is_racy(info.st_mtime_ns) else stamp
        except (OSError, UnicodeDecodeError) as error:
            self._stamp = None
            problem = f"cannot read {self._path}: {getattr(error, 'strerror', None) or error}"
            self._report(problem)
            raise DirectoryUnavailable(problem) from None
        self._report(None)
        return self._value

    def _report(self, problem: str | None) -> None:
        """Log a problem once, not at every lookup."""
        if problem is not None and problem != self._problem:
            log.msg(problem)
        self._problem = problem


def _is_racy(mtime_ns: int) -> bool:
    return time.time() - mtime_ns / 1e9 < _RACY_SECONDS


def _content_lines(lines: Iterable[str]) -> Iterable[tuple[int, str]]:
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            yield number, text


def parse_users(lines: Iterable[str]) -> dict[str, str]:
    """``address -> password field`` from Dovecot passwd-file lines."""
    users: dict[str, str] = {}
    for _, text in _content_lines(lines):
        name, _, rest = text.partition(":")
        users[name.strip().lower()] = rest.split(":", 1)[0]
    return users


def parse_aliases(lines: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """``key -> targets``; keys are ``local``, ``local@domain`` or ``@domain``.

    Keys are lower-cased; targets keep their case, which matters for the
    local part of a remote address.  Targets that are not addresses are
    dropped with a log line.
    """
    aliases: dict[str, tuple[str, ...]] = {}
    for number, text in _content_lines(lines):
        key, colon, rest = text.partition(":")
        targets = tuple(_valid_targets(number, rest.split(",")))
        if not colon or not key.strip() or not targets:
            log.msg(f"aliases line {number} ignored: expected 'name: target, ...'")
            continue
        aliases[key.strip().lower()] = targets
    return aliases


def _valid_targets(number: int, targets: Iterable[str]) -> Iterable[str]:
    for target in (t.strip() for t in targets):
        if _TARGET.fullmatch(target):
            yield target
        elif target:
            log.msg(f"aliases line {number}: target {target!r} ignored: not a mail address")


@dataclass
class Directory:
    """The local domains and who receives mail in them."""

    local_domains: frozenset[str]
    delimiter: str = "+"
    users_file: Path | None = None
    aliases_file: Path | None = None
    _users: _WatchedFile[dict[str, str]] = field(init=False)
    _aliases: _WatchedFile[dict[str, tuple[str, ...]]] = field(init=False)

    def __post_init__(self) -> None:
        self.local_domains = frozenset(d.lower() for d in self.local_domains)
        self._users = _WatchedFile(self.users_file, parse_users)
        self._aliases = _WatchedFile(self.aliases_file, parse_aliases)

    def is_local(self, domain: str) -> bool:
        return domain.lower() in self.local_domains

    def users(self) -> Mapping[str, str]:
        """The current ``address -> password field`` table."""
        return self._users.get()

    def is_account(self, address: str) -> bool:
        return address.lower() in self._users.get()

    def postmaster_domain(self, hostname: str) -> str:
        """The domain of a bare ``RCPT TO:<postmaster>`` (RFC 5321 4.5.1).

        This host's name if it is a local domain, else the first local
        domain by name, so that the mail lands where the admin looks.
        """
        hostname = hostname.lower()
        if self.is_local(hostname) or not self.local_domains:
            return hostname
        return min(self.local_domains)

    def resolve(self, local: str, domain: str) -> Resolution:
        """Expand ``local@domain`` (a local domain) into its destinations.

        Raises UnknownRecipient, AliasLoop, or UnsafeMailboxName for a local
        part that could not be a directory under the spool, even if an
        alias or the catch-all would take it.
        """
        local = check_path_component(local.lower())
        expansion = _Expansion(self, self._users.get(), self._aliases.get())
        expansion.expand(local, domain.lower(), ())
        return Resolution(expansion.mailboxes, frozenset(expansion.remote))

    def candidates(self, local: str) -> tuple[str, ...]:
        """``local``, then ``local`` without its ``+tag`` if it has one."""
        if self.delimiter and self.delimiter in local:
            base = local.split(self.delimiter, 1)[0]
            if base:
                return (local, base)
        return (local,)


@dataclass
class _Expansion:
    """One recipient's alias expansion, against one snapshot of the files."""

    directory: Directory
    users: Mapping[str, str]
    aliases: Mapping[str, tuple[str, ...]]
    mailboxes: dict[Mailbox, str] = field(default_factory=dict)
    remote: set[str] = field(default_factory=set)

    def expand(self, local: str, domain: str, chain: tuple[str, ...]) -> None:
        """Add the destinations of ``local@domain``; ``chain`` holds the
        aliases that led here."""
        address = f"{local}@{domain}"
        if address in chain:
            self._deliver(local, domain, AliasLoop)
            return
        targets = self._alias_targets(local, domain)
        if targets is None:
            self._deliver(local, domain, UnknownRecipient)
            return
        if len(chain) >= MAX_DEPTH:
            raise AliasLoop(address)
        for target in targets:
            self._follow(target, domain, chain + (address,))

    def _follow(self, target: str, domain: str, chain: tuple[str, ...]) -> None:
        """A bare local part stays in the domain of the alias it came from."""
        target_local, at, target_domain = target.rpartition("@")
        if not at:
            target_local, target_domain = target, domain
        target_domain = target_domain.lower()
        if self.directory.is_local(target_domain):
            self.expand(target_local.lower(), target_domain, chain)
        else:
            self.remote.add(_path(target_local, target_domain))

    def _alias_targets(self, local: str, domain: str) -> tuple[str, ...] | None:
        """The targets of the first alias in lookup order; None when an
        account (or postmaster, or nothing) comes first."""
        for candidate in self.directory.candidates(local):
            for key in (f"{candidate}@{domain}", candidate):
                if key in self.aliases:
                    return self.aliases[key]
            if f"{candidate}@{domain}" in self.users:
                return None
        return self.aliases.get(f"@{domain}")

    def _deliver(self, local: str, domain: str, missing: type[LookupError]) -> None:
        """Deliver to the account of ``local`` (or postmaster), else raise
        ``missing``."""
        candidates = self.directory.candidates(local)
        for candidate in candidates:
            if f"{candidate}@{domain}" in self.users:
                break
        else:
            if POSTMASTER not in candidates:
                raise missing(f"{local}@{domain}")
            candidate = POSTMASTER
        mailbox = Mailbox(check_path_component(domain), check_path_component(candidate))
        self.mailboxes.setdefault(mailbox, _path(local, domain))


def _path(local: str, domain: str) -> str:
    """``local@domain`` as SMTP writes it, quoting the local part if needed."""
    return str(Address(local.encode("utf-8"), domain.encode("utf-8")))


__all__ = [
    "AliasLoop",
    "DirectoryUnavailable",
    "Directory",
    "Mailbox",
    "Resolution",
    "UnknownRecipient",
    "UnsafeMailboxName",
]
