"""Twisted's own tests of its SMTP server, run against ``MTAServer``.

Users extend ``MTAServer`` and ``MTAFactory`` the Twisted way, so the
server-side test cases of ``twisted.mail.test.test_smtp`` run here as they
are, with the servers of that module (``smtp.SMTP``, ``smtp.ESMTP``,
``DummySMTP``, ``DummyESMTP``) replaced by ours for the time of each test:
``TwistedStyleServer`` is ``MTAServer`` built the way Twisted builds its
server, ``ESMTP(chal, contextFactory)``, with the daemon's defaults for its
``smtp`` listener.

A Twisted test that fails for one of our deliberate differences is marked
with ``differs``: an expected failure, strict, that must fail by an
assertion showing our reply; README.md ("Where we differ from Twisted's
server") lists the differences.  The tests after Twisted's check the
extension points that were broken, with our replies.

Not run: the module's client-side cases (``SMTPClientTests``,
``SMTPHelperTests``, ``TimeoutTests``, ``SMTPSenderFactoryTests``,
``SMTPSenderFactoryRetryTests``, ``SMTPClientErrorTests``,
``SenderMixinSentMailTests``, ``ESMTPDowngradeTestCase``, ``SSLTestCase``,
``SendmailTests``): they test Twisted's client, with scripted server
replies or a server of their own.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.testing import StringTransport
from twisted.mail import imap4, smtp
from twisted.mail.test import test_smtp as twisted_tests
from twisted.trial.unittest import FailTest

from tests.helpers.smtp_session import (
    EHLO,
    Client,
    Realm,
    RecordingDelivery,
    TwistedStyleDelivery,
    open_session,
    recording_portal,
)
from twisted_mta.config.load import default_config
from twisted_mta.front import listener_settings
from twisted_mta.smtp.factory import MTAFactory
from twisted_mta.smtp.limits import ConnectionLimits, ServerSettings
from twisted_mta.smtp.server import MTAServer

DEFAULTS = default_config()
SETTINGS = listener_settings(DEFAULTS, "smtp")
# AUTH in plain text, as with [auth] require_tls = false: Twisted's AUTH
# tests have no TLS, and would stop at our 538 before their exchange.
PLAINTEXT_AUTH = replace(SETTINGS, auth_requires_tls=False)


class TwistedStyleServer(MTAServer):
    """``MTAServer`` as Twisted's tests build a server: ``ESMTP(chal, contextFactory)``."""

    adapted_settings: ServerSettings = SETTINGS

    def __init__(
        self,
        chal: dict | None = None,
        contextFactory: IOpenSSLServerConnectionCreator | None = None,
    ) -> None:
        limits = ConnectionLimits(
            DEFAULTS.limits.max_connections, DEFAULTS.limits.max_connections_per_ip
        )
        super().__init__(self.adapted_settings, limits, chal, contextFactory)


class PlaintextAuthServer(TwistedStyleServer):
    adapted_settings = PLAINTEXT_AUTH


class DummyServer(twisted_tests.DummyProto, TwistedStyleServer):
    """Twisted's ``DummyESMTP``, over our server."""

    dummyMixinBase = TwistedStyleServer


class DummyPlaintextAuthServer(twisted_tests.DummyProto, PlaintextAuthServer):
    dummyMixinBase = PlaintextAuthServer


class OurServer:
    """Mixin for Twisted's test cases: the module's servers are ours in each test."""

    server_class: type[TwistedStyleServer] = TwistedStyleServer
    dummy_class: type[TwistedStyleServer] = DummyServer

    def setUp(self):
        ours = SimpleNamespace(**vars(smtp))
        ours.SMTP = ours.ESMTP = self.server_class
        self.patch(twisted_tests, "smtp", ours)
        self.patch(twisted_tests, "DummySMTP", self.dummy_class)
        self.patch(twisted_tests, "DummyESMTP", self.dummy_class)
        return super().setUp()


class PlaintextAuth(OurServer):
    server_class = PlaintextAuthServer
    dummy_class = DummyPlaintextAuthServer


# Our deliberate differences, as the README lists them.
REPLIES = (
    "every reply but the 250 to HELO and EHLO and the 354 carries an enhanced status code"
    " (RFC 2034, RFC 3463), and the texts are Postfix's"
)
ESMTP_ONLY = "MTAServer is an ESMTP server: there is no plain SMTP one, whose greeting lacks ESMTP"
HELO_NEEDS_NAME = "HELO and EHLO need the client's domain (RFC 5321 4.1.1.1): 501 5.5.4 without"
ANONYMOUS_REFUSED = (
    "MAIL from a client the portal does not log in anonymously is 530 5.7.0 Authentication"
    " required (RFC 4954), not 550 for the sender"
)
AUTH_AFTER_TLS = "AUTH is offered and accepted only inside TLS (538 5.7.11 before), by default"
AUTH_ERROR = (
    "an error of the password check other than a refused login is 454 4.7.0 Temporary"
    " authentication failure (RFC 4954 6), not 451"
)


def differs(
    difference: str, ours: str, logged: tuple[type[Exception], ...] = ()
) -> Callable[[Callable], Callable]:
    """Mark Twisted's synchronous test as expected to fail for ``difference``.

    Strict, and only where our reply ``ours`` differs from what the test
    expects: a failure whose message does not show ``ours``, or any error
    other than an assertion, fails the test.  ``logged``: the errors, one of
    each, the test expects to be logged and would have flushed after its
    failed assertion.
    """

    def mark(test: Callable) -> Callable:
        @functools.wraps(test)
        def run(self) -> None:
            try:
                test(self)
            except FailTest as failure:
                if ours not in str(failure):
                    message = f"not failed where {ours!r} is answered: {failure}"
                    raise AssertionError(message) from None
                if len(self.flushLoggedErrors(*logged)) != len(logged):
                    raise AssertionError(f"not logged once each: {logged}") from None
                raise

        return pytest.mark.xfail(strict=True, raises=FailTest, reason=difference)(run)

    return mark


# -- Twisted's test cases ---------------------------------------------------


class SMTPServerTests(OurServer, twisted_tests.SMTPServerTests):
    def testSMTPGreetingHost(self, serverClass=TwistedStyleServer):
        """Twisted's test; its default server class was bound at its definition."""
        super().testSMTPGreetingHost(serverClass)

    @differs(ESMTP_ONLY, "220 localhost ESMTP")
    def testSMTPGreetingNotExtended(self):
        super().testSMTPGreetingNotExtended()

    @differs(REPLIES, "500 5.5.2 Error: command not recognized")
    def test_SMTPUnknownCommand(self):
        super().test_SMTPUnknownCommand()

    @differs(REPLIES, "250 2.1.0 Ok")
    def test_acceptSenderAddress(self):
        super().test_acceptSenderAddress()

    @differs(REPLIES, "550 5.0.0 Sender not acceptable")
    def test_deliveryRejectedSenderAddress(self):
        super().test_deliveryRejectedSenderAddress()

    @differs(ANONYMOUS_REFUSED, "530 5.7.0 Authentication required")
    def test_portalRejectedSenderAddress(self):
        super().test_portalRejectedSenderAddress()

    @differs(ANONYMOUS_REFUSED, "530 5.7.0 Authentication required")
    def test_portalRejectedAnonymousSender(self):
        super().test_portalRejectedAnonymousSender()


class EmptyLineTests(OurServer, twisted_tests.EmptyLineTests):
    @differs(REPLIES, "500 5.5.2 Error: command not recognized")
    def test_emptyLineSyntaxError(self):
        super().test_emptyLineSyntaxError()


ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required"
# After a refused AUTH, the client's response is taken for a command.
NOT_A_COMMAND = "500 5.5.2 Error: command not recognized"


class ESMTPAuthenticationTests(OurServer, twisted_tests.ESMTPAuthenticationTests):
    """Twisted's AUTH tests with our defaults: no AUTH before TLS."""

    @differs(HELO_NEEDS_NAME, "501 5.5.4 Syntax: EHLO hostname")
    def test_authenticationCapabilityAdvertised(self):
        super().test_authenticationCapabilityAdvertised()

    @differs(AUTH_AFTER_TLS, ENCRYPTION_REQUIRED)
    def test_plainAuthentication(self):
        super().test_plainAuthentication()

    @differs(AUTH_AFTER_TLS, ENCRYPTION_REQUIRED)
    def test_plainAuthenticationEmptyPassword(self):
        super().test_plainAuthenticationEmptyPassword()

    @differs(AUTH_AFTER_TLS, ENCRYPTION_REQUIRED)
    def test_plainAuthenticationInitialResponse(self):
        super().test_plainAuthenticationInitialResponse()

    @differs(AUTH_AFTER_TLS, NOT_A_COMMAND)
    def test_abortAuthentication(self):
        super().test_abortAuthentication()

    @differs(AUTH_AFTER_TLS, NOT_A_COMMAND)
    def test_invalidBase64EncodedResponse(self):
        super().test_invalidBase64EncodedResponse()

    @differs(AUTH_AFTER_TLS, ENCRYPTION_REQUIRED)
    def test_invalidBase64EncodedInitialResponse(self):
        super().test_invalidBase64EncodedInitialResponse()

    @differs(AUTH_AFTER_TLS, ENCRYPTION_REQUIRED)
    def test_unexpectedLoginFailure(self):
        super().test_unexpectedLoginFailure()


AUTHENTICATED = "235 2.7.0 Authentication successful"
INVALID_BASE64 = "501 5.5.2 Error: invalid base64"


class ESMTPAuthenticationPlaintextTests(PlaintextAuth, twisted_tests.ESMTPAuthenticationTests):
    """Twisted's AUTH tests with AUTH allowed before TLS: the exchanges themselves."""

    @differs(HELO_NEEDS_NAME, "501 5.5.4 Syntax: EHLO hostname")
    def test_authenticationCapabilityAdvertised(self):
        super().test_authenticationCapabilityAdvertised()

    @differs(REPLIES, AUTHENTICATED)
    def test_plainAuthentication(self):
        super().test_plainAuthentication()

    @differs(REPLIES, AUTHENTICATED)
    def test_plainAuthenticationEmptyPassword(self):
        super().test_plainAuthenticationEmptyPassword()

    @differs(REPLIES, AUTHENTICATED)
    def test_plainAuthenticationInitialResponse(self):
        super().test_plainAuthenticationInitialResponse()

    @differs(REPLIES, "501 5.0.0 Authentication aborted")
    def test_abortAuthentication(self):
        super().test_abortAuthentication()

    @differs(REPLIES, INVALID_BASE64)
    def test_invalidBase64EncodedResponse(self):
        super().test_invalidBase64EncodedResponse()

    @differs(REPLIES, INVALID_BASE64)
    def test_invalidBase64EncodedInitialResponse(self):
        super().test_invalidBase64EncodedInitialResponse()

    @differs(AUTH_ERROR, "454 4.7.0 Temporary authentication failure", logged=(RuntimeError,))
    def test_unexpectedLoginFailure(self):
        super().test_unexpectedLoginFailure()


class AuthTests(PlaintextAuth, twisted_tests.AuthTests):
    """Twisted's client logs in to our server with Twisted's challengers."""


class TLSTests(OurServer, twisted_tests.TLSTests):
    """Twisted's client starts TLS with our server, in memory and over TCP."""


class AnotherESMTPTests(OurServer, twisted_tests.AnotherESMTPTests):
    serverClass = DummyServer


class AnotherSMTPTests(OurServer, twisted_tests.AnotherSMTPTests):
    """Twisted's plain SMTP exchange, with our (ESMTP) server."""

    serverClass = DummyServer


# -- the extension points these tests found broken, with our replies ---------


def session(delivery: RecordingDelivery) -> Client:
    """Our server with the default settings and a Twisted-style avatar."""
    server = MTAServer(SETTINGS, ConnectionLimits(100, 100))
    server.portal = recording_portal(delivery)
    return open_session(server, delivery)


RECIPIENTS = [b"alice@example.test", b"bob@example.test", b"carol@example.test"]


def test_each_copy_for_a_twisted_style_avatar_names_only_its_own_recipient():
    delivery = TwistedStyleDelivery()
    client = session(delivery)
    client.start_data(*RECIPIENTS)
    assert client.command(b"Subject: x\r\n\r\nhi\r\n.").code == 250
    headers = [message.partition(b"\nSubject:")[0] for message in delivery.messages]
    named = [[recipient for recipient in RECIPIENTS if recipient in h] for h in headers]
    assert named == [[recipient] for recipient in RECIPIENTS]


@pytest.mark.parametrize(
    "sent, stored",
    [
        (b"hello\r\nworld\r\n", b"\nhello\nworld\n"),
        (b"Dear Sir: hello\r\n", b"\nDear Sir: hello\n"),  # not a field name
        (b"..hello\r\n", b"\n.hello\n"),
        (b"\r\nhello\r\n", b"\nhello\n"),
        (b"Subject: x\r\n\r\nhello\r\n", b"Subject: x\n\nhello\n"),
    ],
    ids=["no header", "no field name", "dot-stuffed", "empty header", "header"],
)
def test_a_message_without_a_header_comes_after_an_empty_line(sent, stored):
    delivery = RecordingDelivery()
    client = session(delivery)
    client.start_data()
    assert client.command(sent + b".").code == 250
    assert delivery.messages == [b"Received: by test\n" + stored]


class GreetingServer(MTAServer):
    """A subclass a user would set as the factory's ``protocol``."""


class TwistedStyleFactory(MTAFactory):
    protocol = GreetingServer
    domain = b"relay.example.test"


def set_on_the_instance() -> MTAFactory:
    factory = MTAFactory(None, SETTINGS, ConnectionLimits(10, 10))
    factory.protocol = GreetingServer
    factory.domain = "relay.example.test"
    return factory


def set_by_a_subclass() -> MTAFactory:
    return TwistedStyleFactory(None, SETTINGS, ConnectionLimits(10, 10))


@pytest.mark.parametrize("make_factory", [set_on_the_instance, set_by_a_subclass])
def test_the_factory_builds_its_protocol_named_after_its_domain(make_factory):
    factory = make_factory()
    factory.reconfigure(None, replace(SETTINGS, hostname="mx.example.test"), {})
    server = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 25))
    assert type(server) is GreetingServer and server.factory is factory
    client = open_session(server)
    assert client.transport.value() == b"220 relay.example.test ESMTP\r\n"
    assert client.command(EHLO).lines[0] == b"relay.example.test Hello [192.168.1.1]"
    assert client.command(b"HELO client.example.org").lines == [b"relay.example.test"]


def test_without_a_domain_the_factory_names_its_servers_after_the_settings():
    factory = MTAFactory(None, SETTINGS, ConnectionLimits(10, 10))
    assert type(factory.buildProtocol(None)) is MTAServer
    assert factory.domain == b"localhost"
    factory.reconfigure(None, replace(SETTINGS, hostname="mx.example.test"), {})
    assert factory.buildProtocol(None).host == factory.domain == b"mx.example.test"


@pytest.mark.parametrize("challenger", [smtp.LOGINCredentials, imap4.LOGINCredentials])
def test_twisted_login_challengers_take_the_user_name_as_initial_response(challenger):
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    server = MTAServer(PLAINTEXT_AUTH, ConnectionLimits(10, 10), {b"LOGIN": challenger})
    server.portal = Portal(Realm(RecordingDelivery()), [checker])
    client = open_session(server, transport=StringTransport())
    reply = client.command(b"AUTH LOGIN " + base64.b64encode(b"alice"))
    assert reply.code == 334
    assert base64.b64decode(reply.lines[0]) == challenger().challenges[0]  # the password's
    assert client.command(base64.b64encode(b"secret")).code == 235
    assert client.server.authenticated
