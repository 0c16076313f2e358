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

``SaslMixin`` is part of ``MTAServer``; it uses the server's ``reply``,
``session``, ``portal`` and ``settings``.
"""

from __future__ import annotations

import base64
import binascii
from functools import partial

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from twisted.python import log
from twisted.python.failure import Failure

from twisted_mta.auth.mechanisms import MalformedResponse
from twisted_mta.auth.throttle import Refusal
from twisted_mta.directory.watched import DirectoryUnavailable
from twisted_mta.smtp.modes import AUTH, CLOSED, COMMAND

_NEEDS = {
    b"PLAIN": IUsernamePassword,
    b"LOGIN": IUsernamePassword,
    b"CRAM-MD5": IUsernameHashedPassword,
}


def usable_mechanisms(mechanisms: dict[bytes, object], portal) -> dict[bytes, object]:
    """The mechanisms some checker of ``portal`` can verify."""
    if portal is None:
        return {}
    interfaces = set(portal.listCredentialsInterfaces())
    return {name: maker for name, maker in mechanisms.items() if _NEEDS.get(name) in interfaces}


class SaslMixin:
    """AUTH for ``MTAServer``."""

    _challenger = None
    _auth_failures = 0
    _attempt: defer.Deferred | None = None

    def auth_offered(self) -> bool:
        if not self.challengers or self.authenticated:
            return False
        return self.startedTLS or not self.settings.auth_requires_tls

    def ext_AUTH(self, rest: bytes):
        if not self.challengers:
            return self.reply(503, "5.5.1", "Error: authentication not enabled")
        if not self.startedTLS and self.settings.auth_requires_tls:
            return self.reply(
                538, "5.7.11", "Encryption required for requested authentication mechanism"
            )
        if self.authenticated:
            return self.reply(503, "5.5.1", "Error: already authenticated")
        if self._mail is not None:
            return self.reply(503, "5.5.1", "Error: MAIL transaction in progress")
        words = rest.split(b" ")
        mechanism = words[0].upper()
        if not mechanism or len(words) > 2:
            return self.reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        if mechanism not in self.challengers:
            return self.reply(504, "5.5.4", "Error: unsupported authentication mechanism")
        self._challenger_name = mechanism.decode("ascii")
        if self._refused():
            return None
        self._challenger = self.challengers[mechanism]()
        if len(words) == 2:
            return self._auth_response(words[1])
        return self._send_challenge()

    def _send_challenge(self) -> None:
        challenge = base64.b64encode(self._challenger.getChallenge())
        self.sendCode(334, challenge)
        self._mode = AUTH

    def auth_line(self, line: bytes):
        """A client response while an AUTH exchange is open."""
        self._mode = COMMAND
        if line == b"*":
            self._challenger = None
            return self.reply(501, "5.0.0", "Authentication aborted")
        return self._auth_response(line)

    def _auth_response(self, encoded: bytes):
        try:
            response = b"" if encoded == b"=" else base64.b64decode(encoded, validate=True)
            self._challenger.setResponse(response)
        except (binascii.Error, ValueError) as error:
            self._challenger = None
            reason = str(error) if isinstance(error, MalformedResponse) else "invalid base64"
            return self.reply(501, "5.5.2", f"Error: {reason}")
        if self._challenger.moreChallenges():
            return self._send_challenge()
        challenger, self._challenger = self._challenger, None
        if self._refused():
            return None
        d = self._attempt = self.throttle.attempt(
            self.session.client_ip,
            partial(self._check, challenger),
            self.clock,
            self._auth_failures,
        )
        d.addCallbacks(self._logged_in, self._login_failed)
        return d

    def _refused(self) -> bool:
        """Answer 454 at once if the client's address may not try now."""
        ip = self.session.client_ip
        refusal = self.throttle.refusal(ip, self.clock.seconds())
        if refusal is None:
            return False
        self._challenger = None
        if refusal is Refusal.BLOCKED and self.throttle.block_is_news(ip):
            log.msg(
                f"auth refused: client=[{ip}] mechanism={self._challenger_name}: {refusal.value};"
                " AUTH refused without a check until they are 15 minutes old"
            )
        self.reply(454, "4.7.0", f"Error: {refusal.value}, try again later")
        return True

    def _check(self, challenger) -> defer.Deferred:
        """The password check; a failure is logged even if the client has gone."""
        d = self.portal.login(challenger, self.session, IMessageDeliveryFactory, IMessageDelivery)
        return d.addErrback(self._log_failure, challenger)

    def _log_failure(self, failure: Failure, challenger) -> Failure:
        if failure.check(UnauthorizedLogin):
            ip = self.session.client_ip
            user = _printable(challenger.username.decode("utf-8", "replace"))
            log.msg(f"auth failed: client=[{ip}] mechanism={self._challenger_name} user={user}")
        return failure

    def _logged_in(self, login) -> None:
        self._attempt = None
        if self._mode == CLOSED:
            login[2]()
            return
        self._cbAuthenticated(login)
        self.session.user = _user_name(self.deliveryFactory)
        self.reply(235, "2.7.0", "Authentication successful")

    def _login_failed(self, failure: Failure) -> None:
        self._attempt = None
        if self._mode == CLOSED:
            return
        if failure.check(UnauthorizedLogin):
            return self._answer_failure()
        if failure.check(DirectoryUnavailable):
            log.msg(f"auth: {failure.value}; answered 454 4.7.0")
        else:
            log.err(failure, "authentication error")
        self.reply(454, "4.7.0", "Temporary authentication failure")

    def connectionLost(self, reason) -> None:
        if self._attempt is not None:
            self._attempt.cancel()
        super().connectionLost(reason)

    def _answer_failure(self) -> None:
        self._auth_failures += 1
        self.reply(535, "5.7.8", "Authentication credentials invalid")
        if self._auth_failures >= self.settings.max_auth_failures:
            self.reply(421, "4.7.0", "Too many authentication failures")
            self._close()


def _user_name(factory) -> str | None:
    return getattr(factory, "user", None)


def _printable(text: str) -> str:
    """A user name safe to log on one line (no spaces or control characters)."""
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in text) or "-"

