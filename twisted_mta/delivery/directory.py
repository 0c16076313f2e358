"""Who lives here: accounts from the users file, the aliases file, and the
lookup that turns a local recipient into mailboxes and forwarding targets.

Lookup order for ``local@domain`` (local parts are case-insensitive): the
exact ``local@domain`` alias, the bare ``local`` alias, the account, each
tried for the full local part and then for it without its ``+tag``; then the
domain's catch-all ``@domain``; then ``postmaster``, which always exists.
Aliases expand recursively up to ``MAX_DEPTH``; an alias that comes back to
itself delivers to the account of that name if there is one, else it is a
loop.  Both files are re-read when their modification time changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from twisted.python import log

from twisted_mta.delivery.maildir import UnsafeMailboxName, check_path_component

MAX_DEPTH = 10


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
    """

    mailboxes: Mapping[Mailbox, str]
    remote: frozenset[str]


class _WatchedFile:
    """A file parsed again whenever its modification time changes."""

    def __init__(self, path: Path | None, parse) -> None:
        self._path = path
        self._parse = parse
        self._stamp: tuple[int, int, int] | None = None
        self._value = parse([])

    def get(self):
        if self._path is None:
            return self._value
        try:
            info = os.stat(self._path)
        except OSError as error:
            log.msg(f"cannot read {self._path}: {error.strerror}; keeping the last copy")
            return self._value
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp != self._stamp:
            try:
                with open(self._path, encoding="utf-8") as lines:
                    self._value = self._parse(list(lines))
            except (OSError, UnicodeDecodeError) as error:
                log.msg(f"cannot read {self._path}: {error}; keeping the last copy")
                return self._value
            self._stamp = stamp
        return self._value


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
    """``key -> targets``; keys are ``local``, ``local@domain`` or ``@domain``."""
    aliases: dict[str, tuple[str, ...]] = {}
    for number, text in _content_lines(lines):
        key, colon, rest = text.partition(":")
        targets = tuple(t.strip().lower() for t in rest.split(",") if t.strip())
        if not colon or not key.strip() or not targets:
            log.msg(f"aliases line {number} ignored: expected 'name: target, ...'")
            continue
        aliases[key.strip().lower()] = targets
    return aliases


@dataclass
class Directory:
    """The local domains and who receives mail in them."""

    local_domains: frozenset[str]
    delimiter: str = "+"
    users_file: Path | None = None
    aliases_file: Path | None = None
    _users: _WatchedFile = field(init=False)
    _aliases: _WatchedFile = field(init=False)

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

    def resolve(self, local: str, domain: str) -> Resolution:
        """Expand ``local@domain`` (a local domain) into its destinations.

        Raises UnknownRecipient, AliasLoop, or UnsafeMailboxName for names
        that could not be a directory under the spool.
        """
        mailboxes: dict[Mailbox, str] = {}
        remote: set[str] = set()
        self._expand(local.lower(), domain.lower(), (), mailboxes, remote)
        return Resolution(mailboxes, frozenset(remote))

    def _expand(self, local, domain, chain, mailboxes, remote) -> None:
        address = f"{local}@{domain}"
        if len(chain) >= MAX_DEPTH:
            raise AliasLoop(address)
        users = self._users.get()
        if address in chain:
            if address not in users:
                raise AliasLoop(address)
            mailboxes.setdefault(_mailbox(local, domain), address)
            return
        targets = self._alias_targets(local, domain)
        if targets is None:
            mailboxes.setdefault(self._final_mailbox(local, domain, users), address)
            return
        for target in targets:
            target_local, at, target_domain = target.rpartition("@")
            if not at:
                target_local, target_domain = target, domain
            if self.is_local(target_domain):
                self._expand(
                    target_local, target_domain, chain + (address,), mailboxes, remote
                )
            else:
                remote.add(f"{target_local}@{target_domain}")

    def _alias_targets(self, local: str, domain: str) -> tuple[str, ...] | None:
        aliases = self._aliases.get()
        users = self._users.get()
        for candidate in self._candidates(local):
            for key in (f"{candidate}@{domain}", candidate):
                if key in aliases:
                    return aliases[key]
            if f"{candidate}@{domain}" in users:
                return None
        return aliases.get(f"@{domain}")

    def _final_mailbox(self, local: str, domain: str, users: Mapping) -> Mailbox:
        for candidate in self._candidates(local):
            if f"{candidate}@{domain}" in users:
                return _mailbox(candidate, domain)
        if local == "postmaster":
            return _mailbox(local, domain)
        raise UnknownRecipient(f"{local}@{domain}")

    def _candidates(self, local: str) -> tuple[str, ...]:
        if self.delimiter and self.delimiter in local:
            base = local.split(self.delimiter, 1)[0]
            if base:
                return (local, base)
        return (local,)


def _mailbox(local: str, domain: str) -> Mailbox:
    check_path_component(domain)
    check_path_component(local)
    return Mailbox(domain, local)


__all__ = [
    "AliasLoop",
    "Directory",
    "Mailbox",
    "Resolution",
    "UnknownRecipient",
    "UnsafeMailboxName",
]
