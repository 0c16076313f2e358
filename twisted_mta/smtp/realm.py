"""The cred realm of the SMTP server: a thin adapter over the intake.

Every session, anonymous or authenticated, logs in through the portal with
its intake ``Session`` as the cred *mind*; the realm answers with an
``IMessageDeliveryFactory`` bound to that session and login, and each MAIL
gets a fresh :class:`SMTPTransaction`: Twisted's ``IMessageDelivery``
(``validateFrom``, ``validateTo``, ``receivedHeader``) answered by an
intake :class:`~twisted_mta.intake.acceptance.Transaction`, which decides
for SMTP exactly as it does for the maildrop and for bounces.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.cred.checkers import ANONYMOUS
from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from zope.interface import Attribute, implementer

from twisted_mta.intake.acceptance import MailSystem, Session, Transaction
from twisted_mta.intake.policies import PolicyChain
from twisted_mta.intake.spool import IncomingMessage
from twisted_mta.mail.received import TraceInfo, received_header


class ITransactionDelivery(IMessageDelivery):
    """An ``IMessageDelivery`` that stores one copy for all its recipients.

    The server prefers ``open_message`` to Twisted's one ``IMessage`` per
    recipient, which costs lines x recipients calls on the reactor.
    """

    queue_id = Attribute("The id of this transaction, in logs and headers.")
    utf8 = Attribute("Whether MAIL asked for SMTPUTF8; set by the server.")
    body = Attribute("MAIL's BODY= (7BIT or 8BITMIME); set by the server.")
    mail_params = Attribute("MAIL's parameters, for the policies; set by the server.")

    def open_message(received: bytes) -> IncomingMessage:
        """Start the message for every accepted recipient."""


@implementer(IRealm)
class MailRealm:
    """Avatars are delivery factories bound to a session and a login."""

    def __init__(self, system: MailSystem) -> None:
        self.system = system

    @property
    def policies(self) -> PolicyChain:
        """The policy plugins, for the stages before a transaction."""
        return self.system.policies

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMessageDeliveryFactory not in interfaces:
            raise NotImplementedError("only IMessageDeliveryFactory is offered")
        user = None if avatarId is ANONYMOUS else _text(avatarId)
        factory = SessionDelivery(self.system, mind, user)
        return IMessageDeliveryFactory, factory, _no_logout


def _no_logout() -> None:
    return None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


@implementer(IMessageDeliveryFactory)
class SessionDelivery:
    """One session's login: each MAIL starts a transaction as this user."""

    def __init__(self, system: MailSystem, session: Session, user: str | None) -> None:
        self.system = system
        self.session = session
        self.user = user

    def getMessageDelivery(self) -> SMTPTransaction:
        return SMTPTransaction(Transaction(self.system, self.session, self.user))


@implementer(ITransactionDelivery)
class SMTPTransaction:
    """Twisted's view of one intake transaction."""

    def __init__(self, transaction: Transaction) -> None:
        self.transaction = transaction
        self.mail_params: dict[str, str | None] = {}

    @property
    def queue_id(self) -> str:
        return self.transaction.queue_id

    @property
    def utf8(self) -> bool:
        return self.transaction.utf8

    @utf8.setter
    def utf8(self, value: bool) -> None:
        self.transaction.utf8 = value

    @property
    def body(self) -> str:
        return self.transaction.body

    @body.setter
    def body(self, value: str) -> None:
        self.transaction.body = value

    def validateFrom(self, helo, origin) -> defer.Deferred:
        d = self.transaction.accept_sender(origin, self.mail_params)
        return d.addCallback(lambda _: origin)

    def validateTo(self, user) -> defer.Deferred[Callable[[], IncomingMessage]]:
        d = self.transaction.accept_recipient(user.dest, getattr(user, "params", {}))
        return d.addCallback(
            lambda _: lambda: self.open_message(self.receivedHeader(user.helo, user.orig, [user]))
        )

    def receivedHeader(self, helo, origin, recipients) -> bytes:
        transaction = self.transaction
        session, system, user = transaction.session, transaction.system, transaction.user
        single = transaction.recipients[0] if len(transaction.recipients) == 1 else None
        return received_header(
            TraceInfo(
                helo=session.helo,
                client_ip=session.client_ip,
                hostname=system.hostname,
                queue_id=transaction.queue_id,
                esmtp=session.esmtp,
                tls=session.tls,
                authenticated=user is not None,
                user=user if system.received_user and user.isprintable() else None,
                recipient=single,
                utf8=transaction.utf8,
            )
        )

    def open_message(self, received: bytes) -> IncomingMessage:
        return self.transaction.open(received)
