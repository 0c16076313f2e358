"""How an SMTP session reads and answers: one command, one reply, in order.

``Dialogue`` is Twisted's ``ESMTP`` with its input side replaced; what the
commands mean is ``MTAServer``'s (``server.py``).  Here:

* input is our own ``InputBuffer`` (``input.py``), not ``LineOnlyReceiver``;
  a malformed line gets a reply, never a dropped connection (S8); in DATA
  the input goes to the session a buffer at a time and never falls back to
  command mode (S1, S10);
* commands run strictly one after another, the next waiting for the reply
  to the previous one, so PIPELINING is safe (S6); reading stops while
  input piles up behind an outstanding command or behind replies the
  client does not read;
* every reply carries an enhanced status code;
* limits on errors, on commands that make no progress and on idle time,
  shorter under stress (``limits.py``); a closing connection is cut if the
  client does not let it close.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IPushProducer
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta.smtp.input import MAX_AUTH_LINE, MAX_COMMAND_LINE, InputBuffer, Malformed
from twisted_mta.smtp.limits import ConnectionLimits, ServerSettings
from twisted_mta.smtp.modes import AUTH, CLOSED, COMMAND, DATA

# Input kept while the session is stalled before we stop reading.
_PAUSE_BUFFER = 64 * 1024
# Commands that make no progress; with refused ones, they are junk.
_JUNK_VERBS = frozenset({b"NOOP", b"RSET", b"VRFY", b"HELP"})
# How long a closing connection may wait for the client to take our last
# reply and, on TLS, to answer close_notify, before it is cut.
CLOSE_GRACE = 1.0


@implementer(IPushProducer)
class Dialogue(smtp.ESMTP):
    """The turn-taking of one SMTP session.

    Input goes into ``input``; ``_process`` takes one command line at a
    time from it and runs the command through ``lookupMethod``.  What the
    input means is ``input_mode`` (``modes.py``): the session sets DATA
    after its 354, and the bytes go to ``message_data``; AUTH after a 334,
    and the next line goes to ``response_received``; COMMAND when they
    end.  ``close`` sets CLOSED.

    A command whose answer is a Deferred makes the session *busy*: nothing
    more is read from the buffer (and, past ``_PAUSE_BUFFER``, from the
    socket) until it is answered, which is what keeps pipelined replies in
    order; ``wait_for`` makes it busy too.

    The dialogue is also the producer of its replies: while the transport's
    write buffer is full (a client that pipelines without reading), no
    command runs, and input is buffered only up to ``_PAUSE_BUFFER``, so
    neither replies nor input pile up.
    """

    # The session's state starts as these class defaults: an instance holds
    # only what it changed, so that an idle session's attributes stay few
    # enough for CPython's compact shared-key dict (thousands of idle
    # sessions are held at once).
    input_mode = COMMAND
    _busy = False
    _processing = False
    _paused = False
    _output_blocked = False
    _errors = 0
    _junk = 0
    _junk_verb = False
    _cut = None
    _producing = False
    _shutting_down = False

    def __init__(
        self,
        settings: ServerSettings,
        limits: ConnectionLimits,
        challengers: dict | None = None,
        context_factory: IOpenSSLServerConnectionCreator | None = None,
    ) -> None:
        super().__init__(challengers, context_factory)
        self.host = settings.hostname
        self.settings = settings
        self.limits = limits
        self.input = InputBuffer()

    # -- what a session makes of its input ------------------------------

    def message_data(self, data: bytes) -> None:
        """Bytes in DATA.

        Once the message has ended, the session puts back what followed it
        (``input.push_front``) and sets ``input_mode`` to COMMAND.
        """
        raise NotImplementedError

    def response_received(self, line: bytes) -> defer.Deferred | None:
        """A line answering a SASL challenge (AUTH mode)."""
        raise NotImplementedError

    def response_refused(self, reason: str) -> None:
        """A malformed line in AUTH mode: answer it, the exchange is over."""
        raise NotImplementedError

    def command_failed(self, failure: Failure) -> None:
        """Answer a command that raised, or whose Deferred failed."""
        raise NotImplementedError

    # -- connection -----------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self._producing = True
        super().connectionMade()

    def connectionLost(self, reason: Failure) -> None:
        if self._cut is not None and self._cut.active():
            self._cut.cancel()
        super().connectionLost(reason)

    def shut_down(self) -> None:
        """A transaction in DATA may finish; then, or now, 421 and close."""
        self._shutting_down = True
        self._process()

    def _say_shutting_down(self) -> None:
        text = f"{self.hostname} Service shutting down, closing connection"
        self.reply(421, "4.3.2", text)
        self.close()

    def timeoutConnection(self) -> None:
        if self.input_mode != CLOSED:
            self.reply(421, "4.4.2", f"{self.hostname} Error: timeout exceeded")
        # A client that has not read our replies for a whole timeout would
        # keep the connection open, closing, until it reads the last one.
        self.close(abort=self._output_blocked)

    @property
    def hostname(self) -> str:
        """The name the server gives itself: Twisted's ``host``.

        The settings' hostname, unless the factory's ``domain`` (or whoever
        builds the server) sets ``host`` to another name.
        """
        return self.host.decode("ascii", "replace")

    @property
    def closed(self) -> bool:
        """Whether the session is closing: nothing more is said."""
        return self.input_mode == CLOSED

    def close(self, abort: bool = False) -> None:
        """Close the connection, for sure and soon.

        A registered producer makes a TLS transport wait with its close
        forever, and a TLS close waits for the client's close_notify, which
        a silent client never sends: after ``CLOSE_GRACE`` the connection
        is cut.
        """
        self.input_mode = CLOSED
        self.input.clear()
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
        if self.input_mode == CLOSED:
            return
        lines = text.splitlines() or [""]
        body = "\n".join(f"{enhanced} {line}" for line in lines)
        self.sendCode(code, body.encode("utf-8"))
        if code >= 500:
            self._count_error()
        self._count_junk(code)

    def message_accepted(self) -> None:
        """The client has made progress: the junk count starts again."""
        self._junk = 0

    def _count_error(self) -> None:
        self._errors += 1
        if self._errors >= self.settings.max_errors and self.input_mode != CLOSED:
            self.sendCode(421, b"4.7.0 Too many errors, closing connection")
            self.close()

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
        if not junk or self.input_mode == CLOSED:
            return
        self._junk += 1
        if self._junk >= self._junk_limit:
            self.sendCode(421, b"4.7.0 Too many commands without progress, closing connection")
            self.close()

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

    # -- input ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.input_mode == CLOSED:
            return
        if not self.limits.stressed or b"\n" in data:
            # Under stress the timer runs per line, not per read (Postfix's
            # smtpd_per_record_deadline): a byte now and then keeps no
            # session open.
            self.resetTimeout()
        if self.input_mode == DATA and not self.input and not self._output_blocked:
            # The common case in DATA: decode without copying into the buffer.
            self.message_data(data)
        else:
            self.input.append(data)
        self._process()

    def lineReceived(self, line: bytes) -> None:
        """A line without its CRLF, as Twisted's ``LineOnlyReceiver`` hands one over.

        Nothing of ours calls it, but code written for Twisted's server may
        (a subclass, a test).  Twisted's own ``lineReceived`` would run the
        line past everything here; this one puts it through the same input
        as bytes from the client, so it is checked, ordered and answered
        the same way.
        """
        self.dataReceived(line + b"\r\n")

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
            while not (self._busy or self._output_blocked) and self.input_mode != CLOSED:
                if self.input_mode == DATA:
                    if not self.input:
                        break
                    self.message_data(self.input.take_all())
                    continue
                if self._shutting_down:
                    self._say_shutting_down()
                    break
                line = self._next_line()
                if line is None:
                    break
                if self.input_mode == AUTH:
                    self.input_mode = COMMAND
                    self._run_handler(self.response_received, line)
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
        stop = stalled and len(self.input) > _PAUSE_BUFFER
        if stop != self._paused and self.input_mode != CLOSED:
            self._paused = stop
            if stop:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _next_line(self) -> bytes | None:
        """The next well-formed command line without its CRLF.

        None means: wait for more input.  Malformed lines are answered here
        and skipped.
        """
        while self.input_mode != CLOSED:
            limit = MAX_AUTH_LINE if self.input_mode == AUTH else MAX_COMMAND_LINE
            line = self.input.next_line(limit)
            if not isinstance(line, Malformed):
                return line
            self._refuse_line(line.reason)
        return None

    def _refuse_line(self, reason: str) -> None:
        """Answer a malformed line; one inside AUTH also ends the exchange.

        Going on with the exchange would take the client's next commands
        for SASL responses (a QUIT as a user name).
        """
        if self.input_mode == AUTH:
            self.input_mode = COMMAND
            self.response_refused(reason)
        else:
            self.reply(500, "5.5.2", f"Error: {reason}")

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
            self.command_failed(Failure())
            return
        if isinstance(result, defer.Deferred):
            result.addErrback(self.command_failed)
            self.wait_for(result)

    def wait_for(self, d: defer.Deferred) -> None:
        """Hold further input until ``d`` fires."""
        self._busy = True
        d.addBoth(self._command_done)
        if self._busy:
            # Still outstanding: the wait is ours, not the client's, so the
            # idle timer stops until the answer is sent.
            self.setTimeout(None)

    def _command_done(self, _ignored) -> None:
        self._busy = False
        if self.input_mode != CLOSED:
            if self.timeOut is None:
                self.setTimeout(self.timeout)
            self._process()

    def do_UNKNOWN(self, rest: bytes) -> None:
        self.reply(500, "5.5.2", "Error: command not recognized")
