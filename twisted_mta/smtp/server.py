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
  to the previous one, so PIPELINING is safe (S6); reading stops while
  input piles up behind an outstanding command or behind replies the
  client does not read;
* input pipelined behind STARTTLS is discarded and the session starts over
  inside TLS (S3, S4);
* every reply carries an enhanced status code (but those to HELO and EHLO,
  RFC 2034, and the 354, which has no class in RFC 3463); errors raised by
  validators or messages are answered whatever their ``resp`` type (S11);
  malformed input gets a reply, never a dropped connection (S8);
* limits: message size, recipients, connections, errors, idle time,
  commands that make no progress; and Postfix's stress mode: while the
  connections near their limit, sessions get less time and less chatter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twisted.cred.credentials import Anonymous
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPushProducer, ITLSTransport
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from twisted.python import log
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta import maillog
from twisted_mta.auth.throttle import AuthThrottle
from twisted_mta.intake.acceptance import Session
from twisted_mta.intake.refusal import Refusal
from twisted_mta.mail.address import PathError, parse_mail, parse_rcpt
from twisted_mta.maillog import Stage
from twisted_mta.smtp.data import (
    BARE_LINE_ENDING,
    LINE_TOO_LONG,
    TOO_BIG,
    TOO_MANY_HOPS,
    DataDecoder,
)
from twisted_mta.smtp.modes import AUTH, CLOSED, COMMAND, DATA
from twisted_mta.smtp.realm import ITransactionDelivery
from twisted_mta.smtp.sasl import SaslMixin

MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, including the CRLF
MAX_AUTH_LINE = 12288  # RFC 4954 4
# Input kept while the session is stalled before we stop reading.
_PAUSE_BUFFER = 64 * 1024
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3} ")
# NUL and other controls have no place in a command; HT is tolerated.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_LOCAL_ERROR = (451, "4.3.0", "Error: local error in processing")
_MESSAGE_FAULTS = {
    BARE_LINE_ENDING: (554, "5.6.0", "Error: bare CR or LF in message; message refused"),
    LINE_TOO_LONG: (554, "5.6.0", "Error: line longer than 998 characters; message refused"),
    TOO_BIG: (552, "5.3.4", "Error: message exceeds fixed maximum message size"),
    TOO_MANY_HOPS: (554, "5.4.6", "Error: too many hops (mail loop?); message refused"),
}
# Commands that make no progress; with refused ones, they are junk.
_JUNK_VERBS = frozenset({b"NOOP", b"RSET", b"VRFY", b"HELP"})
# Above this share of max_connections, the server is under stress.
STRESS_SHARE = 0.8
# How long a closing connection may wait for the client to take our last
# reply and, on TLS, to answer close_notify, before it is cut.
CLOSE_GRACE = 1.0


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
    auth_requires_tls: bool = True
    max_auth_failures: int = 3
    max_hops: int = 0
    max_junk_commands: int = 100
    stress_idle_timeout: float = 10.0
    stress_max_junk_commands: int = 3


@dataclass
class ConnectionLimits:
    """Counts open connections, in total and per client address.

    It also tells whether the server is under stress: more than
    ``STRESS_SHARE`` of ``max_total`` connections open.  Sessions then use
    their stress limits, as Postfix's smtpd does, so that connections that
    make no progress give way to clients that have mail to send.
    """

    max_total: int
    max_per_ip: int
    total: int = 0
    per_ip: dict[str, int] = field(default_factory=dict)
    stressed: bool = False

    def acquire(self, ip: str) -> bool:
        if self.total >= self.max_total or self.per_ip.get(ip, 0) >= self.max_per_ip:
            return False
        self.total += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self._check_stress()
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        remaining = self.per_ip[ip] - 1
        if remaining:
            self.per_ip[ip] = remaining
        else:
            del self.per_ip[ip]
        self._check_stress()

    def _check_stress(self) -> None:
        """Follow the stress state; its start and end are logged once."""
        stressed = self.total > STRESS_SHARE * self.max_total
        if stressed == self.stressed:
            return
        self.stressed = stressed
        state = "on" if stressed else "off"
        log.msg(f"stress mode {state}: {self.total} of {self.max_total} connections open")


class Sessions:
    """The open sessions of every listener, so that a shutdown can drain them."""

    def __init__(self) -> None:
        self.closing = False
        self._open: set[MTAServer] = set()
        self._drained: list[defer.Deferred] = []

    def add(self, server: MTAServer) -> None:
        self._open.add(server)

    def remove(self, server: MTAServer) -> None:
        self._open.discard(server)
        if not self._open:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def drain(self, timeout: float, clock) -> defer.Deferred:
        """Ask every session to finish; fires once all are gone.

        Sessions still open after ``timeout`` (a transfer in DATA that does
        not end) are cut; what they were sending was never acknowledged.
        """
        self.closing = True
        for server in list(self._open):
            server.shut_down()
        if not self._open:
            return defer.succeed(None)
        d = defer.Deferred()
        self._drained.append(d)
        cut = clock.callLater(timeout, self._cut_all)
        return d.addBoth(_cancel_and_pass, cut)

    def _cut_all(self) -> None:
        log.msg(f"shutdown: {len(self._open)} session(s) did not finish in time, cut")
        for server in list(self._open):
            server.transport.abortConnection()


def _cancel_and_pass(result, call):
    if call.active():
        call.cancel()
    return result


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


@implementer(IPushProducer)
class MTAServer(SaslMixin, smtp.ESMTP):
    """One SMTP session.

    Input goes into ``_input``; ``_process`` takes one command line at a
    time from it, or hands it to the DATA decoder.  A command whose answer
    is a Deferred makes the session *busy*: nothing more is read from the
    buffer (and, past ``_PAUSE_BUFFER``, from the socket) until it is
    answered, which is what keeps pipelined replies in order.

    The server is also the producer of its replies: while the transport's
    write buffer is full (a client that pipelines without reading), no
    command runs, and input is buffered only up to ``_PAUSE_BUFFER``, so
    neither replies nor input pile up.
    """

    def __init__(
        self,
        settings: ServerSettings,
        limits: ConnectionLimits,
        challengers: dict | None = None,
        context_factory=None,
        throttle: AuthThrottle | None = None,
        clock=None,
        sessions: Sessions | None = None,
    ) -> None:
        super().__init__(challengers, context_factory)
        self.settings = settings
        self.limits = limits
        self.sessions = sessions if sessions is not None else Sessions()
        self.throttle = throttle or AuthThrottle(base_delay=1.0)
        self.clock = clock or reactor
        self.host = settings.hostname.encode("ascii")
        self.session: Session | None = None
        self._mode = COMMAND
        # bytearray: removing a consumed line from the front is O(1).
        self._input = bytearray()
        self._busy = False
        self._processing = False
        self._paused = False
        self._output_blocked = False
        self._skipping_long_line = False
        self._errors = 0
        self._junk = 0
        self._junk_verb = False
        self._counted = False
        self._decoder: DataDecoder | None = None
        self._message = None
        self._write_failure: Failure | None = None
        self._mail = None
        self._cut = None
        self._producing = False
        self._shutting_down = False

    # -- connection ---------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        ip = getattr(peer, "host", str(peer))
        self.session = Session(self.settings.listener, ip)
        self.sessions.add(self)
        if self.sessions.closing:
            self._say_shutting_down()
            return
        if not self.limits.acquire(ip):
            refusal = (421, "4.7.0", f"{self.settings.hostname} Too many connections, try later")
            self._refuse("CONNECT", refusal)
            self._close()
            return
        self._counted = True
        self.transport.registerProducer(self, True)
        self._producing = True
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
        in_data = self._mode == DATA
        self._mode = CLOSED
        self._drop_message()
        if in_data:
            maillog.lost_after_data(
                getattr(self.delivery, "queue_id", None), self.session.client_ip
            )
        if self._counted:
            self._counted = False
            self.limits.release(self.session.client_ip)
        if self._cut is not None and self._cut.active():
            self._cut.cancel()
        self.sessions.remove(self)
        super().connectionLost(reason)

    def shut_down(self) -> None:
        """A transaction in DATA may finish; then, or now, 421 and close."""
        self._shutting_down = True
        self._process()

    def _say_shutting_down(self) -> None:
        text = f"{self.settings.hostname} Service shutting down, closing connection"
        self.reply(421, "4.3.2", text)
        self._close()

    def timeoutConnection(self) -> None:
        if self._mode != CLOSED:
            self.reply(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded")
        # A client that has not read our replies for a whole timeout would
        # keep the connection open, closing, until it reads the last one.
        self._close(abort=self._output_blocked)

    def _close(self, abort: bool = False) -> None:
        """Close the connection, for sure and soon.

        A registered producer makes a TLS transport wait with its close
        forever, and a TLS close waits for the client's close_notify, which
        a silent client never sends: after ``CLOSE_GRACE`` the connection
        is cut.
        """
        self._mode = CLOSED
        self._input.clear()
        self._drop_message()
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        if abort:
            self.transport.abortConnection()
            return
        self.transport.loseConnection()
        if self._cut is None:
            self._cut = self.callLater(CLOSE_GRACE, self.transport.abortConnection)

    # -- IPushProducer: told by the transport whether the client reads ---

    def pauseProducing(self) -> None:
        self._output_blocked = True
        self._flow_control()

    def resumeProducing(self) -> None:
        self._output_blocked = False
        self._process()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost does the rest."""

    # -- replies --------------------------------------------------------

    def reply(self, code: int, enhanced: str, text: str) -> None:
        """Send a reply; every line carries the enhanced status code.

        Nothing more is said once the session is closing: two limits met
        by one reply would otherwise both say 421.
        """
        if self._mode == CLOSED:
            return
        lines = text.splitlines() or [""]
        body = "\n".join(f"{enhanced} {line}" for line in lines)
        self.sendCode(code, body.encode("utf-8"))
        if code >= 500:
            self._count_error()
        self._count_junk(code)

    def _count_error(self) -> None:
        self._errors += 1
        if self._errors >= self.settings.max_errors and self._mode != CLOSED:
            self.sendCode(421, b"4.7.0 Too many errors, closing connection")
            self._close()

    def _count_junk(self, code: int) -> None:
        """Count the replies to junk: to NOOP, RSET, VRFY, HELP, and refusals.

        Our 421s end the session and are not counted.  Like Postfix's
        ``smtpd_junk_command_limit``, the count starts again once a message
        is accepted (Postfix's smtpd resets its junk and error counts after
        a successful DATA), so a client that sends mail is never cut, however
        many messages it sends in one session.
        """
        junk = self._junk_verb or (code >= 400 and code != 421)
        self._junk_verb = False
        if not junk or self._mode == CLOSED:
            return
        self._junk += 1
        if self._junk >= self._junk_limit:
            self.sendCode(421, b"4.7.0 Too many commands without progress, closing connection")
            self._close()

    # -- stress ---------------------------------------------------------

    @property
    def timeout(self) -> float:
        """The idle timeout of the moment: shorter under stress."""
        if self.limits.stressed:
            return min(self.settings.stress_idle_timeout, self.settings.idle_timeout)
        return self.settings.idle_timeout

    @property
    def _junk_limit(self) -> int:
        if self.limits.stressed:
            return min(self.settings.stress_max_junk_commands, self.settings.max_junk_commands)
        return self.settings.max_junk_commands

    def resetTimeout(self) -> None:
        """Restart the idle timer, with the timeout of the moment."""
        if self.timeOut is not None:
            self.timeOut = self.timeout
        super().resetTimeout()

    def _refuse(self, stage: Stage, reply: tuple[int, str, str], **envelope: object) -> None:
        """Answer a refused connection, command or message, and log it.

        ``envelope``: the sender, recipient and queue id known so far, as
        text or as addresses, written out only when a refusal is logged.
        """
        self.reply(*reply)
        known = {key: None if value is None else str(value) for key, value in envelope.items()}
        maillog.reject(self.session, stage, *reply, **known)

    def _refuse_failure(self, failure: Failure, stage: Stage, **envelope: object) -> None:
        self._refuse(stage, self._failure_reply(failure), **envelope)

    def _reply_failure(self, failure: Failure) -> None:
        self.reply(*self._failure_reply(failure))

    def _failure_reply(self, failure: Failure) -> tuple[int, str, str]:
        """The reply to an exception from a validator or a message.

        Twisted wants a str ``resp`` from validators and bytes from messages
        and hangs the client otherwise (S11); we take either.
        """
        error = failure.value
        if isinstance(error, Refusal):
            return error.code, error.enhanced, error.text
        if not isinstance(error, smtp.SMTPServerError):
            log.err(failure, "unexpected error in SMTP session")
            return _LOCAL_ERROR
        resp = error.resp
        if isinstance(resp, bytes):
            resp = resp.decode("utf-8", "replace")
        if not _ENHANCED.match(resp):
            return error.code, f"{error.code // 100}.0.0", resp
        enhanced, _, text = resp.partition(" ")
        return error.code, enhanced, text

    # -- input ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode == CLOSED:
            return
        if not self.limits.stressed or b"\n" in data:
            # Under stress the timer runs per line, not per read (Postfix's
            # smtpd_per_record_deadline): a byte now and then keeps no
            # session open.
            self.resetTimeout()
        if self._mode == DATA and not self._input and not self._output_blocked:
            # The common case in DATA: decode without copying into _input.
            self._feed_data(data)
        else:
            self._input += data
        self._process()

    def _process(self) -> None:
        """Run what is buffered, in order, until a command is outstanding.

        Re-entrant calls (a command answered synchronously finishing inside
        the loop) return at once; the loop that is running goes on, so the
        stack does not grow with the number of pipelined commands.
        """
        if self._processing:
            return
        self._processing = True
        try:
            while not (self._busy or self._output_blocked) and self._mode != CLOSED:
                if self._mode == DATA:
                    if not self._input:
                        break
                    pending = bytes(self._input)
                    self._input.clear()
                    self._feed_data(pending)
                    continue
                if self._shutting_down:
                    self._say_shutting_down()
                    break
                line = self._next_line()
                if line is None:
                    break
                if self._mode == AUTH:
                    self._run_handler(self.auth_line, line)
                else:
                    self._execute(line)
        finally:
            self._processing = False
        self._flow_control()

    def _flow_control(self) -> None:
        """Stop reading once input piles up behind a stalled session.

        Stalled: a command is outstanding, or replies cannot go out.  Reading
        goes on until then, because TLS must read to be able to write (a
        handshake holds back the greeting of an implicit TLS session).
        """
        stalled = self._busy or self._output_blocked
        stop = stalled and len(self._input) > _PAUSE_BUFFER
        if stop != self._paused and self._mode != CLOSED:
            self._paused = stop
            if stop:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _next_line(self) -> bytes | None:
        """The next well-formed command line without its CRLF.

        None means: wait for more input.  Malformed lines are answered here
        and skipped; a line over the limit is discarded up to its end
        without keeping it (S2).
        """
        buffer = self._input
        while self._mode != CLOSED:
            if self._skipping_long_line and not self._skip_rest_of_line():
                return None
            limit = MAX_AUTH_LINE if self._mode == AUTH else MAX_COMMAND_LINE
            end = buffer.find(b"\n", 0, limit)
            if end < 0:
                if len(buffer) < limit:
                    return None
                self._skipping_long_line = True
                self._refuse_line("line too long")
                continue
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if not line.endswith(b"\r") or b"\r" in line[:-1]:
                self._refuse_line("bare CR or LF received; lines end in CRLF")
            elif _CONTROL.search(line, 0, len(line) - 1):
                self._refuse_line("control character in command")
            else:
                return line[:-1]
        return None

    def _refuse_line(self, reason: str) -> None:
        """Answer a malformed line; one inside AUTH also ends the exchange.

        Going on with the exchange would take the client's next commands
        for SASL responses (a QUIT as a user name).
        """
        if self._mode == AUTH:
            self._mode = COMMAND
            self._challenger = None
            self.reply(501, "5.5.2", f"Error: {reason}; authentication aborted")
        else:
            self.reply(500, "5.5.2", f"Error: {reason}")

    def _skip_rest_of_line(self) -> bool:
        """Drop input up to the end of an over-long line; True once found."""
        end = self._input.find(b"\n")
        if end < 0:
            self._input.clear()
            return False
        del self._input[: end + 1]
        self._skipping_long_line = False
        return True

    def _execute(self, line: bytes) -> None:
        verb, _, argument = line.partition(b" ")
        self._junk_verb = verb.upper() in _JUNK_VERBS
        # lookupMethod would raise on a non-ASCII verb (S8).
        if not verb.isalpha() or not verb.isascii():
            self.reply(500, "5.5.2", "Error: command not recognized")
            return
        method = self.lookupMethod(verb)
        if method is None:
            self.do_UNKNOWN(argument)
            return
        self._run_handler(method, argument)

    def _run_handler(self, method: Callable, argument: bytes) -> None:
        """Call a command's handler; a Deferred result holds further input."""
        try:
            result = method(argument)
        except Exception:
            self._reply_failure(Failure())
            return
        if isinstance(result, defer.Deferred):
            result.addErrback(self._reply_failure)
            self._wait_for(result)

    def _wait_for(self, d: defer.Deferred) -> None:
        """Hold further input until ``d`` fires."""
        self._busy = True
        d.addBoth(self._command_done)
        if self._busy:
            # Still outstanding: the wait is ours, not the client's, so the
            # idle timer stops until the answer is sent.
            self.setTimeout(None)

    def _command_done(self, _ignored) -> None:
        self._busy = False
        if self._mode != CLOSED:
            if self.timeOut is None:
                self.setTimeout(self.timeout)
            self._process()

    # -- commands -------------------------------------------------------

    def do_UNKNOWN(self, rest: bytes) -> None:
        self.reply(500, "5.5.2", "Error: command not recognized")

    def do_HELO(self, rest: bytes) -> None:
        if not rest.strip():
            return self.reply(501, "5.5.4", "Syntax: HELO hostname")
        self._greeted(rest, esmtp=False)
        # RFC 2034: no enhanced status code in answers to HELO and EHLO.
        self.sendCode(250, self.host)

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
        if self.auth_offered():
            extensions[b"AUTH"] = list(self.challengers)
        return extensions

    def do_MAIL(self, rest: bytes):
        if self._helo[0] is None:
            return self.reply(503, "5.5.1", "Error: send HELO/EHLO first")
        if self._mail is not None:
            return self.reply(503, "5.5.1", "Error: nested MAIL command")
        if self.settings.require_auth and not self.authenticated:
            return self._refuse("MAIL", (530, "5.7.0", "Authentication required"))
        try:
            command = parse_mail(rest, max_size=self.settings.max_message_size)
        except PathError as error:
            return self.reply(error.code, error.enhanced, error.text)
        d = defer.maybeDeferred(self.validateFrom, self._helo, command.sender)
        d.addCallback(self._sender_accepted, command)
        d.addErrback(self._refuse_failure, "MAIL", sender=command.sender)
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
        d.addErrback(self._refuse_failure, "RCPT", sender=self._from, recipient=command.recipient)
        return d

    def _recipient_accepted(self, factory: Callable, user: RcptUser) -> None:
        self._to.append((user, factory))
        self.reply(250, "2.1.5", "Ok")

    def do_DATA(self, rest: bytes) -> None:
        if self._mail is None:
            return self.reply(503, "5.5.1", "Error: need MAIL command")
        if not self._to:
            return self.reply(554, "5.5.1", "Error: no valid recipients")
        if rest.strip():
            return self.reply(501, "5.5.4", "Error: DATA takes no arguments")
        try:
            self._message = self._open_message()
        except Exception:
            return self._refuse_failure(Failure(), "DATA", **self._envelope())
        self._decoder = DataDecoder(
            self._write_body, self.settings.max_message_size, self.settings.max_hops
        )
        self._mode = DATA
        # Enhanced codes have no class 3 (RFC 3463): none on 354, like Postfix.
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _open_message(self):
        """One message for all recipients, unless the avatar is Twisted-style."""
        received = self.receivedHeader(self._helo, self._from, [user for user, _ in self._to])
        if ITransactionDelivery.providedBy(self.delivery):
            return self.delivery.open_message(received)
        return LineFanout.open([factory for _, factory in self._to], received)

    def _write_body(self, data: bytes) -> None:
        """Store body bytes; an error is answered at the end of DATA.

        Twisted lets an ``IMessage`` raise ``SMTPServerError`` from
        ``lineReceived`` to refuse a message in the middle (a size limit,
        a full disk); the rest of the body is then read and dropped.
        """
        if self._write_failure is not None:
            return
        try:
            self._message.write(data)
        except Exception:
            self._write_failure = Failure()

    def _feed_data(self, data: bytes) -> None:
        rest = self._decoder.feed(data)
        if rest is not None:
            self._input[:0] = rest
            self._end_of_data()

    def _end_of_data(self) -> None:
        decoder, message, failure = self._decoder, self._message, self._write_failure
        self._mode = COMMAND
        self._decoder = self._message = self._write_failure = None
        if decoder.fault is not None or failure is not None:
            message.connectionLost()
            if decoder.fault is not None:
                self._refuse_message(_MESSAGE_FAULTS[decoder.fault])
            else:
                self._refuse_message(self._failure_reply(failure))
            self._reset_transaction()
            return
        d = defer.maybeDeferred(message.eomReceived)
        d.addCallback(self._message_stored, decoder.size)
        d.addErrback(lambda failure: self._refuse_message(self._failure_reply(failure)))
        d.addBoth(lambda _: self._reset_transaction())
        self._wait_for(d)

    def _refuse_message(self, reply: tuple[int, str, str]) -> None:
        queue_id = getattr(self.delivery, "queue_id", None)
        self._refuse("END-OF-MESSAGE", reply, queue_id=queue_id, **self._envelope())

    def _envelope(self) -> dict[str, object]:
        """The sender and the first recipient, as Postfix logs them after RCPT."""
        first = self._to[0][0].dest if self._to else None
        return {"sender": self._from, "recipient": first}

    def _message_stored(self, _result, size: int) -> None:
        queue_id = getattr(self.delivery, "queue_id", None) or "-"
        self._junk = 0
        maillog.accepted(
            queue_id,
            str(self._from),
            size,
            len(self._to),
            client_ip=self.session.client_ip,
            listener=self.settings.listener,
            tls=self.session.tls,
            sasl_username=self.session.user,
        )
        self.reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    def do_RSET(self, rest: bytes) -> None:
        self._reset_transaction()
        self.reply(250, "2.0.0", "Ok")

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0", "Ok")

    def do_VRFY(self, rest: bytes) -> None:
        if not rest.strip():
            return self.reply(501, "5.5.4", "Syntax: VRFY address")
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
        # RFC 3207 4.2: forget everything, including what was pipelined (S3).
        self._input.clear()
        self.reply(220, "2.0.0", "Ready to start TLS")
        self.transport.startTLS(self.ctx)
        self.startedTLS = True
        self._forget_session()

    # -- state ------------------------------------------------------------

    def _forget_session(self) -> None:
        """Back to the state right after the greeting (S4)."""
        self._reset_transaction()
        self._helo = (None, self.session.client_ip.encode("ascii"))
        self.session.helo = None
        self.session.esmtp = False
        self.session.user = None
        self.authenticated = False
        if self._onLogout:
            self._onLogout()
            self._onLogout = None
        self.deliveryFactory = None
        self.delivery = None

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
        self._write_failure = None

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

    def __init__(self, messages: Sequence, received: bytes | None) -> None:
        self.messages = messages
        self._partial = b""
        if received:
            # Twisted passes its (folded) Received header as one line.
            for message in messages:
                message.lineReceived(received.removesuffix(b"\n"))

    @classmethod
    def open(cls, factories: Sequence[Callable], received: bytes | None) -> LineFanout:
        """Call every factory; if one fails, release the messages made so far."""
        messages = []
        try:
            for factory in factories:
                messages.append(factory())
            return cls(messages, received)
        except BaseException:
            for message in messages:
                message.connectionLost()
            raise

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
        throttle: AuthThrottle | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        super().__init__(portal)
        self.limits = limits
        self.context_factory = context_factory
        self.throttle = throttle
        self.sessions = sessions if sessions is not None else Sessions()
        self.reconfigure(portal, settings, challengers or {})

    def reconfigure(self, portal, settings: ServerSettings, challengers: dict) -> None:
        """What new connections get from now on; open ones keep theirs."""
        self.portal = portal
        self.settings = settings
        self.challengers = challengers
        self.domain = settings.hostname.encode("ascii")

    def buildProtocol(self, addr) -> MTAServer:
        server = MTAServer(
            self.settings,
            self.limits,
            dict(self.challengers),
            self.context_factory,
            self.throttle,
            sessions=self.sessions,
        )
        server.factory = self
        server.portal = self.portal
        return server
