"""The ESMTP server: what the commands of a session mean.

``MTAServer`` is Twisted's ``ESMTP`` through ``Dialogue`` (``dialogue.py``),
which reads the commands and answers them in order.  We keep Twisted's
public extension points: the ``portal`` and the cred flow, ``challengers``,
``IMessageDelivery`` / ``IMessageDeliveryFactory`` avatars,
``validateFrom`` / ``validateTo`` / ``receivedHeader``, ``greeting``,
``extensions`` and the ``do_*`` / ``ext_*`` dispatch through
``lookupMethod``.  What the audit found broken is overridden:

* DATA is decoded per buffer (``data.py``) and never falls back to
  command mode (S1, S10); one message is written for all recipients,
  unless the avatar is Twisted-style (``fanout.py``); arriving
  ``Authentication-Results`` headers that claim our hostname are removed
  (RFC 8601 section 5);
* input pipelined behind STARTTLS is discarded and the session starts over
  inside TLS (S3, S4);
* AUTH is our own (``sasl.py``; S5);
* replies to HELO and EHLO carry no enhanced status code (RFC 2034), nor
  does the 354, which has no class in RFC 3463; errors raised by
  validators or messages are answered whatever their ``resp`` type (S11);
* limits: message size, recipients, connections (``limits.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.cred.credentials import Anonymous
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer, reactor
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    ITLSTransport,
)
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta import maillog
from twisted_mta.auth.throttle import AuthThrottle
from twisted_mta.intake.acceptance import Session
from twisted_mta.intake.policies import NO_POLICIES, Outcome, PolicyChain, session_info
from twisted_mta.mail.address import PathError, parse_mail, parse_rcpt
from twisted_mta.mail.authresults import claimed_remover
from twisted_mta.maillog import Stage
from twisted_mta.smtp.data import FAULT_REPLIES, DataTransfer
from twisted_mta.smtp.dialogue import Dialogue
from twisted_mta.smtp.fanout import LineFanout, RcptUser
from twisted_mta.smtp.limits import ConnectionLimits, ServerSettings, Sessions
from twisted_mta.smtp.modes import AUTH, CLOSED, COMMAND, DATA
from twisted_mta.smtp.realm import ITransactionDelivery
from twisted_mta.smtp.replies import failure_reply
from twisted_mta.smtp.sasl import Authenticator


@implementer(IHandshakeListener)
class MTAServer(Dialogue):
    """One SMTP session: what its commands mean.

    Reading and answering them is ``Dialogue``'s; AUTH is the
    ``Authenticator``'s, made when the connection opens.  ``reply``,
    ``send_challenge``, ``log_in``, ``close`` and ``closed`` are what the
    ``Authenticator`` may use (``SaslHost``).
    """

    # Class defaults, as ``Dialogue``'s: set on the instance once changed.
    session: Session | None = None
    _auth: Authenticator | None = None
    _counted = False
    _handshaken = False
    _transfer: DataTransfer | None = None
    _mail = None
    _offered = None

    def __init__(
        self,
        settings: ServerSettings,
        limits: ConnectionLimits,
        challengers: dict | None = None,
        context_factory: IOpenSSLServerConnectionCreator | None = None,
        throttle: AuthThrottle | None = None,
        clock: IReactorTime | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        super().__init__(settings, limits, challengers, context_factory)
        self.sessions = sessions if sessions is not None else Sessions()
        self.throttle = throttle or AuthThrottle(base_delay=1.0)
        self.clock = clock or reactor

    # -- connection ---------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        ip = getattr(peer, "host", str(peer))
        self.session = Session(self.settings.listener, ip)
        self._auth = Authenticator(self, self.settings, self.throttle, self.clock, self.session)
        self.sessions.add(self)
        if self.sessions.closing:
            self.shut_down()
            return
        slot = self.limits.acquire(ip)
        if isinstance(slot, defer.Deferred):
            # The connections are counted by another process (workers): no
            # greeting, and no command read, before its answer.
            self.setTimeout(None)
            # An implicit TLS handshake runs meanwhile: if the client goes
            # before the answer, its failure is still counted at the loss.
            self.startedTLS = self.settings.implicit_tls
            slot.addErrback(self._count_unknown)
            slot.addCallback(self._slot_decided, ip)
            self.wait_for(slot)
            return
        d = self._slot_decided(slot, ip)
        if d is not None:
            self.wait_for(d)

    def _count_unknown(self, failure: Failure) -> bool:
        """No answer from whoever counts: the connection is refused."""
        return False

    def _slot_decided(self, allowed: bool, ip: str) -> defer.Deferred | None:
        """Greet a connection within the limits, after the ``connect``
        policies if there are any; their Deferred, to wait for."""
        if self.closed:
            if allowed:
                self.limits.release(ip)
            return None
        if not allowed:
            refusal = (421, "4.7.0", f"{self.hostname} Too many connections, try later")
            self._refuse("CONNECT", refusal)
            self.close()
            return None
        self._counted = True
        self.canStartTLS = (
            ITLSTransport.providedBy(self.transport)
            and self.ctx is not None
            and not self.settings.implicit_tls
        )
        if self.settings.implicit_tls:
            self.startedTLS = True
        policies = self._policies()
        if not policies.has("connect"):
            super().connectionMade()
            return None
        # No greeting, and no command read, until the policies have spoken.
        self.setTimeout(None)
        d = policies.run("connect", session_info(self.session))
        return d.addCallback(self._connect_decided)

    def _policies(self) -> PolicyChain:
        return getattr(getattr(self.portal, "realm", None), "policies", NO_POLICIES)

    def _connect_decided(self, outcome: Outcome) -> None:
        if self.closed:
            return
        verdict = outcome.refusal
        if verdict is None:
            super().connectionMade()
            return
        # RFC 5321 3.1: a server that will not serve says so in its greeting.
        code = 554 if verdict.code >= 500 else 421
        self.sendCode(code, f"{verdict.enhanced} {verdict.text}".encode())
        maillog.reject(self.session, "CONNECT", code, verdict.enhanced, verdict.text)
        self.close()

    def greeting(self) -> bytes:
        return self.host + b" ESMTP"

    def connectionLost(self, reason: Failure) -> None:
        in_data = self.input_mode == DATA
        self.input_mode = CLOSED
        self._drop_message()
        if in_data:
            maillog.lost_after_data(
                getattr(self.delivery, "queue_id", None), self.session.client_ip
            )
        if self._counted:
            self._counted = False
            self.limits.release(self.session.client_ip)
        if self.startedTLS and not self._handshaken:
            self.sessions.handshake_failed(self.settings.listener)
        self.sessions.remove(self)
        if self._auth is not None:
            self._auth.cancel()
        super().connectionLost(reason)

    def handshakeCompleted(self) -> None:
        """The TLS layer's word that its handshake is done (implicit TLS or
        STARTTLS); one that never comes is a failure, told at the loss."""
        self._handshaken = True
        self.sessions.handshake_completed(self.settings.listener)

    def close(self, abort: bool = False) -> None:
        """Drop a message being received, and close."""
        self._drop_message()
        super().close(abort)

    # -- refusals -------------------------------------------------------

    def _refuse(self, stage: Stage, reply: tuple[int, str, str], **envelope: object) -> None:
        """Answer a refused connection, command or message, and log it.

        ``envelope``: the sender, recipient and queue id known so far, as
        text or as addresses, written out only when a refusal is logged.
        """
        self.reply(*reply)
        known = {key: None if value is None else str(value) for key, value in envelope.items()}
        maillog.reject(self.session, stage, *reply, **known)

    def _refuse_failure(self, failure: Failure, stage: Stage, **envelope: object) -> None:
        self._refuse(stage, failure_reply(failure), **envelope)

    def command_failed(self, failure: Failure) -> None:
        self.reply(*failure_reply(failure))

    # -- commands -------------------------------------------------------

    def do_HELO(self, rest: bytes) -> defer.Deferred | None:
        if not rest.strip():
            return self.reply(501, "5.5.4", "Syntax: HELO hostname")
        return self._ask_helo(rest, esmtp=False)

    def do_EHLO(self, rest: bytes) -> defer.Deferred | None:
        if not rest.strip():
            return self.reply(501, "5.5.4", "Syntax: EHLO hostname")
        return self._ask_helo(rest, esmtp=True)

    def _ask_helo(self, rest: bytes, esmtp: bool) -> defer.Deferred | None:
        policies = self._policies()
        if not policies.has("helo"):
            return self._hello(rest, esmtp)
        name = rest.strip().decode("utf-8", "replace")
        d = policies.run("helo", session_info(self.session), name)
        d.addCallback(self._helo_decided, rest, esmtp)
        return d

    def _helo_decided(self, outcome: Outcome, rest: bytes, esmtp: bool) -> None:
        verdict = outcome.refusal
        if verdict is None:
            return self._hello(rest, esmtp)
        reply = (verdict.code, verdict.enhanced, verdict.text)
        self._refuse("HELO", reply)

    def _hello(self, rest: bytes, esmtp: bool) -> None:
        self._greeted(rest, esmtp)
        if not esmtp:
            # RFC 2034: no enhanced status code in answers to HELO and EHLO.
            self.sendCode(250, self.host)
            return
        peer = self.session.client_ip
        lines = [f"{self.hostname} Hello [{peer}]"]
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
        mechanisms = self._auth.offered(self.startedTLS, self.authenticated)
        if mechanisms:
            extensions[b"AUTH"] = mechanisms
        return extensions

    def do_MAIL(self, rest: bytes) -> defer.Deferred | None:
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
        self._offered = command
        d = defer.maybeDeferred(self.validateFrom, self._helo, command.sender)
        d.addCallback(self._sender_accepted, command)
        d.addErrback(self._refuse_failure, "MAIL", sender=command.sender)
        return d

    def _sender_accepted(self, sender, command) -> None:
        self._mail = command
        self._from = sender
        self._to = []
        self.reply(250, "2.1.0", "Ok")

    def validateFrom(
        self, helo: tuple[bytes | None, bytes], origin: smtp.Address
    ) -> defer.Deferred:
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
        if self.deliveryFactory is not None:
            self.delivery = self.deliveryFactory.getMessageDelivery()
        if ITransactionDelivery.providedBy(self.delivery) and self._offered is not None:
            # Told before it decides: the policies see MAIL's parameters.
            command = self._offered
            self.delivery.utf8 = command.smtputf8
            self.delivery.body = command.body or "7BIT"
            self.delivery.mail_params = dict(command.params)
        if self.delivery is None:
            raise smtp.SMTPBadSender(origin)
        return defer.maybeDeferred(self.delivery.validateFrom, helo, origin)

    def _anonymous_refused(self, failure: Failure):
        failure.trap(UnauthorizedLogin, UnhandledCredentials)
        raise smtp.SMTPServerError(530, "5.7.0 Authentication required")

    def do_RCPT(self, rest: bytes) -> defer.Deferred | None:
        if self._mail is None:
            return self.reply(503, "5.5.1", "Error: need MAIL command")
        if len(self._to) >= self.settings.max_recipients:
            return self.reply(452, "4.5.3", "Error: too many recipients")
        try:
            command = parse_rcpt(rest, smtputf8=self._mail.smtputf8)
        except PathError as error:
            return self.reply(error.code, error.enhanced, error.text)
        user = RcptUser(command.recipient, self._helo, self, self._from, command.params)
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
            message = self._open_message()
        except Exception:
            return self._refuse_failure(Failure(), "DATA", **self._envelope())
        self._transfer = DataTransfer(
            message,
            self.settings.max_message_size,
            self.settings.max_hops,
            claimed_remover(self.hostname),
        )
        self.input_mode = DATA
        # Enhanced codes have no class 3 (RFC 3463): none on 354, like Postfix.
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _open_message(self):
        """One message for all recipients, unless the avatar is Twisted-style.

        A Twisted-style avatar gets one message per recipient, each with the
        Received header ``receivedHeader`` gives for that recipient alone, as
        Twisted's server asks for it: a header written for all of them would
        show every copy who else (Bcc) received the message.
        """
        if ITransactionDelivery.providedBy(self.delivery):
            received = self.receivedHeader(self._helo, self._from, [user for user, _ in self._to])
            return self.delivery.open_message(received)
        return LineFanout.open(self._to, self._received_for)

    def _received_for(self, user: RcptUser) -> bytes | None:
        return self.receivedHeader(self._helo, self._from, [user])

    def message_data(self, data: bytes) -> None:
        rest = self._transfer.feed(data)
        if rest is not None:
            self.input.push_front(rest)
            self._end_of_data()

    def _end_of_data(self) -> None:
        transfer, self._transfer = self._transfer, None
        decoder, message, failure = transfer.decoder, transfer.message, transfer.failure
        self.input_mode = COMMAND
        if decoder.fault is not None or failure is not None:
            message.connectionLost()
            if decoder.fault is not None:
                self._refuse_message(FAULT_REPLIES[decoder.fault])
            else:
                self._refuse_message(failure_reply(failure))
            self._reset_transaction()
            return
        d = defer.maybeDeferred(message.eomReceived)
        d.addCallback(self._message_stored, decoder.size)
        d.addErrback(lambda failure: self._refuse_message(failure_reply(failure)))
        d.addBoth(lambda _: self._reset_transaction())
        self.wait_for(d)

    def _refuse_message(self, reply: tuple[int, str, str]) -> None:
        queue_id = getattr(self.delivery, "queue_id", None)
        self._refuse("END-OF-MESSAGE", reply, queue_id=queue_id, **self._envelope())

    def _envelope(self) -> dict[str, object]:
        """The sender and the first recipient, as Postfix logs them after RCPT."""
        first = self._to[0][0].dest if self._to else None
        return {"sender": self._from, "recipient": first}

    def _message_stored(self, _result, size: int) -> None:
        queue_id = getattr(self.delivery, "queue_id", None) or "-"
        self.message_accepted()
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
        self.close()

    def ext_STARTTLS(self, rest: bytes) -> None:
        if self.startedTLS:
            return self.reply(503, "5.5.1", "Error: TLS already active")
        if not self.canStartTLS:
            return self.reply(454, "4.7.0", "TLS not available")
        if rest.strip():
            return self.reply(501, "5.5.4", "Error: STARTTLS takes no arguments")
        # RFC 3207 4.2: forget everything, including what was pipelined (S3).
        self.input.clear()
        self.reply(220, "2.0.0", "Ready to start TLS")
        self.transport.startTLS(self.ctx)
        self.startedTLS = True
        self._forget_session()

    # -- AUTH: the Authenticator answers, through the SaslHost methods ---

    def ext_AUTH(self, rest: bytes) -> defer.Deferred | None:
        return self._auth.start(
            rest,
            tls=self.startedTLS,
            authenticated=self.authenticated,
            in_transaction=self._mail is not None,
        )

    def send_challenge(self, encoded: bytes) -> None:
        """A 334 challenge; the next line is the client's response."""
        self.sendCode(334, encoded)
        self.input_mode = AUTH

    def response_received(self, line: bytes) -> defer.Deferred | None:
        return self._auth.respond(line)

    def response_refused(self, reason: str) -> None:
        self._auth.abort()
        self.reply(501, "5.5.2", f"Error: {reason}; authentication aborted")

    def log_in(self, login: tuple) -> None:
        """Take the avatar of a successful AUTH, as Twisted's ESMTP does."""
        self._cbAuthenticated(login)
        self.session.user = getattr(self.deliveryFactory, "user", None)

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
        if self._transfer is not None:
            self._transfer.message.connectionLost()
            self._transfer = None

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
