"""Who may send what where: the cred realm and the per-transaction policy.

Every session, anonymous or authenticated, logs in through the portal with
its ``Session`` as the cred *mind*; the realm answers with an
``IMessageDeliveryFactory`` bound to that session and avatar, and each MAIL
gets a fresh ``Transaction`` (Twisted's ``IMessageDelivery``), which decides
on each recipient:

* a local domain, or ``<postmaster>`` without one: resolved through the
  directory (550 5.1.1 unknown, 550 5.4.6 alias loop, 550 5.1.3 a name that
  could not be a Maildir, 451 4.3.0 while the users or aliases file cannot
  be read);
* any other domain: relayed if the client is in ``[relay] networks`` or
  authenticated, else 554 5.7.1.  Relayed recipients go to the queue.

Each mailbox and each remote address is kept once per transaction, however
many RCPTs or aliases lead to it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twisted.cred.checkers import ANONYMOUS
from twisted.cred.portal import IRealm
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from twisted.mail.smtp import SMTPServerError
from zope.interface import Attribute, implementer

from twisted_mta.directory.resolve import AliasLoop, Directory, UnknownRecipient
from twisted_mta.directory.watched import DirectoryUnavailable
from twisted_mta.intake.spool import IncomingMessage, Spool
from twisted_mta.mail.address import Address
from twisted_mta.mail.mailbox import Mailbox, UnsafeMailboxName
from twisted_mta.mail.received import TraceInfo, received_header
from twisted_mta.storage.envelope import Envelope, new_queue_id

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refusal(SMTPServerError):
    """A reply the server sends as it is: ``code`` and ``enhanced text``."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(code, f"{enhanced} {text}")


class ITransactionDelivery(IMessageDelivery):
    """An ``IMessageDelivery`` that stores one copy for all its recipients.

    The server prefers ``open_message`` to Twisted's one ``IMessage`` per
    recipient, which costs lines x recipients calls on the reactor.
    """

    queue_id = Attribute("The id of this transaction, in logs and headers.")

    def open_message(received: bytes) -> IncomingMessage:
        """Start the message for every accepted recipient."""


@dataclass
class Session:
    """What the server knows about a connection; the cred mind."""

    listener: str
    client_ip: str
    helo: bytes | None = None
    esmtp: bool = False
    tls: str | None = None
    user: str | None = None

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


@implementer(IRealm)
@dataclass(frozen=True)
class MailRealm:
    """Avatars are delivery factories bound to a session and a login."""

    system: MailSystem

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMessageDeliveryFactory not in interfaces:
            raise NotImplementedError("only IMessageDeliveryFactory is offered")
        user = None if avatarId is ANONYMOUS else _text(avatarId)
        factory = SessionDelivery(self.system, mind, user)
        return IMessageDeliveryFactory, factory, _no_logout


def _temporarily(lookup: Callable, *args):
    """Run a directory lookup; a file that cannot be read is a 451, not a 5xx."""
    try:
        return lookup(*args)
    except DirectoryUnavailable:
        raise Refusal(451, "4.3.0", "Temporary lookup failure") from None


def _no_logout() -> None:
    return None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


@implementer(IMessageDeliveryFactory)
@dataclass(frozen=True)
class SessionDelivery:
    system: MailSystem
    session: Session
    user: str | None

    def getMessageDelivery(self) -> Transaction:
        return Transaction(self.system, self.session, self.user)


@implementer(ITransactionDelivery)
@dataclass
class Transaction:
    """One MAIL ... DATA exchange and where its recipients' mail goes."""

    system: MailSystem
    session: Session
    user: str | None
    queue_id: str = field(default_factory=new_queue_id)
    sender: str = ""
    utf8: bool = False
    body: str = "7BIT"
    mailboxes: dict[Mailbox, str] = field(default_factory=dict)
    remote: list[str] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)

    def validateFrom(self, helo, origin):
        if self.user is not None and not _temporarily(self._owned_by_user, origin):
            raise Refusal(
                553, "5.7.1", f"<{origin}>: Sender address rejected: not owned by user {self.user}"
            )
        self.sender = str(origin)
        return origin

    def _owned_by_user(self, origin) -> bool:
        """The login, its +tag variants, and local aliases delivering to it."""
        if not origin.domain:
            return False
        login = self.user.lower()
        local = origin.local.decode("utf-8").lower()
        domain = origin.domain.decode("utf-8").lower()
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

    def validateTo(self, user) -> Callable[[], IncomingMessage]:
        address = user.dest
        directory = self.system.directory
        # RFC 5321 4.5.1: <postmaster> without a domain is always accepted.
        domain = address.domain.decode("utf-8") or directory.postmaster_domain(
            self.system.hostname
        )
        recipient = str(Address(address.local, domain.encode("utf-8")))
        if not address.domain or directory.is_local(domain):
            _temporarily(self._accept_local, address.local.decode("utf-8"), domain, recipient)
        elif self.user is not None or self.session.client_in(self.system.relay_networks):
            self._add_remote([recipient])
        else:
            raise Refusal(554, "5.7.1", f"<{recipient}>: Relay access denied")
        self.recipients.append(recipient)
        return lambda: self.open_message(self.receivedHeader(user.helo, user.orig, [user]))

    def _accept_local(self, local: str, domain: str, recipient: str) -> None:
        try:
            resolution = self.system.directory.resolve(local, domain)
        except UnknownRecipient:
            raise Refusal(
                550, "5.1.1", f"<{recipient}>: Recipient address rejected: User unknown"
            ) from None
        except AliasLoop:
            raise Refusal(550, "5.4.6", f"<{recipient}>: Alias expansion loop") from None
        except UnsafeMailboxName:
            raise Refusal(
                550, "5.1.3", "Recipient address rejected: bad mailbox name"
            ) from None
        # A mailbox reached twice, by two RCPTs or two aliases, gets one copy.
        for mailbox, delivered_to in resolution.mailboxes.items():
            self.mailboxes.setdefault(mailbox, delivered_to)
        self._add_remote(sorted(resolution.remote))

    def _add_remote(self, addresses: Sequence[str]) -> None:
        self.remote.extend(a for a in addresses if a not in self.remote)

    def receivedHeader(self, helo, origin, recipients) -> bytes:
        single = self.recipients[0] if len(self.recipients) == 1 else None
        return received_header(
            TraceInfo(
                helo=self.session.helo,
                client_ip=self.session.client_ip,
                hostname=self.system.hostname,
                queue_id=self.queue_id,
                esmtp=self.session.esmtp,
                tls=self.session.tls,
                authenticated=self.user is not None,
                user=self.user if self.system.received_user and self.user.isprintable() else None,
                recipient=single,
                utf8=self.utf8,
            )
        )

    def open_message(self, received: bytes) -> IncomingMessage:
        envelope = Envelope(
            sender=self.sender,
            remote=tuple(self.remote),
            client={"ip": self.session.client_ip, "listener": self.session.listener},
            body=self.body,
            smtputf8=self.utf8,
            authenticated=self.user,
        )
        return self.system.spool.open_message(
            self.queue_id, self.mailboxes, envelope, received
        )
