"""A server session in memory: our MTAServer or Twisted's ESMTP, a client
that sends exactly the bytes it is given, and a delivery avatar that
records what reaches it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from twisted.cred.checkers import (
    AllowAnonymousAccess,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.mail import smtp
from twisted.mail._cred import PLAINCredentials
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.mail.protocols import DomainDeliveryBase
from zope.interface import implementer

from tests.helpers.replies import Reply
from twisted_mta.smtp.limits import ConnectionLimits, ServerSettings
from twisted_mta.smtp.realm import ITransactionDelivery
from twisted_mta.smtp.server import MTAServer

HOSTNAME = "mx.example.test"
EHLO = b"EHLO client.example.org"
SMUGGLED = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nsmuggled\r\n"
SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r"]
SETTINGS = ServerSettings(
    hostname=HOSTNAME,
    listener="smtp",
    max_message_size=1 << 20,
    max_recipients=100,
    idle_timeout=300.0,
    max_errors=1000,
    max_junk_commands=1_000_000,  # tests that pipeline thousands of RSETs
)


# -- a delivery avatar that records what reaches it ------------------------


@implementer(IMessageSMTP)
@dataclass
class RecordedMessage:
    """Twisted's one-message-per-recipient ``IMessage``."""

    delivery: RecordingDelivery
    lines: list[bytes] = field(default_factory=list)

    def lineReceived(self, line: bytes) -> None:
        # The first line is our Received header; the body comes after.
        if self.lines and self.delivery.line_error is not None:
            raise self.delivery.line_error
        self.lines.append(line)

    def eomReceived(self):
        if self.delivery.eom_error is not None:
            return defer.fail(self.delivery.eom_error)
        self.delivery.messages.append(b"".join(line + b"\n" for line in self.lines))
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self.delivery.discarded += 1


@implementer(IMessageDelivery)
@dataclass
class RecordingDelivery:
    """Accepts everyone; with ``asynchronous``, validators answer later."""

    asynchronous: bool = False
    sender_error: Exception | None = None
    recipient_error: Exception | None = None
    line_error: Exception | None = None
    eom_error: Exception | None = None
    messages: list[bytes] = field(default_factory=list)
    opened: int = 0
    discarded: int = 0
    pending: deque = field(default_factory=deque)

    def receivedHeader(self, helo, origin, recipients) -> bytes:
        return b"Received: by test"

    def validateFrom(self, helo, origin):
        if self.sender_error is not None:
            raise self.sender_error
        return self._answer(origin)

    def validateTo(self, user):
        if self.recipient_error is not None:
            raise self.recipient_error
        return self._answer(self._new_message)

    def _new_message(self) -> RecordedMessage:
        self.opened += 1
        return RecordedMessage(self)

    def _answer(self, value):
        if not self.asynchronous:
            return value
        d: defer.Deferred = defer.Deferred()
        self.pending.append((d, value))
        return d

    def settle(self) -> None:
        """Answer the outstanding validations, oldest first, until none is left."""
        while self.pending:
            d, value = self.pending.popleft()
            d.callback(value)


class TwistedStyleDelivery(RecordingDelivery):
    """Writes its Received header like Twisted's own domains do (S9)."""

    user = None
    host = HOSTNAME.encode()
    protocolName = b"esmtp"
    receivedHeader = DomainDeliveryBase.receivedHeader


@dataclass
class WholeMessage:
    """The one message an ``ITransactionDelivery`` opens for all recipients."""

    delivery: TransactionDelivery
    received: bytes
    chunks: list[bytes] = field(default_factory=list)

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def eomReceived(self):
        if self.delivery.eom_error is not None:
            return defer.fail(self.delivery.eom_error)
        self.delivery.messages.append(self.received + b"".join(self.chunks))
        return defer.succeed(self.delivery.queue_id)

    def connectionLost(self) -> None:
        self.delivery.discarded += 1


@implementer(ITransactionDelivery)
class TransactionDelivery(RecordingDelivery):
    queue_id = "TESTID"
    utf8 = False
    body = "7BIT"
    whole_messages = 0

    def open_message(self, received: bytes) -> WholeMessage:
        self.whole_messages += 1
        return WholeMessage(self, received)


@implementer(IRealm)
@dataclass
class Realm:
    delivery: RecordingDelivery

    def requestAvatar(self, avatarId, mind, *interfaces):
        return IMessageDelivery, self.delivery, lambda: None


# -- the two servers and a client for them ---------------------------------


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """Remembers where in the output ``startTLS`` was called."""

    tls_started_at: int | None = None

    def startTLS(self, contextFactory, normal=True) -> None:
        self.tls_started_at = len(self.value())

    def written_inside_tls(self) -> bytes:
        return self.value()[self.tls_started_at :]


CONTEXT = object()  # a server context factory, as far as ESMTP can tell
CHALLENGERS = {b"PLAIN": PLAINCredentials}


def our_server(portal, tls: bool) -> MTAServer:
    context = CONTEXT if tls else None
    server = MTAServer(SETTINGS, ConnectionLimits(100, 100), dict(CHALLENGERS), context)
    server.portal = portal
    return server


def twisted_server(portal, tls: bool) -> smtp.ESMTP:
    server = smtp.ESMTP(dict(CHALLENGERS), CONTEXT if tls else None)
    server.host = HOSTNAME.encode()
    server.timeout = SETTINGS.idle_timeout
    server.portal = portal
    return server


@dataclass
class Client:
    server: smtp.ESMTP
    transport: StringTransport
    delivery: RecordingDelivery
    clock: task.Clock
    crashed: bool = False
    _read: int = 0

    def send(self, data: bytes) -> None:
        """What the reactor does: an exception drops the connection."""
        try:
            self.server.dataReceived(data)
        except Exception:
            self.crashed = True
            self.transport.loseConnection()

    def replies(self) -> list[Reply]:
        """The replies sent since the last call."""
        output = self.transport.value()
        fresh, self._read = output[self._read :], len(output)
        replies, lines = [], []
        for line in fresh.split(b"\r\n")[:-1]:
            lines.append(line[4:])
            if line[3:4] == b" ":
                replies.append(Reply(int(line[:3]), lines))
                lines = []
        assert not lines, fresh
        return replies

    def codes(self) -> list[int]:
        return [reply.code for reply in self.replies()]

    def reply(self) -> Reply:
        """The one reply sent since the last call."""
        replies = self.replies()
        assert len(replies) == 1, replies
        return replies[0]

    def command(self, line: bytes) -> Reply:
        self.send(line + b"\r\n")
        return self.reply()

    def start_data(self, *recipients: bytes) -> None:
        """EHLO, MAIL, RCPT for each recipient (default alice), DATA."""
        assert self.command(EHLO).code == 250
        assert self.command(b"MAIL FROM:<sender@example.org>").code == 250
        for recipient in recipients or [b"alice@example.test"]:
            assert self.command(b"RCPT TO:<" + recipient + b">").code == 250
        assert self.command(b"DATA").code == 354


def recording_portal(delivery: RecordingDelivery) -> Portal:
    checkers = [AllowAnonymousAccess(), InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")]
    return Portal(Realm(delivery), checkers)


def open_session(server, delivery=None, transport=None) -> Client:
    """Connect ``server`` to an in-memory transport and read its greeting."""
    clock = task.Clock()
    server.callLater = clock.callLater
    transport = transport or StringTransport()
    server.makeConnection(transport)
    client = Client(server, transport, delivery, clock)
    assert client.codes() == [220]
    return client


def connect_to(make_server, delivery=None, tls: bool = False) -> Client:
    delivery = delivery or RecordingDelivery()
    server = make_server(recording_portal(delivery), tls)
    return open_session(server, delivery, TLSStringTransport() if tls else None)
