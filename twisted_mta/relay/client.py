"""The relay's outbound ESMTP client.

Twisted's ``ESMTPSender`` cannot relay safely (audit 4.5): it dot-stuffs
each 16 KiB chunk on its own and never the first line (C1, C2), forwards
bare CR (C3), ignores SIZE, 8BITMIME, SMTPUTF8 and PIPELINING (C4, C5),
has no opportunistic TLS and authenticates in clear when STARTTLS is
stripped (C6), retries at once (C7) and waits forever (C8).  This is our
own client, on a plain ``Protocol``.

API
---
::

    session = await open_session(reactor, target, helo_name, timeouts)
    result = await session.send(outgoing)      # as often as needed
    await session.close()                      # QUIT
    result = await deliver(reactor, target, helo_name, outgoing, timeouts)

* :class:`RelayTarget` is one host: its name (what TLS verifies and logs
  show), its addresses in the order to try, port, TLS mode (see
  :mod:`twisted_mta.relay.connect`) and smart host credentials.
* :func:`open_session` fires with a :class:`RelaySession` from the first
  address whose server greets and completes EHLO (HELO if EHLO gets a
  5xx), STARTTLS and AUTH; or fails with a :class:`RelayError` carrying a
  status: temporary (``4.4.1`` no connection, ``4.4.2`` timeout or lost
  connection, ``4.7.x`` TLS or AUTH trouble) or permanent (a 5xx greeting
  or HELO).  Its ``remote`` is None when no connection was made.
* :meth:`RelaySession.send` fires with an :class:`AttemptResult`, one
  :class:`RecipientResult` per recipient in order, and never fails.  One
  message at a time; after the first, each transaction starts with RSET.
  ``session.usable`` says whether the connection can carry another one.
* :meth:`RelaySession.close` sends QUIT and fires once the connection is
  closed (or abandoned after a timeout); it never fails.
* :func:`deliver` is open + send + close; failures to open become results.
* A :class:`RecipientResult` has ``code`` and ``status`` (the verdict:
  ``delivered`` for 2.x.x, ``permanent`` for 5.x.x, else retry later) and
  ``text``: the remote's reply verbatim when ``in_reply_to`` names the
  command it answered (``"RCPT TO"``, ``"end of DATA"``, ``"greeting"``
  ...), for a DSN's Diagnostic-Code; else our own Postfix-worded reason
  ("connect to mx[192.0.2.1]:25: Connection refused").
* Cancelling what :func:`open_session`, :meth:`RelaySession.send` or
  :func:`deliver` returned drops the connection (it fails with
  ``CancelledError``).
* The reactor given is the one everything runs on, TLS included, so tests
  can drive a reactor of their own.

Rules
-----
* Smart host (``"starttls"``, ``"implicit"``): nothing but EHLO and
  STARTTLS before verified TLS; STARTTLS missing or refused, or a
  certificate that does not verify, is a temporary ``4.7.x``.  AUTH (PLAIN,
  else LOGIN) only inside TLS, or in clear when the mode is ``"none"``;
  a failed AUTH is temporary (``4.7.8``), like Postfix's soft bounce.
* MX host (``"may"``): STARTTLS when offered, unverified; a refused
  STARTTLS continues in clear; a failed handshake is retried once on the
  same address without TLS.
* Before MAIL: the message's size against the server's SIZE (``5.3.4``);
  8-bit content needs 8BITMIME (``5.6.3``); an internationalised message
  needs SMTPUTF8 (``5.6.7`` for non-ASCII addresses, else ``5.6.9``).
  Nothing is sent then and nothing is converted.
* With PIPELINING, MAIL, every RCPT and DATA go in one write (RFC 2920).
* Per recipient: its RCPT reply if that was not 2xx, else the reply to
  DATA or to the final dot.  A connection lost or a timeout leaves every
  undecided recipient temporary ``4.4.2``.
* The body streams from the queue file in :data:`CHUNK_SIZE` reads under
  the transport's flow control, LF turned into CRLF and dot-stuffed across
  chunk boundaries, first line included.  The file has LF line ends only
  (intake refused bare CR and bare LF); a CR in it is refused (``5.6.0``)
  by dropping the connection before the final dot, never forwarded.
* Timeouts (RFC 5321 4.5.3.2), all in :class:`Timeouts`: each command
  reply, the greeting and the TLS handshake; each block of the body; the
  reply to the final dot; the TCP connect.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta.relay.connect import (
    TLS_MODES,
    RelayError,
    TLSCreator,
    TLSFailed,
    TLSMode,
    connect_tcp,
    describe,
    opportunistic_tls,
    permanent,
    start_tls,
    temporary,
    try_in_order,
    verified_tls,
)

CHUNK_SIZE = 64 * 1024
MAX_LINE = 4096
MAX_REPLY_LINES = 100

_REPLY_LINE = re.compile(rb"([1-5][0-9][0-9])([ -]|$)(.*)", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?=\s|$)")
_BODY = "sending message body"
_AFTER_BODY = "sending end of data -- message may be sent more than once"

__all__ = [
    "CHUNK_SIZE",
    "AttemptResult",
    "DataEncoder",
    "Outgoing",
    "RecipientResult",
    "RelayError",
    "RelaySession",
    "RelayTarget",
    "Timeouts",
    "deliver",
    "open_session",
]


@dataclass(frozen=True)
class RelayTarget:
    """One host to relay through, over its addresses in order."""

    name: str
    addresses: tuple[str, ...]
    port: int = 25
    tls: TLSMode = "may"
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"unknown TLS mode {self.tls!r}")
        if (self.username is None) != (self.password is None):
            raise ValueError("a username needs a password and the other way round")


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait; the defaults are RFC 5321 4.5.3.2's and Postfix's.

    ``command`` covers each reply outside the body (the greeting, EHLO,
    STARTTLS and its handshake, AUTH, MAIL, RCPT, DATA, RSET, QUIT),
    ``data_block`` each write of the body, ``data_end`` the reply to the
    final dot.
    """

    connect: float = 30.0
    command: float = 300.0
    data_block: float = 180.0
    data_end: float = 600.0


@dataclass(frozen=True)
class Outgoing:
    """One queued message: the envelope and the ``.msg`` file (LF ends).

    ``size`` is what SIZE= declares; ``eight_bit`` asks for BODY=8BITMIME,
    ``smtputf8`` for SMTPUTF8 (also implied by a non-ASCII address).
    """

    sender: str
    recipients: tuple[str, ...]
    path: Path
    size: int
    eight_bit: bool = False
    smtputf8: bool = False


@dataclass(frozen=True)
class RecipientResult:
    """The verdict for one recipient of one attempt.

    ``text`` is the remote's reply, verbatim, when ``in_reply_to`` names
    the command it answered (``"RCPT TO"``, ``"end of DATA"`` ...), ready
    for a DSN's Diagnostic-Code; otherwise it is our own description.
    """

    address: str
    code: int
    status: str
    text: str
    in_reply_to: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status.startswith("2")

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")


@dataclass(frozen=True)
class AttemptResult:
    """``remote`` is ``"host[ip]:port"``, or None if no connection was made."""

    remote: str | None
    results: tuple[RecipientResult, ...]


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


class BareCarriageReturn(ValueError):
    """The queue file holds a CR; intake should have made that impossible."""


class DataEncoder:
    """The queue file's bytes (LF line ends) as DATA on the wire.

    Each LF becomes CRLF and each line starting with "." gets one more:
    the state (are we at the start of a line?) carries across chunks, so
    a "." at a chunk boundary or on the first line is stuffed too.
    """

    def __init__(self) -> None:
        self._line_start = True

    def encode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if b"\r" in chunk:
            raise BareCarriageReturn("bare CR in the queue file")
        stuffed = chunk.replace(b"\n.", b"\n..")
        if self._line_start and chunk.startswith(b"."):
            stuffed = b"." + stuffed
        self._line_start = chunk.endswith(b"\n")
        return stuffed.replace(b"\n", b"\r\n")

    def end(self) -> bytes:
        """The terminator, after a line end if the message lacks one."""
        return b".\r\n" if self._line_start else b"\r\n.\r\n"


@implementer(IPushProducer)
class _BodyProducer:
    """Streams a queue file into the transport, one chunk per step.

    A push producer: a pull producer over TLS is driven by the global
    cooperator, so on the global reactor only.  Writing stops as soon as
    the transport pauses us, so at most one chunk waits in memory.
    """

    def __init__(self, file: BinaryIO, consumer: ITransport, owner: SMTPConnection) -> None:
        self._file = file
        self._consumer = consumer
        self._owner = owner
        self._encoder = DataEncoder()
        self._paused = False
        self._busy = False
        self._stopped = False

    def start(self) -> None:
        self._consumer.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._busy:
            return
        self._busy = True
        try:
            while not (self._paused or self._stopped):
                self._step()
        finally:
            self._busy = False

    def stopProducing(self) -> None:
        self._stopped = True

    def _step(self) -> None:
        try:
            chunk = self._file.read(CHUNK_SIZE)
            data = self._encoder.encode(chunk) if chunk else self._encoder.end()
        except BareCarriageReturn:
            self._fail(permanent("5.6.0", "queue file has a bare CR; message not sent"))
            return
        except OSError as error:
            self._fail(temporary("4.3.0", f"cannot read the queue file: {error.strerror}"))
            return
        self._consumer.write(data)
        if chunk:
            self._owner.body_progress()
        else:
            self._finish()
            self._owner.body_written()

    def _finish(self) -> None:
        self._stopped = True
        self._consumer.unregisterProducer()

    def _fail(self, error: RelayError) -> None:
        self._finish()
        self._owner.body_failed(error)


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
        self._body: _BodyProducer | None = None
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
        self._body = _BodyProducer(file, self.transport, self)
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
        error = LinkError(f"premature reply {reply} while {_BODY}")
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


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(
        self, clock: IReactorTime, timeouts: Timeouts, implicit_tls: TLSCreator | None = None
    ) -> None:
        self._build = partial(SMTPConnection, clock, timeouts, implicit_tls)

    def buildProtocol(self, addr: object) -> SMTPConnection:
        return self._build()


def open_session(
    reactor: IReactorTCP, target: RelayTarget, helo_name: str, timeouts: Timeouts = Timeouts()
) -> Deferred[RelaySession]:
    """A ready session on the first address that takes one; see the module
    docstring.  Fails with :class:`RelayError` only."""
    attempt = partial(_open_at, reactor, target, helo_name.encode("idna"), timeouts)
    return Deferred.fromCoroutine(try_in_order(target.addresses, attempt, target.tls == "may"))


def deliver(
    reactor: IReactorTCP,
    target: RelayTarget,
    helo_name: str,
    outgoing: Outgoing,
    timeouts: Timeouts = Timeouts(),
) -> Deferred[AttemptResult]:
    """One attempt for one message on a connection of its own; never fails."""
    return Deferred.fromCoroutine(_deliver(reactor, target, helo_name, outgoing, timeouts))


async def _deliver(
    reactor: IReactorTCP,
    target: RelayTarget,
    helo_name: str,
    outgoing: Outgoing,
    timeouts: Timeouts,
) -> AttemptResult:
    try:
        session = await open_session(reactor, target, helo_name, timeouts)
    except RelayError as error:
        return AttemptResult(error.remote, tuple(_result(error, a) for a in outgoing.recipients))
    try:
        return await session.send(outgoing)
    finally:
        await session.close()


async def _open_at(
    reactor: IReactorTCP,
    target: RelayTarget,
    helo: bytes,
    timeouts: Timeouts,
    address: str,
    tls_allowed: bool,
) -> RelaySession:
    remote = describe(target.name, address, target.port)
    implicit = verified_tls(target.name, target.ca_file) if target.tls == "implicit" else None
    factory = _ConnectionFactory(reactor, timeouts, implicit)
    connection = await connect_tcp(
        reactor, address, target.port, factory, timeouts.connect, remote
    )
    opening = _Opening(connection, target, remote, helo)
    try:
        features = await opening.run(tls_allowed)
    except LinkError as error:
        await connection.abort()
        raise _link_failure(error, remote, opening.stage) from None
    except RelayError:
        await connection.quit()
        raise
    except CancelledError:
        await connection.abort()
        raise
    return RelaySession(connection, remote, features)


class _Opening:
    """Greeting, EHLO/HELO, STARTTLS, EHLO again, AUTH."""

    def __init__(
        self, connection: SMTPConnection, target: RelayTarget, remote: str, helo: bytes
    ) -> None:
        self._connection = connection
        self._target = target
        self._remote = remote
        self._helo = helo
        self.stage = "receiving the initial server greeting"

    async def run(self, tls_allowed: bool) -> dict[str, str]:
        greeting = await self._connection.greeting
        if not greeting.positive:
            raise greeting.error("greeting", self._remote)
        features = await self._hello()
        if self._wants_starttls(features, tls_allowed):
            features = await self._starttls(features)
        if self._target.username is not None:
            await self._authenticate(features)
        return features

    def _wants_starttls(self, features: dict[str, str], tls_allowed: bool) -> bool:
        mode = self._target.tls
        if mode == "starttls":
            if "STARTTLS" not in features:
                text = f"TLS is required, but was not offered by host {self._remote}"
                raise TLSFailed(454, "4.7.4", text, remote=self._remote)
            return True
        return mode == "may" and tls_allowed and "STARTTLS" in features

    async def _hello(self) -> dict[str, str]:
        self.stage = "performing the EHLO handshake"
        reply = await self._connection.command(b"EHLO " + self._helo)
        if reply.positive:
            return _features(reply)
        if reply.code // 100 == 5:
            self.stage = "performing the HELO handshake"
            reply = await self._connection.command(b"HELO " + self._helo)
            if reply.positive:
                return {}
            raise reply.error("HELO", self._remote)
        raise reply.error("EHLO", self._remote)

    async def _starttls(self, features: dict[str, str]) -> dict[str, str]:
        self.stage = "performing the STARTTLS handshake"
        reply = await self._connection.command(b"STARTTLS")
        if reply.code != 220:
            if self._target.tls == "may":
                return features
            raise TLSFailed(454, "4.7.4", str(reply), "STARTTLS", self._remote)
        if self._target.tls == "may":
            creator = opportunistic_tls()
        else:
            creator = verified_tls(self._target.name, self._target.ca_file)
        await self._connection.start_tls(creator)
        return await self._hello()

    async def _authenticate(self, features: dict[str, str]) -> None:
        remote = self._remote
        if self._connection.tls is None and self._target.tls != "none":
            raise temporary("4.7.4", f"not authenticating to {remote} without TLS", remote)
        self.stage = "authenticating"
        mechanisms = features.get("AUTH", "").upper().split()
        user = self._target.username.encode()
        password = self._target.password.encode()
        if "PLAIN" in mechanisms:
            plain = _b64(b"\0" + user + b"\0" + password)
            reply = await self._connection.command(b"AUTH PLAIN " + plain)
        elif "LOGIN" in mechanisms:
            reply = await self._login(user, password)
        else:
            text = f"{remote} offers no AUTH mechanism we use (PLAIN, LOGIN)"
            raise temporary("4.7.4", text, remote)
        if reply.code != 235:
            raise RelayError(454, "4.7.8", str(reply), "AUTH", self._remote)

    async def _login(self, user: bytes, password: bytes) -> Reply:
        reply = await self._connection.command(b"AUTH LOGIN")
        for secret in (user, password):
            if reply.code != 334:
                break
            reply = await self._connection.command(_b64(secret))
        return reply


class RelaySession:
    """An open, greeted (and maybe encrypted and authenticated) connection."""

    def __init__(self, connection: SMTPConnection, remote: str, features: dict[str, str]) -> None:
        self._connection = connection
        self._features = features
        self._busy = False
        self._used = False
        self.remote = remote

    @property
    def usable(self) -> bool:
        """Whether another message can go over this connection."""
        return self._connection.usable

    @property
    def tls(self) -> str | None:
        """E.g. "TLSv1.3 with TLS_AES_256_GCM_SHA384"; None in clear."""
        return self._connection.tls

    def send(self, outgoing: Outgoing) -> Deferred[AttemptResult]:
        """One transaction; fires with a result per recipient, never fails."""
        if self._busy:
            raise RuntimeError("one message at a time on a session")
        return Deferred.fromCoroutine(self._send(outgoing))

    def close(self) -> Deferred[None]:
        return self._connection.quit()

    async def _send(self, outgoing: Outgoing) -> AttemptResult:
        self._busy = True
        transaction = _Transaction(outgoing.recipients)
        try:
            await self._transaction(outgoing, transaction)
        except RelayError as error:
            transaction.settle(error)
        except LinkError as error:
            stage = transaction.stage
            if stage == _BODY and self._connection.body_sent:
                stage = _AFTER_BODY
            transaction.settle(_link_failure(error, self.remote, stage))
        finally:
            self._busy = False
        return AttemptResult(self.remote, transaction.results())

    async def _transaction(self, outgoing: Outgoing, transaction: _Transaction) -> None:
        if not self._connection.usable:
            raise temporary("4.4.2", f"connection to {self.remote} is closed", self.remote)
        self._check_extensions(outgoing)
        sender = _address_bytes(outgoing.sender)
        if sender is None:
            text = f"bad sender address syntax: {outgoing.sender!r}"
            raise permanent("5.1.7", text, self.remote)
        transaction.refuse_bad_addresses()
        if not transaction.sendable:
            return
        with _open_queue_file(outgoing.path) as file:
            if self._used:
                await self._reset(transaction)
            self._used = True
            if await self._envelope(outgoing, sender, transaction):
                transaction.stage = _BODY
                reply = await self._connection.send_body(file)
                transaction.decide_accepted(reply, "end of DATA")

    def _check_extensions(self, outgoing: Outgoing) -> None:
        """Refuse, before MAIL, what this server cannot take unchanged."""
        remote = self.remote
        limit = self._features.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < outgoing.size:
            text = f"message size {outgoing.size} exceeds size limit {limit} of server {remote}"
            raise permanent("5.3.4", text, remote)
        if self._needs_smtputf8(outgoing) and "SMTPUTF8" not in self._features:
            status = "5.6.7" if not _all_ascii(outgoing) else "5.6.9"
            text = f"SMTPUTF8 is required, but was not offered by host {remote}"
            raise permanent(status, text, remote)
        if outgoing.eight_bit and "8BITMIME" not in self._features:
            text = f"8BITMIME is required, but was not offered by host {remote}"
            raise permanent("5.6.3", text, remote)

    @staticmethod
    def _needs_smtputf8(outgoing: Outgoing) -> bool:
        return outgoing.smtputf8 or not _all_ascii(outgoing)

    async def _reset(self, transaction: _Transaction) -> None:
        transaction.stage = "sending RSET"
        reply = await self._connection.command(b"RSET")
        if not reply.positive:
            self._connection.abort()
            raise temporary("4.4.2", f"{self.remote} refused RSET: {reply}", self.remote)

    def _mail_command(self, outgoing: Outgoing, sender: bytes) -> bytes:
        command = b"MAIL FROM:<" + sender + b">"
        if "SIZE" in self._features:
            command += b" SIZE=%d" % outgoing.size
        if outgoing.eight_bit:
            command += b" BODY=8BITMIME"
        if self._needs_smtputf8(outgoing):
            command += b" SMTPUTF8"
        return command

    async def _envelope(
        self, outgoing: Outgoing, sender: bytes, transaction: _Transaction
    ) -> bool:
        """MAIL, RCPT, DATA; True when the body should follow."""
        mail = self._mail_command(outgoing, sender)
        rcpts = [b"RCPT TO:<" + address + b">" for address in transaction.sendable.values()]
        transaction.stage = "sending MAIL FROM"
        if "PIPELINING" in self._features:
            replies = await self._connection.send_commands([mail, *rcpts, b"DATA"])
            return await self._judge(transaction, replies[0], replies[1:-1], replies[-1])
        reply = await self._connection.command(mail)
        if not reply.positive:
            return await self._judge(transaction, reply, [], None)
        transaction.stage = "sending RCPT TO"
        rcpt_replies = [await self._connection.command(rcpt) for rcpt in rcpts]
        data_reply = None
        if any(r.positive for r in rcpt_replies):
            transaction.stage = "sending DATA"
            data_reply = await self._connection.command(b"DATA")
        return await self._judge(transaction, reply, rcpt_replies, data_reply)

    async def _judge(
        self,
        transaction: _Transaction,
        mail: Reply,
        rcpts: Sequence[Reply],
        data: Reply | None,
    ) -> bool:
        """Per-recipient verdicts from the envelope's replies."""
        if not mail.positive:
            transaction.decide_all(mail, "MAIL FROM")
        else:
            transaction.decide_rcpts(rcpts)
        if data is None:
            return False
        if data.code == 354 and not transaction.accepted:
            # RFC 2920 3.1: a server that took DATA after refusing every
            # recipient gets an empty message, which it cannot deliver.
            transaction.stage = "sending end of data"
            await self._connection.command(b".")
            return False
        if data.code != 354:
            transaction.decide_accepted(data, "DATA")
            return False
        return True


class _Transaction:
    """Per-recipient bookkeeping for one message on one session."""

    def __init__(self, recipients: Sequence[str]) -> None:
        self._recipients = tuple(recipients)
        self._results: list[RecipientResult | None] = [None] * len(recipients)
        self.sendable: dict[int, bytes] = {}
        self.accepted: list[int] = []
        self.stage = "starting the transaction"

    def refuse_bad_addresses(self) -> None:
        for index, address in enumerate(self._recipients):
            encoded = _address_bytes(address)
            if encoded is None:
                text = f"bad recipient address syntax: {address!r}"
                self._results[index] = RecipientResult(address, 553, "5.1.3", text)
            else:
                self.sendable[index] = encoded

    def decide_rcpts(self, replies: Sequence[Reply]) -> None:
        for index, reply in zip(self.sendable, replies):
            if reply.positive:
                self.accepted.append(index)
            else:
                self._results[index] = reply.verdict(self._recipients[index], "RCPT TO")

    def decide_all(self, reply: Reply, command: str) -> None:
        for index in self.sendable:
            self._results[index] = reply.verdict(self._recipients[index], command)

    def decide_accepted(self, reply: Reply, command: str) -> None:
        for index in self.accepted:
            self._results[index] = reply.verdict(self._recipients[index], command)

    def settle(self, error: RelayError) -> None:
        """``error`` for every recipient still undecided."""
        for index, result in enumerate(self._results):
            if result is None:
                self._results[index] = _result(error, self._recipients[index])

    def results(self) -> tuple[RecipientResult, ...]:
        decided = tuple(result for result in self._results if result is not None)
        assert len(decided) == len(self._recipients), "a recipient was left undecided"
        return decided


def _result(error: RelayError, address: str) -> RecipientResult:
    return RecipientResult(address, error.code, error.status, error.text, error.in_reply_to)


def _link_failure(error: LinkError, remote: str, stage: str) -> RelayError:
    """A broken connection as a temporary failure, worded like Postfix."""
    if error.during_handshake:
        return TLSFailed(454, "4.7.5", f"{error.what} with {remote}", remote=remote)
    if error.what == "timed out":
        text = f"conversation with {remote} timed out while {stage}"
    else:
        text = f"{error.what} with {remote} while {stage}"
    return RelayError(421, "4.4.2", text, remote=remote)


def _features(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) to their parameters."""
    features = {}
    for line in reply.lines[1:]:
        keyword, _, parameters = line.partition(" ")
        features[keyword.upper()] = parameters
    return features


def _address_bytes(address: str) -> bytes | None:
    """The address for a MAIL or RCPT command, or None if it cannot go
    on the wire (controls would let it inject commands)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in address):
        return None
    return address.encode("utf-8")


def _open_queue_file(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as error:
        raise temporary("4.3.0", f"cannot open the queue file: {error.strerror}") from None


def _all_ascii(outgoing: Outgoing) -> bool:
    return all(address.isascii() for address in (outgoing.sender, *outgoing.recipients))


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)
