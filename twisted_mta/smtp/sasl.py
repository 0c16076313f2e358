"""The AUTH command (RFC 4954) of the server, written fresh.

Twisted's ``ext_AUTH``/``state_AUTH`` offer AUTH before TLS, accept it in
the middle of a transaction, decode base64 leniently, crash on malformed
input and never slow down a guesser (audit 2.4, S5, S8).  Here:

* AUTH is offered only where a checker can verify the mechanism and, with
  ``require_tls``, only once TLS is up;
* AUTH twice, or inside a transaction, is 503 5.5.1;
* responses are strict base64 (``=`` is the empty response), ``*``
  cancels with 501 5.0.0, malformed input is 501 5.5.2;
* password checks are throttled per client address (``AuthThrottle``):
  once an address has failed, every answer to it (a success too) comes
  after a growing delay, however the client hangs up and reconnects; an
  address with too many recent failures, or with checks already under
  way, gets 454 4.7.0 at once; a check whose client has gone is withdrawn;
* a wrong password is answered 535 5.7.8; the last failure a connection
  is allowed is followed by 421 4.7.0 and the connection is closed;
* every failure is logged on one line fail2ban can read, and so is the
  first AUTH refused without a check after each failure.

An ``Authenticator`` is the AUTH of one session.  The server makes it when
the connection opens, with the settings, throttle, clock and ``Session``
(the cred mind) it needs, hands it each AUTH command and each line that
answers a 334 challenge, and is its ``SaslHost``: the few things the
exchange asks of the session (its portal and mechanisms, reply, challenge,
log in, close).  The portal and mechanisms are the session's of the
moment, as with Twisted's ``ESMTP``, whose users may set ``portal`` and
``challengers`` on a server at any time.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from functools import partial
from typing import Protocol

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from twisted.python.failure import Failure

from twisted_mta import maillog
from twisted_mta.auth.mechanisms import MalformedResponse
from twisted_mta.auth.throttle import AuthThrottle, Refusal
from twisted_mta.directory.watched import DirectoryUnavailable
from twisted_mta.intake.acceptance import Session
from twisted_mta.smtp.limits import ServerSettings

_NEEDS = {
    b"PLAIN": IUsernamePassword,
    b"LOGIN": IUsernamePassword,
    b"CRAM-MD5": IUsernameHashedPassword,
}

_log = Logger()



def usable_mechanisms(
    mechanisms: dict[bytes, object], portal: Portal | None
) -> dict[bytes, object]:
    """The mechanisms some checker of ``portal`` can verify."""
    if portal is None:
        return {}
    interfaces = set(portal.listCredentialsInterfaces())
    return {name: maker for name, maker in mechanisms.items() if _NEEDS.get(name) in interfaces}


class SaslHost(Protocol):
    """What an ``Authenticator`` asks of its session."""

    portal: Portal | None
    challengers: dict[bytes, Callable]

    @property
    def closed(self) -> bool:
        """Whether the session is closing: nothing more is said."""

    def reply(self, code: int, enhanced: str, text: str) -> None:
        """Send a reply."""

    def send_challenge(self, encoded: bytes) -> None:
        """Send a 334 challenge; the next line is the client's response."""

    def log_in(self, login: tuple) -> None:
        """Take the ``(interface, avatar, logout)`` of a successful login."""

    def close(self) -> None:
        """Close the session."""


class Authenticator:
    """The AUTH exchanges of one session, and its count of failed ones."""

    # One per session, idle ones included: no instance dict.
    __slots__ = (
        "_host", "_settings", "_throttle", "_clock", "_session",
        "_challenger", "_mechanism", "_failures", "_attempt",
    )

    def __init__(
        self,
        host: SaslHost,
        settings: ServerSettings,
        throttle: AuthThrottle,
        clock: IReactorTime,
        session: Session,
    ) -> None:
        self._host = host
        self._settings = settings
        self._throttle = throttle
        self._clock = clock
        self._session = session
        self._challenger = None
        self._mechanism = ""
        self._failures = 0
        self._attempt: defer.Deferred | None = None

    def offered(self, tls: bool, authenticated: bool) -> list[bytes]:
        """The mechanisms EHLO announces; none if AUTH is not possible now."""
        challengers = self._host.challengers
        if not challengers or authenticated:
            return []
        if tls or not self._settings.auth_requires_tls:
            return list(challengers)
        return []

    def start(
        self, rest: bytes, *, tls: bool, authenticated: bool, in_transaction: bool
    ) -> defer.Deferred | None:
        """The AUTH command; a Deferred while the password is checked."""
        reply = self._host.reply
        challengers = self._host.challengers
        if not challengers:
            return reply(503, "5.5.1", "Error: authentication not enabled")
        if not tls and self._settings.auth_requires_tls:
            return reply(
                538, "5.7.11", "Encryption required for requested authentication mechanism"
            )
        if authenticated:
            return reply(503, "5.5.1", "Error: already authenticated")
        if in_transaction:
            return reply(503, "5.5.1", "Error: MAIL transaction in progress")
        words = rest.split(b" ")
        mechanism = words[0].upper()
        if not mechanism or len(words) > 2:
            return reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        if mechanism not in challengers:
            return reply(504, "5.5.4", "Error: unsupported authentication mechanism")
        if self._host.portal is None:
            return reply(454, "4.7.0", "Temporary authentication failure")
        self._mechanism = mechanism.decode("ascii")
        if self._refused():
            return None
        self._challenger = challengers[mechanism]()
        if len(words) == 2:
            # The initial response answers the first challenge (RFC 4954 4),
            # so that challenge is taken, unsent, as Twisted's server does:
            # challengers that pop their prompts from a list (Twisted's
            # LOGINCredentials) would otherwise ask for the user name again.
            self._challenger.getChallenge()
            return self._response(words[1])
        return self._send_challenge()

    def respond(self, line: bytes) -> defer.Deferred | None:
        """A client response to the last challenge."""
        if line == b"*":
            self._challenger = None
            return self._host.reply(501, "5.0.0", "Authentication aborted")
        return self._response(line)

    def abort(self) -> None:
        """The session refused a line of the exchange; the exchange is over."""
        self._challenger = None

    def cancel(self) -> None:
        """The client has gone: withdraw a check still under way."""
        if self._attempt is not None:
            self._attempt.cancel()

    def _send_challenge(self) -> None:
        self._host.send_challenge(base64.b64encode(self._challenger.getChallenge()))

    def _response(self, encoded: bytes) -> defer.Deferred | None:
        try:
            response = b"" if encoded == b"=" else base64.b64decode(encoded, validate=True)
            self._challenger.setResponse(response)
        except (binascii.Error, ValueError) as error:
            self._challenger = None
            reason = str(error) if isinstance(error, MalformedResponse) else "invalid base64"
            return self._host.reply(501, "5.5.2", f"Error: {reason}")
        if self._challenger.moreChallenges():
            return self._send_challenge()
        challenger, self._challenger = self._challenger, None
        if self._refused():
            return None
        d = self._attempt = self._throttle.attempt(
            self._session.client_ip,
            partial(self._check, challenger),
            self._clock,
            self._failures,
        )
        d.addCallbacks(self._logged_in, self._login_failed)
        return d

    def _refused(self) -> bool:
        """Answer 454 at once if the client's address may not try now."""
        ip = self._session.client_ip
        refusal = self._throttle.refusal(ip, self._clock.seconds())
        if refusal is None:
            return False
        self._challenger = None
        if refusal is Refusal.BLOCKED and self._throttle.block_is_news(ip):
            maillog.auth_blocked(ip, self._mechanism, refusal.value)
        self._host.reply(454, "4.7.0", f"Error: {refusal.value}, try again later")
        return True

    def _check(self, challenger) -> defer.Deferred:
        """The password check; a failure is logged even if the client has gone."""
        portal = self._host.portal
        d = portal.login(challenger, self._session, IMessageDeliveryFactory, IMessageDelivery)
        return d.addErrback(self._log_failure, challenger)

    def _log_failure(self, failure: Failure, challenger) -> Failure:
        if failure.check(UnauthorizedLogin):
            ip = self._session.client_ip
            user = _printable(challenger.username.decode("utf-8", "replace"))
            maillog.auth_failed(ip, self._mechanism, user)
        return failure

    def _logged_in(self, login: tuple) -> None:
        self._attempt = None
        if self._host.closed:
            login[2]()
            return
        self._host.log_in(login)
        self._host.reply(235, "2.7.0", "Authentication successful")

    def _login_failed(self, failure: Failure) -> None:
        self._attempt = None
        if self._host.closed:
            return
        if failure.check(UnauthorizedLogin):
            return self._answer_failure()
        if failure.check(DirectoryUnavailable):
            _log.info("auth: {reason}; answered 454 4.7.0", reason=str(failure.value))
        else:
            _log.failure("authentication error", failure)
        self._host.reply(454, "4.7.0", "Temporary authentication failure")

    def _answer_failure(self) -> None:
        self._failures += 1
        self._host.reply(535, "5.7.8", "Authentication credentials invalid")
        if self._failures >= self._settings.max_auth_failures:
            self._host.reply(421, "4.7.0", "Too many authentication failures")
            self._host.close()


def _printable(text: str) -> str:
    """A user name safe to log on one line (no spaces or control characters)."""
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in text) or "-"
