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

After our own checks the enabled policy plugins are asked (``mail_from``,
``rcpt_to``, and ``message`` before the message is acknowledged; see
:mod:`twisted_mta.intake.policies`); the authentication results they give
become one ``Authentication-Results`` header of our hostname.  A refusal is a :class:`Refusal`, the
reply SMTP sends as it is.  Each mailbox and each remote address is kept
once per transaction, however many recipients or aliases lead to it;
:meth:`Transaction.open` then starts the one durable copy in the spool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from twisted.internet import defer

from twisted_mta.directory.resolve import AliasLoop, Directory, UnknownRecipient
from twisted_mta.directory.watched import DirectoryUnavailable
from twisted_mta.intake.policies import (
    NO_POLICIES,
    Outcome,
    PolicyChain,
    header_lines,
    message_info,
    session_info,
)
from twisted_mta.intake.refusal import Refusal
from twisted_mta.intake.spool import IncomingMessage, Spool
from twisted_mta.interfaces import (
    DeliveryResult,
    EnvelopeInfo,
    Network,
    TransactionInfo,
    address_in,
)
from twisted_mta.mail import authresults
from twisted_mta.mail.address import Address, NullAddress
from twisted_mta.mail.mailbox import Mailbox, UnsafeMailboxName
from twisted_mta.storage.envelope import Envelope, new_queue_id


@dataclass(slots=True)
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
        return address_in(self.client_ip, networks)


@dataclass(frozen=True)
class MailSystem:
    """The parts every transaction needs."""

    hostname: str
    directory: Directory
    spool: Spool
    relay_networks: Sequence[Network]
    received_user: bool = False
    max_hops: int = 0
    policies: PolicyChain = NO_POLICIES


@dataclass(frozen=True)
class _Route:
    """Where one recipient's mail goes, before it is added."""

    path: str
    mailboxes: Mapping[Mailbox, str] = field(default_factory=dict)
    remote: Sequence[str] = ()


def _refused_by(outcome: Outcome) -> Outcome:
    verdict = outcome.refusal
    if verdict is not None:
        raise Refusal(verdict.code, verdict.enhanced, verdict.text)
    return outcome


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

    def accept_sender(
        self, sender: Address | NullAddress, params: Mapping[str, str | None] | None = None
    ) -> defer.Deferred[None]:
        """Take the envelope sender; an authenticated user may only use
        addresses that are theirs, then the policies are asked.  Fails
        with :class:`Refusal`."""
        return defer.maybeDeferred(self._accept_sender, sender, params or {})

    def _accept_sender(
        self, sender: Address | NullAddress, params: Mapping[str, str | None]
    ) -> defer.Deferred[None]:
        if self.user is not None and not _temporarily(self._owned_by_user, sender):
            raise Refusal(
                553, "5.7.1", f"<{sender}>: Sender address rejected: not owned by user {self.user}"
            )
        path = str(sender)
        policies = self.system.policies
        if not policies.has("mail_from"):
            self.sender = path
            return defer.succeed(None)
        d = policies.run("mail_from", session_info(self.session), path, dict(params))
        d.addCallback(_refused_by)
        d.addCallback(lambda _: setattr(self, "sender", path))
        return d

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

    def accept_recipient(
        self, recipient: Address, params: Mapping[str, str | None] | None = None
    ) -> defer.Deferred[str]:
        """Route one recipient (to local mailboxes, to the queue, or a
        :class:`Refusal`), then ask the policies.  Fires with the recipient
        as it is logged."""
        return defer.maybeDeferred(self._accept_recipient, recipient, params or {})

    def _accept_recipient(
        self, recipient: Address, params: Mapping[str, str | None]
    ) -> defer.Deferred[str]:
        route = self._route(recipient)
        policies = self.system.policies
        if not policies.has("rcpt_to"):
            return defer.succeed(self._add(route))
        d = policies.run(
            "rcpt_to", session_info(self.session), self.info(), route.path, dict(params)
        )
        d.addCallback(_refused_by)
        d.addCallback(lambda _: self._add(route))
        return d

    def _route(self, recipient: Address) -> _Route:
        directory = self.system.directory
        # RFC 5321 4.5.1: <postmaster> without a domain is always accepted.
        domain = recipient.domain.decode("utf-8") or directory.postmaster_domain(
            self.system.hostname
        )
        path = str(Address(recipient.local, domain.encode("utf-8")))
        if not recipient.domain or directory.is_local(domain):
            return _temporarily(self._route_local, recipient.local.decode("utf-8"), domain, path)
        if self._may_relay():
            return _Route(path, remote=[path])
        raise Refusal(554, "5.7.1", f"<{path}>: Relay access denied")

    def _may_relay(self) -> bool:
        session = self.session
        return (
            session.local
            or self.user is not None
            or session.client_in(self.system.relay_networks)
        )

    def _route_local(self, local: str, domain: str, path: str) -> _Route:
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
        return _Route(path, resolution.mailboxes, sorted(resolution.remote))

    def _add(self, route: _Route) -> str:
        # A mailbox reached twice, by two RCPTs or two aliases, gets one copy.
        for mailbox, delivered_to in route.mailboxes.items():
            self.mailboxes.setdefault(mailbox, delivered_to)
        self._add_remote(route.remote)
        self.recipients.append(route.path)
        return route.path

    def _add_remote(self, addresses: Sequence[str]) -> None:
        self.remote.extend(a for a in addresses if a not in self.remote)

    def info(self) -> TransactionInfo:
        return TransactionInfo(self.queue_id, self.sender, tuple(self.recipients))

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
        incoming = self.system.spool.open_message(
            self.queue_id, self.mailboxes, envelope, received
        )
        if self.system.policies.has("message"):
            incoming.review = self._review
        if self.system.policies.has("delivered") and self.mailboxes:
            incoming.after_storing = self._tell_delivered
        return incoming

    def _tell_delivered(self, incoming: IncomingMessage) -> None:
        """Local deliveries are final once stored."""
        envelope = self.envelope_info()
        result = DeliveryResult("sent", "local", "delivered to maildir")
        for delivered_to in sorted(set(self.mailboxes.values())):
            self.system.policies.run("delivered", envelope, delivered_to, result)

    def envelope_info(self) -> EnvelopeInfo:
        info = session_info(self.session)
        return EnvelopeInfo(
            self.queue_id,
            self.sender,
            tuple(self.recipients),
            info.client_ip,
            info.listener,
            self.user,
        )

    def _review(self, incoming: IncomingMessage) -> defer.Deferred[bytes]:
        """Ask the policies about the whole message; fires with the header
        lines they add, or fails with a :class:`Refusal`."""
        d = self.system.policies.run(
            "message",
            session_info(self.session),
            self.info(),
            message_info(incoming.open_stored, incoming.size),
        )
        d.addCallback(_refused_by)
        d.addCallback(self._added_lines)
        return d

    def _added_lines(self, outcome: Outcome) -> bytes:
        """The policies' headers, after one ``Authentication-Results`` of
        their results, if they gave any."""
        headers = outcome.headers
        if outcome.results:
            value = authresults.header_value(self.system.hostname, outcome.results)
            headers = ((authresults.NAME, value), *headers)
        return header_lines(headers)
