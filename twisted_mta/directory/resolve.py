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

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from twisted_mta.directory.aliases import parse_aliases
from twisted_mta.directory.users import parse_users
from twisted_mta.directory.watched import WatchedFile
from twisted_mta.mail.address import Address
from twisted_mta.mail.mailbox import Mailbox, check_path_component

MAX_DEPTH = 10
POSTMASTER = "postmaster"


class UnknownRecipient(LookupError):
    """No account, alias or catch-all takes this address."""


class AliasLoop(LookupError):
    """Alias expansion went round in a circle or too deep."""


@dataclass(frozen=True)
class Resolution:
    """Where mail for one recipient goes.

    ``mailboxes`` maps each local Maildir to the address written in its
    Delivered-To header; ``remote`` holds forwarding addresses to relay.
    Both are in the form an SMTP path takes (quoted where needed).
    """

    mailboxes: Mapping[Mailbox, str]
    remote: frozenset[str]


@dataclass
class Directory:
    """The local domains and who receives mail in them."""

    local_domains: frozenset[str]
    delimiter: str = "+"
    users_file: Path | None = None
    aliases_file: Path | None = None
    _users: WatchedFile[dict[str, str]] = field(init=False)
    _aliases: WatchedFile[dict[str, tuple[str, ...]]] = field(init=False)

    def __post_init__(self) -> None:
        self.local_domains = frozenset(d.lower() for d in self.local_domains)
        self._users = WatchedFile(self.users_file, parse_users)
        self._aliases = WatchedFile(self.aliases_file, parse_aliases)

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

