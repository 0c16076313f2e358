"""The ESMTP server: Twisted's ``ESMTP`` with its input side replaced.

We keep Twisted's public extension points: the ``portal`` and the cred
flow, ``challengers``, ``IMessageDelivery`` / ``IMessageDeliveryFactory``
avatars, ``validateFrom`` / ``validateTo`` / ``receivedHeader``,
``greeting``, ``extensions`` and the ``do_*`` / ``ext_*`` dispatch through
``lookupMethod``.  What the audit found broken is overridden:

* input is our own buffer, not ``LineOnlyReceiver``: command lines must end
  in CRLF and fit 512 octets, bare CR/LF is refused (S2, S7), DATA is
  decoded per buffer and never falls back to command mode (S1, S10);
* commands run strictly one after another, the next waiting for the reply
  to the previous one, so PIPELINING is safe (S6);
* input pipelined behind STARTTLS is discarded and the session starts over
  inside TLS (S3, S4);
* every reply carries an enhanced status code; errors raised by validators
  are answered whatever their ``resp`` type (S11); malformed input gets a
  reply, never a dropped connection (S8);
* limits: message size, recipients, connections, errors, idle time.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twisted.cred.credentials import Anonymous
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.internet.interfaces import ITLSTransport
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from twisted.python import log
from twisted.python.failure import Failure

from twisted_mta.smtp.address import NULL_SENDER, PathError, parse_mail, parse_rcpt
from twisted_mta.smtp.data import BARE_LINE_ENDING, LINE_TOO_LONG, DataDecoder
from twisted_mta.smtp.policy import ITransactionDelivery, Session

MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, including the CRLF
_PAUSE_BUFFER = 64 * 1024
_ENHANCED = re.compile(rb"^[245]\.\d{1,3}\.\d{1,3} ")

COMMAND, DATA, CLOSED = "command", "data", "closed"


@dataclass(frozen=True)
class ServerSettings:
    """What every connection of one listener shares."""

    hostname: str
    listener: str
    max_message_size: int
    max_recipients: int
    idle_timeout: float
    max_errors: int
    require_auth: bool = False
    implicit_tls: bool = False


@dataclass
class ConnectionLimits:
    """Counts open connections, in total and per client address."""

    max_total: int
    max_per_ip: int
    total: int = 0
    per_ip: dict[str, int] = field(default_factory=dict)

    def acquire(self, ip: str) -> bool:
        if self.total >= self.max_total or self.per_ip.get(ip, 0) >= self.max_per_ip:
            return False
        self.total += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        remaining = self.per_ip[ip] - 1
        if remaining:
            self.per_ip[ip] = remaining
        else:
            del self.per_ip[ip]


class RcptUser(smtp.User):
    """Twisted's ``User`` around an address we parsed ourselves.

    ``User.__init__`` would re-parse the address with Twisted's ASCII-only
    ``Address``; the attributes are the same.
    """

    def __init__(self, dest, helo, protocol, orig) -> None:
        self.dest = dest
        self.helo = helo
        self.protocol = protocol
        self.orig = orig


class MTAServer(smtp.ESMTP):
    """One SMTP session."""

    def __init__(
        self,
        settings: ServerSettings,
        limits: ConnectionLimits,
        challengers: dict | None = None,
        context_factory=None,
    ) -> None:
        super().__init__(challengers, context_factory)
        self.settings = settings
        self.limits = limits
        self.host = settings.hostname.encode("ascii")
        self.timeout = settings.idle_timeout
        self.session: Session | None = None
        self._mode = COMMAND
        self._buffer = b""
        self._busy = False
        self._errors = 0
        self._counted = False
        self._paused = False
        self._discarding_long_line = False
        self._decoder: DataDecoder | None = None
        self._message = None
        self._mail = None
        self._started = 0.0

    # -- connection ---------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        ip = getattr(peer, "host", str(peer))
        self.session = Session(self.settings.listener, ip)
        if not self.limits.acquire(ip):
            self._mode = CLOSED
            self.reply(421, "4.7.0", f"{self.settings.hostname} Too many connections, try later")
            self.transport.loseConnection()
            return
        self._counted = True
        super().connectionMade()
        self.canStartTLS = (
            ITLSTransport.providedBy(self.transport)
            and self.ctx is not None
            and not self.settings.implicit_tls
        )
        if self.settings.implicit_tls:
            self.startedTLS = True

    def greeting(self) -> bytes:
        return self.host + b" ESMTP"

    def connectionLost(self, reason) -> None:
        self._mode = CLOSED
        self._drop_message()
        if self._counted:
            self._counted = False
            self.limits.release(self.session.client_ip)
        super().connectionLost(reason)

    def timeoutConnection(self) -> None:
        self.reply(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded")
        self._close()

    def _close(self) -> None:
        self._mode = CLOSED
        self._buffer = b""
        self._drop_message()
        self.transport.loseConnection()

    # -- replies --------------------------------------------------------

    def reply(self, code: int, enhanced: str, text: str) -> None:
        """Send a reply; every line carries the enhanced status code."""
        lines = text.splitlines() or [""]
        body = "\n".join(f"{enhanced} {line}" for line in lines)
        self.sendCode(code, body.encode("utf-8"))
        if code >= 500:
            self._count_error()

    def _count_error(self) -> None:
        self._errors += 1
        if self._errors >= self.settings.max_errors and self._mode != CLOSED:
            self.sendCode(421, b"4.7.0 Too many errors, closing connection")
            self._close()

    def _reply_failure(self, failure: Failure, fallback: tuple[int, str, str]) -> None:
        """Answer an exception from a validator or a message."""
        error = failure.value
        if isinstance(error, smtp.SMTPServerError):
            resp = error.resp
            if isinstance(resp, str):
                resp = resp.encode("utf-8", "replace")
            if not _ENHANCED.match(resp):
                resp = f"{error.code // 100}.0.0 ".encode() + resp
            self.sendCode(error.code, resp)
            if error.code >= 500:
                self._count_error()
            return
        log.err(failure, "unexpected error in SMTP session")
        self.reply(*fallback)

    # -- input ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode == CLOSED:
            return
        self.resetTimeout()
        if self._mode == DATA:
            self._feed_data(data)
        else:
            self._buffer += data
        self._run()

    def _feed_data(self, data: bytes) -> None:
        rest = self._decoder.feed(data)
        if rest is not None:
            self._buffer = rest + self._buffer
            self._end_of_data()

    def _run(self) -> None:
        """Execute buffered commands in order while none is outstanding."""
        while self._mode == COMMAND and not self._busy:
            line = self._next_line()
            if line is None:
                break
            self._execute(line)
        if self._mode == DATA and self._buffer and not self._busy:
            pending, self._buffer = self._buffer, b""
            self._feed_data(pending)
            self._run()
            return
        self._flow_control()

    def _flow_control(self) -> None:
        full = len(self._buffer) > _PAUSE_BUFFER and self._busy
        if full and not self._paused and self._mode != CLOSED:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and not full:
            self._paused = False
            if self._mode != CLOSED:
                self.transport.resumeProducing()

    def _next_line(self) -> bytes | None:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_COMMAND_LINE:
                self._buffer = b""
                self._discarding_long_line = True
                self.reply(500, "5.5.2", "Error: line too long")
            return None
        line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
        if self._discarding_long_line:
            self._discarding_long_line = False
            return None
        if len(line) + 1 > MAX_COMMAND_LINE:
            self.reply(500, "5.5.2", "Error: line too long")
            return None
        if not line.endswith(b"\r") or b"\r" in line[:-1]:
            self.reply(500, "5.5.2", "Error: bare CR or LF received; lines end in CRLF")
            return None
        return line[:-1]

    def _execute(self, line: bytes) -> None:
        verb, _, argument = line.partition(b" ")
        if not verb.isalpha() or not verb.isascii():
            self.reply(500, "5.5.2", "Error: command not recognized")
            return
        method = self.lookupMethod(verb)
        if method is None:
            self.do_UNKNOWN(argument)
            return
        try:
            result = method(argument)
        except Exception:
            self._reply_failure(Failure(), (451, "4.3.0", "Error: local error in processing"))
            return
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addErrback(
                self._reply_failure, (451, "4.3.0", "Error: local error in processing")
            )
            result.addBoth(self._command_done)

    def _command_done(self, _ignored) -> None:
        self._busy = False
        if self._mode != CLOSED:
            self._run()

    # -- commands -------------------------------------------------------

    def do_UNKNOWN(self, rest: bytes) -> None:
        self.reply(500, "5.5.2", "Error: command not recognized")

    def do_HELO(self, rest: bytes) -> None:
        if not rest.strip():
            return self.reply(501, "5.5.4", "Syntax: HELO hostname")
        self._greeted(rest, esmtp=False)
        self.reply(250, "2.0.0", self.settings.hostname)

    def do_EHLO(self, rest: bytes) -> None:
        if not rest.strip():
            return self.reply(501, "5.5.4", "Syntax: EHLO hostname")
        self._greeted(rest, esmtp=True)
        peer = self.session.client_ip
        lines = [f"{self.settings.hostname} Hello [{peer}]"]
        for keyword, params in self.extensions().items():
            word = keyword.decode("ascii")
            lines.append(" ".join([word, *(p.decode("ascii") for p in params)]) if params else word)
        self.sendCode(250, "\n".join(lines).encode("ascii"))

    def _greeted(self, rest: bytes, esmtp: bool) -> None:
        name = rest.strip() or None
        self._helo = (name, self.session.client_ip.encode("ascii"))
        self.session.helo = name
        self.session.esmtp = esmtp
        if self.startedTLS:
            self.session.tls = self.tls_description()
        self._reset_transaction()

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        size = str(self.settings.max_message_size).encode()
        extensions: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,
            b"SIZE": [size],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
            b"SMTPUTF8": None,
        }
        if self.canStartTLS and not self.startedTLS:
            extensions[b"STARTTLS"] = None
        return extensions

    def do_MAIL(self, rest: bytes):
        if self._helo[0] is None:
            return self.reply(503, "5.5.1", "Error: send HELO/EHLO first")
        if self._mail is not None:
            return self.reply(503, "5.5.1", "Error: nested MAIL command")
        if self.settings.require_auth and not self.authenticated:
            return self.reply(530, "5.7.0", "Authentication required")
        try:
            command = parse_mail(rest, max_size=self.settings.max_message_size)
        except PathError as error:
            return self.reply(error.code, error.enhanced, error.text)
        d = defer.maybeDeferred(self.validateFrom, self._helo, command.sender)
        d.addCallback(self._sender_accepted, command)
        return d

    def _sender_accepted(self, sender, command) -> None:
        self._mail = command
        self._from = sender
        self._to = []
        if ITransactionDelivery.providedBy(self.delivery):
            self.delivery.utf8 = command.smtputf8
            self.delivery.body = command.body or "7BIT"
        self.reply(250, "2.1.0", "Ok")

    def validateFrom(self, helo, origin):
        """Log in anonymously (once) through the portal, then ask the avatar."""
        if self.deliveryFactory is None and self.delivery is None:
            if self.portal is None:
                raise smtp.SMTPBadSender(origin, 451, "4.3.5 No mail service configured")
            d = self.portal.login(
                Anonymous(), self.session, IMessageDeliveryFactory, IMessageDelivery
            )
            d.addCallbacks(self._cbAnonymousAuthentication, self._anonymous_refused)
            d.addCallback(lambda _: self.validateFrom(helo, origin))
            return d
        return super().validateFrom(helo, origin)

    def _anonymous_refused(self, failure: Failure):
        failure.trap(UnauthorizedLogin, UnhandledCredentials)
        raise smtp.SMTPServerError(530, "5.7.0 Authentication required")

    def do_RCPT(self, rest: bytes):
        if self._mail is None:
            return self.reply(503, "5.5.1", "Error: need MAIL command")
        if len(self._to) >= self.settings.max_recipients:
            return self.reply(452, "4.5.3", "Error: too many recipients")
        try:
            command = parse_rcpt(rest, smtputf8=self._mail.smtputf8)
        except PathError as error:
            return self.reply(error.code, error.enhanced, error.text)
        user = RcptUser(command.recipient, self._helo, self, self._from)
        d = defer.maybeDeferred(self.validateTo, user)
        d.addCallback(self._recipient_accepted, user)
        return d

    def _recipient_accepted(self, factory: Callable, user: RcptUser) -> None:
        self._to.append((user, factory))
        self.reply(250, "2.1.5", "Ok")

    def do_DATA(self, rest: bytes):
        if self._mail is None:
            return self.reply(503, "5.5.1", "Error: need MAIL command")
        if not self._to:
            return self.reply(554, "5.5.1", "Error: no valid recipients")
        if rest.strip():
            return self.reply(501, "5.5.4", "Error: DATA takes no arguments")
        users = [user for user, _ in self._to]
        try:
            received = self.receivedHeader(self._helo, self._from, users)
            if ITransactionDelivery.providedBy(self.delivery):
                self._message = self.delivery.open_message(received)
            else:
                self._message = LineFanout([factory() for _, factory in self._to], received)
        except Exception:
            return self._reply_failure(Failure(), (451, "4.3.0", "Error: local error"))
        self._decoder = DataDecoder(self._message.write, self.settings.max_message_size)
        self._started = time.monotonic()
        self._mode = DATA
        self.reply(354, "2.0.0", "End data with <CR><LF>.<CR><LF>")

    def _end_of_data(self) -> None:
        decoder, message = self._decoder, self._message
        self._mode = COMMAND
        self._decoder = None
        self._message = None
        self._busy = True
        if decoder.fault is not None:
            message.connectionLost()
            self._refuse_message(decoder)
            self._finish_transaction(None)
            return
        d = defer.maybeDeferred(message.eomReceived)
        d.addCallback(self._message_stored, decoder.size)
        d.addErrback(self._reply_failure, (451, "4.3.0", "Error: local error in processing"))
        d.addBoth(self._finish_transaction)

    def _refuse_message(self, decoder: DataDecoder) -> None:
        if decoder.fault == BARE_LINE_ENDING:
            self.reply(554, "5.6.0", "Error: bare CR or LF in message; message refused")
        elif decoder.fault == LINE_TOO_LONG:
            self.reply(554, "5.6.0", "Error: line longer than 998 characters; message refused")
        else:
            self.reply(552, "5.3.4", "Error: message exceeds fixed maximum message size")

    def _message_stored(self, queue_id, size: int) -> None:
        queue_id = getattr(self.delivery, "queue_id", None) or "-"
        log.msg(
            f"id={queue_id} from=<{self._from}> size={size} nrcpt={len(self._to)} "
            f"client=unknown[{self.session.client_ip}] listener={self.settings.listener}"
            + (f" tls={self.session.tls.split()[0]}" if self.session.tls else "")
        )
        self.reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    def _finish_transaction(self, _ignored) -> None:
        self._reset_transaction()
        self._command_done(None)

    def do_RSET(self, rest: bytes) -> None:
        self._reset_transaction()
        self.reply(250, "2.0.0", "Ok")

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0", "Ok")

    def do_VRFY(self, rest: bytes) -> None:
        self.reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def do_EXPN(self, rest: bytes) -> None:
        self.reply(502, "5.5.1", "Error: EXPN not supported")

    def do_HELP(self, rest: bytes) -> None:
        self.reply(
            214,
            "2.0.0",
            "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT STARTTLS AUTH",
        )

    def do_QUIT(self, rest: bytes) -> None:
        self.reply(221, "2.0.0", "Bye")
        self._close()

    def ext_STARTTLS(self, rest: bytes) -> None:
        if self.startedTLS:
            return self.reply(503, "5.5.1", "Error: TLS already active")
        if not self.canStartTLS:
            return self.reply(454, "4.7.0", "TLS not available")
        if rest.strip():
            return self.reply(501, "5.5.4", "Error: STARTTLS takes no arguments")
        # RFC 3207 4.2: forget everything, including what was pipelined.
        self._buffer = b""
        self.reply(220, "2.0.0", "Ready to start TLS")
        self.transport.startTLS(self.ctx)
        self.startedTLS = True
        self._forget_session()

    def ext_AUTH(self, rest: bytes) -> None:
        self.reply(503, "5.5.1", "Error: authentication not enabled")

    # -- state ------------------------------------------------------------

    def _forget_session(self) -> None:
        self._reset_transaction()
        self._helo = (None, self.session.client_ip.encode("ascii"))
        self.session.helo = None
        self.session.esmtp = False
        self.authenticated = False
        if self._onLogout:
            self._onLogout()
            self._onLogout = None
        self.deliveryFactory = None

    def _reset_transaction(self) -> None:
        self._drop_message()
        self._mail = None
        self._from = None
        self._to = []
        if self.deliveryFactory is not None:
            self.delivery = None

    def _drop_message(self) -> None:
        if self._message is not None:
            self._message.connectionLost()
            self._message = None
        self._decoder = None

    def tls_description(self) -> str | None:
        """'TLSv1.3 with cipher NAME' once the handshake is done."""
        try:
            connection = self.transport.getHandle()
            version = connection.get_protocol_version_name()
            cipher = connection.get_cipher_name()
        except Exception:
            return None
        if not cipher:
            return None
        return f"{version} with cipher {cipher}"


class LineFanout:
    """Feed decoded body chunks to Twisted ``IMessage``s, line by line.

    Only used for third-party ``IMessageDelivery`` avatars that do not
    provide ``ITransactionDelivery``.
    """

    def __init__(self, messages: Sequence, received: bytes) -> None:
        self.messages = messages
        self._partial = b""
        self.write(received)

    def write(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            for message in self.messages:
                message.lineReceived(line)

    def eomReceived(self):
        return defer.gatherResults(
            [defer.maybeDeferred(m.eomReceived) for m in self.messages], consumeErrors=True
        ).addErrback(lambda f: f.value.subFailure)

    def connectionLost(self) -> None:
        for message in self.messages:
            message.connectionLost()


class MTAFactory(smtp.SMTPFactory):
    """Builds ``MTAServer``s for one listener."""

    noisy = False

    def __init__(
        self,
        portal,
        settings: ServerSettings,
        limits: ConnectionLimits,
        context_factory=None,
        challengers: dict | None = None,
    ) -> None:
        super().__init__(portal)
        self.settings = settings
        self.limits = limits
        self.context_factory = context_factory
        self.challengers = challengers or {}
        self.domain = settings.hostname.encode("ascii")
        self.timeout = settings.idle_timeout

    def buildProtocol(self, addr) -> MTAServer:
        server = MTAServer(
            self.settings, self.limits, dict(self.challengers), self.context_factory
        )
        server.factory = self
        server.portal = self.portal
        return server
