"""AUTH sessions sharing one throttle, in memory: answers wait for their
delay (successes too), a hang-up withdraws a waiting check, a blocked
address gets 454 at once.  Checks finish when the test says so; time is a
``task.Clock``."""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import replace

from twisted.cred.checkers import AllowAnonymousAccess, ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.helpers.smtp_session import (
    EHLO,
    HOSTNAME,
    SETTINGS,
    Client,
    Realm,
    RecordingDelivery,
    open_session,
)
from twisted_mta.auth.mechanisms import challengers
from twisted_mta.auth.throttle import CHECKS, AuthThrottle
from twisted_mta.smtp.limits import ConnectionLimits
from twisted_mta.smtp.server import MTAServer

GUESSER = "192.0.2.66"


@implementer(ICredentialsChecker)
class HeldChecker:
    """Checks the password "secret" when the test lets it."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.pending: deque[tuple[object, defer.Deferred]] = deque()
        self.asked = 0

    def requestAvatarId(self, credentials) -> defer.Deferred:
        self.asked += 1
        d = defer.Deferred()
        self.pending.append((credentials, d))
        return d

    def finish(self) -> None:
        credentials, d = self.pending.popleft()
        if credentials.password == b"secret":
            d.callback(credentials.username)
        else:
            d.errback(UnauthorizedLogin())


class Sessions:
    """Sessions of one server configuration sharing a throttle and a clock."""

    def __init__(self, max_failures: int = 10) -> None:
        self.clock = task.Clock()
        self.throttle = AuthThrottle(base_delay=1.0, max_failures=max_failures)
        self.checker = HeldChecker()
        self.portal = Portal(Realm(RecordingDelivery()), [AllowAnonymousAccess(), self.checker])
        self.settings = replace(SETTINGS, listener="submission", auth_requires_tls=False)

    def open(self, ip: str = GUESSER) -> Client:
        server = MTAServer(
            self.settings,
            ConnectionLimits(100, 100),
            challengers(["PLAIN"], HOSTNAME),
            None,
            self.throttle,
            self.clock,
        )
        server.portal = self.portal
        client = open_session(server, transport=StringTransport(peerAddress=IPv4Address("TCP", ip, 4321)))
        assert client.command(EHLO).code == 250
        return client


def auth(client: Client, password: bytes) -> None:
    client.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0" + password) + b"\r\n")


def hang_up(client: Client) -> None:
    client.server.connectionLost(Failure(ConnectionDone()))


def test_every_answer_to_an_address_that_failed_waits_a_success_too():
    sessions = Sessions()
    first = sessions.open()
    auth(first, b"wrong")
    sessions.checker.finish()
    assert first.codes() == []
    sessions.clock.advance(1.0)
    assert first.codes() == [535]
    second = sessions.open()
    auth(second, b"secret")
    sessions.checker.finish()
    sessions.clock.advance(1.99)
    assert second.codes() == [], "a hang-up now must not tell a success from a failure"
    sessions.clock.advance(0.01)
    assert second.codes() == [235]
    assert sessions.throttle.recent_failures(GUESSER, sessions.clock.seconds()) == 1


def test_a_guess_checked_after_its_client_hung_up_still_counts():
    sessions = Sessions()
    client = sessions.open()
    auth(client, b"wrong")
    hang_up(client)
    sessions.checker.finish()
    assert sessions.throttle.recent_failures(GUESSER, sessions.clock.seconds()) == 1
    assert client.codes() == []


def test_a_guess_still_waiting_for_its_turn_is_withdrawn_at_hang_up():
    sessions = Sessions()
    for n in range(CHECKS):
        auth(sessions.open(f"198.51.100.{n + 1}"), b"wrong")
    waiting = sessions.open()
    auth(waiting, b"wrong")
    assert sessions.checker.asked == CHECKS
    hang_up(waiting)
    for _ in range(CHECKS):
        sessions.checker.finish()
    assert sessions.checker.asked == CHECKS, "the withdrawn guess was never checked"
    assert sessions.throttle.refusal(GUESSER, sessions.clock.seconds()) is None


def test_a_blocked_address_gets_454_at_once_without_a_check(logged):
    sessions = Sessions(max_failures=2)
    for _ in range(2):
        client = sessions.open()
        auth(client, b"wrong")
        sessions.checker.finish()
        sessions.clock.advance(30)
    asked = sessions.checker.asked
    for _ in range(3):
        client = sessions.open()
        reply = client.command(b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0secret"))
        assert (reply.code, reply.lines[0][:5]) == (454, b"4.7.0")
    assert sessions.checker.asked == asked
    assert len([line for line in logged if f"auth refused: client=[{GUESSER}]" in line]) == 1
    other = sessions.open("198.51.100.7")
    auth(other, b"secret")
    sessions.checker.finish()
    assert other.codes() == [235], "at once: that address has not failed"
