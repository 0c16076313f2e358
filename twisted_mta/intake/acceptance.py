"""Acceptance: who may send what where, for every way into the server.

SMTP sessions (through :mod:`twisted_mta.smtp.realm`), the maildrop and
our own bounces (through :mod:`twisted_mta.intake.inject`) all offer mail
here the same way: a :class:`Transaction` on a :class:`Session` takes a
sender, then decides on each recipient:

* a local domain, or ``<postmaster>`` without one: resolved through the
  directory (550 5.1.1 unknown, 550 5.4.6 alias loop, 550 5.1.3 a name that
  could not be a Maildir, 451 4.3.0 while the users or aliases file cannot
  be read);
* any other domain: relayed if the client is in ``[relay] networks``,
  authenticated, or local (the maildrop, like Postfix's pickup), else
  554 5.7.1.  Relayed recipients go to the queue.

A refusal is a :class:`Refusal`, the reply SMTP sends as it is.  Each
mailbox and each remote address is kept once per transaction, however
many recipients or aliases lead to it; :meth:`Transaction.open` then
starts the one durable copy in the spool.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twisted_mta.directory.resolve import AliasLoop, Directory, UnknownRecipient
from twisted_mta.directory.watched import DirectoryUnavailable
from twisted_mta.intake.refusal import Refusal
from twisted_mta.intake.spool import IncomingMessage, Spool
from twisted_mta.mail.address import Address, NullAddress
from twisted_mta.mail.mailbox import Mailbox, UnsafeMailboxName
from twisted_mta.storage.envelope import Envelope, new_queue_id

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Session:
    """What is known about the client of a transaction.

    ``listener`` is the way in: ``smtp``, ``submission``, ``submissions``,
    or, for mail that did not come over the network, ``sendmail``,
    ``bounce`` or ``double-bounce`` with ``local`` set.
    """

    listener: str
    client_ip: str
    helo: bytes | None = None
    esmtp: bool = False
    tls: str | None = None
    user: str | None = None
    local: bool = False

    def client_in(self, networks: Sequence[Network]) -> bool:
        try:
            address = ipaddress.ip_address(self.client_ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in networks)


@dataclass(frozen=True)
class MailSystem:
    """The parts every transaction needs."""

    hostname: str
    directory: Directory
    spool: Spool
    relay_networks: Sequence[Network]
    received_user: bool = False
    max_hops: int = 0


def _temporarily(lookup: Callable, *args):
    """Run a directory lookup; a file that cannot be read is a 451, not a 5xx."""
    try:
        return lookup(*args)
    except DirectoryUnavailable:
        raise Refusal(451, "4.3.0", "Temporary lookup failure") from None


@dataclass
class Transaction:
    """One message on its way in: its sender, where its recipients' mail
    goes, and, once opened, its durable copy."""

    system: MailSystem
    session: Session
    user: str | None = None
    queue_id: str = field(default_factory=new_queue_id)
    sender: str = ""
    utf8: bool = False
    body: str = "7BIT"
    mailboxes: dict[Mailbox, str] = field(default_factory=dict)
    remote: list[str] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)

    def accept_sender(self, sender: Address | NullAddress) -> None:
        """Take the envelope sender; an authenticated user may only use
        addresses that are theirs.  Raises :class:`Refusal`."""
        if self.user is not None and not _temporarily(self._owned_by_user, sender):
            raise Refusal(
                553, "5.7.1", f"<{sender}>: Sender address rejected: not owned by user {self.user}"
            )
        self.sender = str(sender)

    def _owned_by_user(self, sender: Address | NullAddress) -> bool:
        """The login, its +tag variants, and local aliases delivering to it."""
        if not sender.domain:
            return False
        login = self.user.lower()
        local = sender.local.decode("utf-8").lower()
        domain = sender.domain.decode("utf-8").lower()
        directory = self.system.directory
        if any(f"{candidate}@{domain}" == login for candidate in directory.candidates(local)):
            return True
        if not directory.is_local(domain):
            return False
        try:
            resolution = directory.resolve(local, domain)
        except (UnknownRecipient, AliasLoop, UnsafeMailboxName):
            return False
        return any(mailbox.address == login for mailbox in resolution.mailboxes)

    def accept_recipient(self, recipient: Address) -> str:
        """Route one recipient: to local mailboxes, to the queue, or a
        :class:`Refusal`.  Returns the recipient as it is logged."""
        directory = self.system.directory
        # RFC 5321 4.5.1: <postmaster> without a domain is always accepted.
        domain = recipient.domain.decode("utf-8") or directory.postmaster_domain(
            self.system.hostname
        )
        path = str(Address(recipient.local, domain.encode("utf-8")))
        if not recipient.domain or directory.is_local(domain):
            _temporarily(self._accept_local, recipient.local.decode("utf-8"), domain, path)
        elif self._may_relay():
            self._add_remote([path])
        else:
            raise Refusal(554, "5.7.1", f"<{path}>: Relay access denied")
        self.recipients.append(path)
        return path

    def _may_relay(self) -> bool:
        session = self.session
        return (
            session.local
            or self.user is not None
            or session.client_in(self.system.relay_networks)
        )

    def _accept_local(self, local: str, domain: str, path: str) -> None:
        try:
            resolution = self.system.directory.resolve(local, domain)
        except UnknownRecipient:
            raise Refusal(
                550, "5.1.1", f"<{path}>: Recipient address rejected: User unknown"
            ) from None
        except AliasLoop:
            raise Refusal(550, "5.4.6", f"<{path}>: Alias expansion loop") from None
        except UnsafeMailboxName:
            raise Refusal(550, "5.1.3", "Recipient address rejected: bad mailbox name") from None
        # A mailbox reached twice, by two RCPTs or two aliases, gets one copy.
        for mailbox, delivered_to in resolution.mailboxes.items():
            self.mailboxes.setdefault(mailbox, delivered_to)
        self._add_remote(sorted(resolution.remote))

    def _add_remote(self, addresses: Sequence[str]) -> None:
        self.remote.extend(a for a in addresses if a not in self.remote)

    def open(self, received: bytes) -> IncomingMessage:
        """Start the one copy of the message for every accepted recipient;
        ``received`` is our trace header.  Raises ``StorageError``."""
        envelope = Envelope(
            sender=self.sender,
            remote=tuple(self.remote),
            client={"ip": self.session.client_ip, "listener": self.session.listener},
            body=self.body,
            smtputf8=self.utf8,
            authenticated=self.user,
        )
        return self.system.spool.open_message(self.queue_id, self.mailboxes, envelope, received)
