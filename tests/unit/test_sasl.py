"""The ``Authenticator`` on its own: a recording ``SaslHost`` instead of a
server, an in-memory portal, a ``task.Clock``.  What a client sees through
the server is in test_server_regressions.py and test_sasl_throttle.py."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, replace

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import task
from twisted.mail import imap4, smtp
from twisted.mail.interfaces import IMessageDelivery
from zope.interface import implementer

from twisted_mta.auth.mechanisms import Login, Plain
from twisted_mta.auth.throttle import AuthThrottle
from twisted_mta.intake.acceptance import Session
from twisted_mta.smtp.limits import ServerSettings
from twisted_mta.smtp.sasl import Authenticator

SETTINGS = ServerSettings(
    hostname="mx.example.test",
    listener="submission",
    max_message_size=1 << 20,
    max_recipients=100,
    idle_timeout=300.0,
    max_errors=100,
    max_auth_failures=2,
)
MECHANISMS = {b"PLAIN": Plain, b"LOGIN": Login}


@dataclass
class Host:
    """Records what the ``Authenticator`` asks of its session."""

    portal: Portal | None
    challengers: dict
    closed: bool = False
    replies: list[tuple[int, str]] = field(default_factory=list)
    challenges: list[bytes] = field(default_factory=list)
    logins: list[tuple] = field(default_factory=list)

    def reply(self, code: int, enhanced: str, text: str) -> None:
        self.replies.append((code, enhanced))

    def send_challenge(self, encoded: bytes) -> None:
        self.challenges.append(base64.b64decode(encoded))

    def log_in(self, login: tuple) -> None:
        self.logins.append(login)

    def close(self) -> None:
        self.closed = True


@implementer(IRealm)
class Realm:
    def __init__(self) -> None:
        self.logged_out = 0

    def requestAvatar(self, avatar_id, mind, *interfaces):
        return IMessageDelivery, avatar_id, self._logout

    def _logout(self) -> None:
        self.logged_out += 1


def authenticator(settings: ServerSettings = SETTINGS, mechanisms=MECHANISMS):
    """An ``Authenticator``, its host, realm and clock."""
    realm, clock = Realm(), task.Clock()
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    host = Host(Portal(realm, [checker]), mechanisms)
    auth = Authenticator(
        host,
        settings,
        AuthThrottle(base_delay=1.0),
        clock,
        Session("submission", "192.0.2.1"),
    )
    return auth, host, realm, clock


def plain(password: bytes) -> bytes:
    return base64.b64encode(b"\0alice\0" + password)


def start(auth: Authenticator, rest: bytes, **state: bool):
    facts = {"tls": True, "authenticated": False, "in_transaction": False} | state
    return auth.start(rest, **facts)


def test_mechanisms_are_offered_only_where_auth_is_possible():
    auth, _, _, _ = authenticator()
    assert auth.offered(tls=True, authenticated=False) == [b"PLAIN", b"LOGIN"]
    assert auth.offered(tls=False, authenticated=False) == []
    assert auth.offered(tls=True, authenticated=True) == []
    clear = replace(SETTINGS, auth_requires_tls=False)
    assert authenticator(clear)[0].offered(tls=False, authenticated=False) == [b"PLAIN", b"LOGIN"]
    assert authenticator(mechanisms={})[0].offered(tls=True, authenticated=False) == []


def test_auth_that_cannot_start_is_refused_in_order():
    auth, host, _, _ = authenticator()
    start(auth, b"PLAIN", tls=False, authenticated=True)
    start(auth, b"PLAIN", authenticated=True, in_transaction=True)
    start(auth, b"PLAIN", in_transaction=True)
    start(auth, b"")
    start(auth, b"PLAIN a b")
    start(auth, b"GSSAPI")
    assert host.replies == [
        (538, "5.7.11"),
        (503, "5.5.1"),
        (503, "5.5.1"),
        (501, "5.5.4"),
        (501, "5.5.4"),
        (504, "5.5.4"),
    ]
    auth, host, _, _ = authenticator(mechanisms={})
    start(auth, b"PLAIN")
    assert host.replies == [(503, "5.5.1")]


def test_the_portal_and_mechanisms_are_the_sessions_at_the_time_of_auth():
    auth, host, _, _ = authenticator(mechanisms={})
    portal, host.portal = host.portal, None
    assert auth.offered(tls=True, authenticated=False) == []
    host.challengers = MECHANISMS
    assert auth.offered(tls=True, authenticated=False) == [b"PLAIN", b"LOGIN"]
    start(auth, b"PLAIN " + plain(b"secret"))
    host.portal = portal
    start(auth, b"PLAIN " + plain(b"secret"))
    assert host.replies == [(454, "4.7.0"), (235, "2.7.0")]


def test_a_challenge_is_sent_through_the_host_and_star_cancels():
    auth, host, _, _ = authenticator()
    start(auth, b"LOGIN")
    assert host.challenges == [b"Username:"]
    auth.respond(base64.b64encode(b"alice"))
    assert host.challenges == [b"Username:", b"Password:"]
    auth.respond(b"*")
    assert host.replies == [(501, "5.0.0")]


LOGIN_CHALLENGERS = {
    "ours": (Login, b"Password:"),
    "twisted.mail.smtp": (smtp.LOGINCredentials, b"Password:"),
    "twisted.mail.imap4": (imap4.LOGINCredentials, b"Password\0"),
}


@pytest.mark.parametrize(
    "challenger, password_prompt", LOGIN_CHALLENGERS.values(), ids=LOGIN_CHALLENGERS
)
def test_login_with_an_initial_response_asks_only_for_the_password(challenger, password_prompt):
    auth, host, _, _ = authenticator(mechanisms={b"LOGIN": challenger})
    start(auth, b"LOGIN " + base64.b64encode(b"alice"))
    assert host.challenges == [password_prompt]
    auth.respond(base64.b64encode(b"secret"))
    assert [avatar for _, avatar, _ in host.logins] == [b"alice"]
    assert host.replies == [(235, "2.7.0")]


def test_a_response_that_is_not_strict_base64_is_refused():
    auth, host, _, _ = authenticator()
    start(auth, b"PLAIN")
    auth.respond(b"not base64!")
    assert host.replies == [(501, "5.5.2")]


def test_a_good_password_logs_the_session_in_through_the_host():
    auth, host, _, _ = authenticator()
    start(auth, b"PLAIN " + plain(b"secret"))
    assert [avatar for _, avatar, _ in host.logins] == [b"alice"]
    assert host.replies == [(235, "2.7.0")]


def test_the_last_failure_allowed_closes_the_session():
    auth, host, _, clock = authenticator()
    start(auth, b"PLAIN " + plain(b"wrong"))
    clock.advance(60)
    start(auth, b"PLAIN " + plain(b"wrong"))
    clock.advance(60)
    assert host.replies == [(535, "5.7.8"), (535, "5.7.8"), (421, "4.7.0")]
    assert host.closed


def test_a_login_for_a_session_that_closed_meanwhile_is_logged_out():
    auth, host, realm, _ = authenticator()
    host.closed = True
    start(auth, b"PLAIN " + plain(b"secret"))
    assert host.logins == [] and host.replies == []
    assert realm.logged_out == 1
