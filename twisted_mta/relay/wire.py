"""The SMTP client protocol on one connection: commands out, replies in.

:class:`SMTPConnection` is the wire side of a conversation whose words
are :mod:`twisted_mta.relay.session`'s: it parses replies into
:class:`Reply`, writes commands, layers TLS, streams the body
(:mod:`twisted_mta.relay.body`) and fails what is pending with a
:class:`LinkError` when the connection goes.

Twisted's ``ESMTPSender`` waits forever for a silent server (audit 4.5,
C8).  Here one watchdog timer keeps the timeouts of RFC 5321 4.5.3.2,
all in :class:`Timeouts`: each command reply, the greeting and the TLS
handshake; each block of the body; the reply to the final dot.  The TCP
connect is timed by :func:`~twisted_mta.relay.connect.connect_tcp`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import BinaryIO

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta.relay.body import BodyProducer
from twisted_mta.relay.connect import TLSCreator, start_tls
from twisted_mta.relay.outgoing import RecipientResult, RelayError, Timeouts

MAX_LINE = 4096
MAX_REPLY_LINES = 100
SENDING_BODY = "sending message body"

_REPLY_LINE = re.compile(rb"([1-5][0-9][0-9])([ -]|$)(.*)", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?=\s|$)")

__all__ = [
    "SENDING_BODY",
    "ConnectionFactory",
    "LinkError",
    "Reply",
    "SMTPConnection",
]


@dataclass(frozen=True)
class Reply:
    """A complete SMTP reply; ``lines`` hold the text after each code."""

    code: int
    lines: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join((str(self.code), *self.lines)).rstrip()

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def status(self) -> str:
        """The enhanced status code, or one derived from the reply code."""
        kind = str(self.code // 100)
        found = _ENHANCED.match(self.lines[0]) if self.lines else None
        if found is not None and found.group(1) == kind:
            return found.group(0)
        return f"{kind}.0.0"

    def verdict(self, address: str, command: str) -> RecipientResult:
        """What this reply means for ``address``; a reply that is neither
        positive nor 4xx/5xx is a temporary protocol error."""
        if self.code // 100 in (2, 4, 5):
            return RecipientResult(address, self.code, self.status, str(self), command)
        return RecipientResult(address, 451, "4.5.0", str(self), command)

    def error(self, command: str, remote: str) -> RelayError:
        """This reply as a failure of a whole transaction or session."""
        if self.code // 100 in (4, 5):
            return RelayError(self.code, self.status, str(self), command, remote)
        return RelayError(451, "4.5.0", str(self), command, remote)


class LinkError(Exception):
    """The connection failed under a pending operation.

    ``during_handshake`` tells a TLS handshake failure apart.
    """

    def __init__(self, what: str, during_handshake: bool = False) -> None:
        super().__init__(what)
        self.what = what
        self.during_handshake = during_handshake


@dataclass
class _Waiting:
    """Replies expected for commands already written."""

    count: int
    timeout: float
    deferred: Deferred[list[Reply]]
    replies: list[Reply] = field(default_factory=list)


@implementer(IHandshakeListener)
class SMTPConnection(Protocol):
    """The wire side of one SMTP client conversation.

    Reads replies (multi-line, bounded), writes commands (several in one
    write when pipelining), layers TLS, streams the body, and keeps one
    watchdog timer that aborts the connection when the remote is silent
    for longer than the step at hand allows.  Every pending Deferred fails
    with a :class:`LinkError` (or the body's :class:`RelayError`) when the
    connection goes.  Cancelling one drops the connection.
    """

    greeting: Deferred[Reply]

    def __init__(
        self, clock: IReactorTime, timeouts: Timeouts, implicit_tls: TLSCreator | None = None
    ) -> None:
        self._clock = clock
        self._timeouts = timeouts
        self._implicit_tls = implicit_tls
        self._buffer = b""
        self._lines: list[str] = []
        self._waiting: _Waiting | None = None
        self._handshake: Deferred[None] | None = None
        self._handshaking = False
        self._watchdog: IDelayedCall | None = None
        self._failure: Exception | None = None
        self._aborted = False
        self._lost = False
        self._closed_waiters: list[Deferred[None]] = []
        self._body: BodyProducer | None = None
        self.body_sent = False
        self.tls: str | None = None

    @property
    def usable(self) -> bool:
        return self._failure is None

    def makeConnection(self, transport: ITransport) -> None:
        """Connect once; a TLS layer put under us later only swaps the transport."""
        if self.transport is None:
            super().makeConnection(transport)
        else:
            self.transport = transport

    def connectionMade(self) -> None:
        if self._implicit_tls is not None:
            self._begin_tls(self._implicit_tls)
        self.greeting = self._expect(1, self._timeouts.command).addCallback(_first)

    def send_commands(self, lines: Sequence[bytes]) -> Deferred[list[Reply]]:
        """Write ``lines`` in one write; fires with their replies, in order."""
        if any(b"\r" in line or b"\n" in line for line in lines):
            raise ValueError("a command line cannot hold CR or LF")
        if self._failure is not None:
            return fail(self._failure)
        waiting = self._expect(len(lines), self._timeouts.command)
        self.transport.write(b"".join(line + b"\r\n" for line in lines))
        return waiting

    def command(self, line: bytes) -> Deferred[Reply]:
        return self.send_commands([line]).addCallback(_first)

    def start_tls(self, creator: TLSCreator) -> Deferred[None]:
        """Start a TLS handshake (after a 220 to STARTTLS)."""
        if self._failure is not None:
            return fail(self._failure)
        # Whatever followed the 220 was sent in clear: never act on it.
        self._buffer = b""
        self._handshake = Deferred(self._cancel)
        self._arm(self._timeouts.command)
        self._begin_tls(creator)
        return self._handshake

    def send_body(self, file: BinaryIO) -> Deferred[Reply]:
        """Stream the message after a 354; fires with the final reply."""
        if self._failure is not None:
            return fail(self._failure)
        self.body_sent = False
        waiting = self._expect(1, self._timeouts.data_end)
        self._body = BodyProducer(file, self.transport, self)
        self._body.start()
        return waiting.addCallback(_first)

    def quit(self) -> Deferred[None]:
        """QUIT if idle, else abort; fires once the connection is closed."""
        if self._failure is None and self._waiting is None:
            self.send_commands([b"QUIT"]).addBoth(self._hang_up)
        else:
            self._fail(LinkError("closed by us"))
        return self.when_closed()

    def abort(self) -> Deferred[None]:
        self._fail(LinkError("closed by us"))
        return self.when_closed()

    def when_closed(self) -> Deferred[None]:
        if self._lost:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._closed_waiters.append(waiter)
        return waiter

    # -- body producer callbacks

    def body_progress(self) -> None:
        self._arm(self._timeouts.data_block)

    def body_written(self) -> None:
        self._body = None
        self.body_sent = True
        self._arm(self._timeouts.data_end)

    def body_failed(self, error: RelayError) -> None:
        self._body = None
        self._fail(error)

    # -- Twisted callbacks

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while self._failure is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    self._fail(LinkError("reply line too long"))
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            self._line_received(line.removesuffix(b"\r"))

    def handshakeCompleted(self) -> None:
        self._handshaking = False
        connection = self.transport.getHandle()
        version, cipher = connection.get_protocol_version_name(), connection.get_cipher_name()
        self.tls = f"{version} with {cipher}"
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            self._disarm()
            handshake.callback(None)

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        self._disarm()
        if self._body is not None:
            self._body.stopProducing()
            self._body = None
        failure = self._failure or LinkError("lost connection")
        if self._handshaking:
            failure = LinkError(f"TLS handshake failed: {_tls_reason(reason, failure)}", True)
        self._failure = failure
        pending = [self._handshake, self._waiting.deferred if self._waiting else None]
        self._handshake = self._waiting = None
        for deferred in pending:
            if deferred is not None:
                deferred.errback(failure)
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- internals

    def _begin_tls(self, creator: TLSCreator) -> None:
        self._handshaking = True
        try:
            start_tls(self, creator, self._clock)
        except (SSL.Error, OSError) as error:
            self._fail(LinkError(f"cannot set up TLS: {error}"))

    def _expect(self, count: int, timeout: float) -> Deferred[list[Reply]]:
        if self._waiting is not None:
            raise RuntimeError("a command is already waiting for its reply")
        self._waiting = _Waiting(count, timeout, Deferred(self._cancel))
        self._arm(timeout)
        return self._waiting.deferred

    def _cancel(self, deferred: Deferred) -> None:
        """Whoever waited gave up: forget the Deferred, drop the connection."""
        if self._waiting is not None and self._waiting.deferred is deferred:
            self._waiting = None
        if self._handshake is deferred:
            self._handshake = None
        self._fail(LinkError("cancelled"))

    def _line_received(self, line: bytes) -> None:
        parsed = _REPLY_LINE.fullmatch(line)
        if parsed is None or len(self._lines) >= MAX_REPLY_LINES:
            self._fail(LinkError("malformed reply"))
            return
        self._lines.append(_printable(parsed.group(3)))
        if parsed.group(2) != b"-":
            reply = Reply(int(parsed.group(1)), tuple(self._lines))
            self._lines = []
            self._reply_received(reply)

    def _reply_received(self, reply: Reply) -> None:
        waiting = self._waiting
        if waiting is None:
            self._fail(LinkError(f"unexpected reply {reply}"))
            return
        if self._body is not None:
            self._premature_reply(waiting, reply)
            return
        waiting.replies.append(reply)
        if len(waiting.replies) < waiting.count:
            self._arm(waiting.timeout)
            return
        self._waiting = None
        self._disarm()
        waiting.deferred.callback(waiting.replies)

    def _premature_reply(self, waiting: _Waiting, reply: Reply) -> None:
        """A reply while the body is still going out: take a refusal as
        the verdict, anything else as a protocol error; either way the
        conversation is out of step, so the connection goes."""
        self._body.stopProducing()
        self._body = None
        self._waiting = None
        error = LinkError(f"premature reply {reply} while {SENDING_BODY}")
        self._fail(error)
        if reply.code >= 400:
            waiting.deferred.callback([reply])
        else:
            waiting.deferred.errback(error)

    def _hang_up(self, _: object) -> None:
        if self._failure is None:
            self._failure = LinkError("closed by us")
            self._arm(self._timeouts.command)
            self.transport.loseConnection()

    def _fail(self, error: Exception) -> None:
        """Record why the connection goes, and drop it."""
        if self._failure is None:
            self._failure = error
        if not self._aborted and not self._lost:
            self._aborted = True
            self.transport.abortConnection()

    def _timed_out(self) -> None:
        self._watchdog = None
        self._fail(LinkError("timed out"))

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._watchdog = self._clock.callLater(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


def _first(replies: list[Reply]) -> Reply:
    return replies[0]


def _printable(text: bytes) -> str:
    decoded = text.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in decoded)


def _tls_reason(reason: Failure, failure: Exception) -> str:
    if isinstance(failure, LinkError) and failure.what != "lost connection":
        return failure.what
    if reason.check(VerificationError):
        return "certificate does not match the host name"
    if reason.check(SSL.Error):
        errors = reason.value.args[0] if reason.value.args else []
        if not isinstance(errors, list):
            errors = []
        details = [str(e[-1]) for e in errors if isinstance(e, tuple) and e]
        return ", ".join(details) or "TLS error"
    return "connection closed"


class ConnectionFactory(Factory):
    """Builds the :class:`SMTPConnection` of one attempt."""

    noisy = False

    def __init__(
        self, clock: IReactorTime, timeouts: Timeouts, implicit_tls: TLSCreator | None = None
    ) -> None:
        self._build = partial(SMTPConnection, clock, timeouts, implicit_tls)

    def buildProtocol(self, addr: object) -> SMTPConnection:
        return self._build()

