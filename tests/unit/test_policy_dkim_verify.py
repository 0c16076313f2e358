"""The dkim plugin's verifier: one result per signature of arriving mail,
with keys from an in-memory resolver, dkimpy in a real worker thread, and
the RFC 8463 Appendix A message checked against its published keys."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import ipaddress
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, task
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.python.threadpool import ThreadPool

from tests.helpers.threads import TIMEOUT, ThreadReactor
from twisted_mta.interfaces import MessageInfo, PolicyContext, SessionInfo, TransactionInfo
from twisted_mta.mail import dkimkeys
from twisted_mta.policies.dkim import factory
from twisted_mta.policies.dkim.verify import KEY_TIMEOUT

RECEIVED = b"Received: from client.example.net by mx.example.test\n"
MESSAGE = (
    b"From: Bob <bob@example.org>\n"
    b"To: alice@example.test\n"
    b"Subject: signed\n"
    b"Message-ID: <1@example.org>\n"
    b"\n"
    b"Hello,\n"
    b"a line\n"
)
STRANGER = SessionInfo("192.0.2.1", "smtp", helo="client.example.net")
TRANSACTION = TransactionInfo("ABC123", "bob@example.org", ("alice@example.test",))
NEVER = object()


class ClockThreadReactor(ThreadReactor):
    """A worker thread pool for ``deferToThreadPool`` and a ``task.Clock``
    for timeouts."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = ThreadPool(1, 1)
        self.pool.start()
        self.clock = task.Clock()

    def getThreadPool(self):
        return self.pool

    def callLater(self, *args, **kwargs):
        return self.clock.callLater(*args, **kwargs)

    def run_until(self, condition) -> None:
        """Run the worker's reports until ``condition()`` holds."""
        while not condition():
            function, args = self.calls.get(timeout=TIMEOUT)
            function(*args)


class FakeResolver:
    """``lookupText`` from ``zones``: a name's TXT records (each a list of
    strings), an exception to fail with, or NEVER for no answer at all."""

    def __init__(self, zones: dict) -> None:
        self.zones = zones
        self.asked: list[str] = []

    def lookupText(self, name: str, timeout=None) -> defer.Deferred:
        self.asked.append(name)
        answer = self.zones.get(name, dns_error.DNSNameError(name))
        if answer is NEVER:
            return defer.Deferred()
        if isinstance(answer, Exception):
            return defer.fail(answer)
        records = [
            dns.RRHeader(name, dns.TXT, payload=dns.Record_TXT(*(s.encode() for s in strings)))
            for strings in answer
        ]
        return defer.succeed((records, [], []))


@pytest.fixture
def reactor():
    made = ClockThreadReactor()
    yield made
    made.pool.stop()


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    return {kind: dkimkeys.generate(kind) for kind in dkimkeys.KEY_TYPES}


def record(pem: bytes) -> list[list[str]]:
    """The key's TXT record, cut in strings of 255 bytes as published."""
    text = dkimkeys.dns_record(pem)
    return [[text[i : i + 255] for i in range(0, len(text), 255)]]


def dkim_signature(pem: bytes, message: bytes = MESSAGE, domain=b"example.org", selector=b"sel"):
    """A DKIM-Signature field for ``message``, LF line ends."""
    key = dkimkeys.signing_key(pem)
    field = dkim.sign(
        message.replace(b"\n", b"\r\n"),
        selector,
        domain,
        key.private,
        signature_algorithm=key.algorithm,
        canonicalize=(b"relaxed", b"relaxed"),
    )
    return field.replace(b"\r\n", b"\n")


def arrived(*fields: bytes, message: bytes = MESSAGE) -> bytes:
    """The message as stored: our Received first, then what was sent."""
    return RECEIVED + b"".join(fields) + message


def info(message: bytes) -> MessageInfo:
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(message)
    return MessageInfo(headers, len(message), lambda: io.BytesIO(message))


def make(tmp_path: Path, reactor, zones: dict, **options):
    context = PolicyContext(
        reactor=reactor,
        hostname="mx.example.test",
        state_dir=tmp_path / "spool" / "plugins" / "dkim",
        resolver=FakeResolver(zones),
        trusted_networks=(ipaddress.ip_network("10.0.0.0/8"),),
    )
    return factory.policy(options, context), context.resolver


def results(tmp_path, reactor, zones: dict, message: bytes, session=STRANGER):
    policy, _ = make(tmp_path, reactor, zones)
    [verdict] = reactor.results(policy.message(session, TRANSACTION, info(message)))
    assert verdict.kind == "proceed" and verdict.headers == ()
    return verdict.results


def tags(field: bytes) -> dict[str, str]:
    value = b"".join(field.split(b":", 1)[1].split()).decode()
    return dict(part.split("=", 1) for part in value.split(";") if part)


@pytest.mark.parametrize("kind", dkimkeys.KEY_TYPES)
def test_a_valid_signature_passes(tmp_path, reactor, keys, kind):
    field = dkim_signature(keys[kind])
    zones = {"sel._domainkey.example.org": record(keys[kind])}
    [result] = results(tmp_path, reactor, zones, arrived(field))
    assert (result.method, result.result, result.reason) == ("dkim", "pass", "")
    assert result.properties == (
        ("header.d", "example.org"),
        ("header.i", "@example.org"),
        ("header.s", "sel"),
        ("header.a", "rsa-sha256" if kind == "rsa" else "ed25519-sha256"),
        ("header.b", tags(field)["b"][:8]),
    )


def test_an_altered_body_fails(tmp_path, reactor, keys):
    field = dkim_signature(keys["rsa"])
    changed = MESSAGE.replace(b"a line", b"a lie")
    zones = {"sel._domainkey.example.org": record(keys["rsa"])}
    [result] = results(tmp_path, reactor, zones, arrived(field, message=changed))
    assert (result.result, result.reason) == ("fail", "body hash did not verify")


def test_an_altered_signed_header_fails(tmp_path, reactor, keys):
    field = dkim_signature(keys["ed25519"])
    changed = MESSAGE.replace(b"Subject: signed", b"Subject: changed")
    zones = {"sel._domainkey.example.org": record(keys["ed25519"])}
    [result] = results(tmp_path, reactor, zones, arrived(field, message=changed))
    assert (result.result, result.reason) == ("fail", "signature did not verify")


def test_an_unsigned_header_may_change(tmp_path, reactor, keys):
    field = dkim_signature(keys["ed25519"])
    zones = {"sel._domainkey.example.org": record(keys["ed25519"])}
    [result] = results(tmp_path, reactor, zones, arrived(field, b"X-Added: yes\n"))
    assert result.result == "pass"


@pytest.mark.parametrize(
    "answer", [None, [], [["v=spf1 -all"]]], ids=["nxdomain", "no-txt", "not-a-key"]
)
def test_a_missing_key_is_a_permerror(tmp_path, reactor, keys, answer):
    zones = {} if answer is None else {"sel._domainkey.example.org": answer}
    [result] = results(tmp_path, reactor, zones, arrived(dkim_signature(keys["rsa"])))
    assert result.result == "permerror"
    assert result.property("header.d") == "example.org"
    if answer is None or answer == []:
        assert result.reason == "no key for signature"


def test_a_revoked_key_is_a_permerror(tmp_path, reactor, keys):
    zones = {"sel._domainkey.example.org": [["v=DKIM1; k=rsa; p="]]}
    [result] = results(tmp_path, reactor, zones, arrived(dkim_signature(keys["rsa"])))
    assert (result.result, result.reason) == ("permerror", "key revoked")


def test_a_key_of_the_other_type_is_a_permerror(tmp_path, reactor, keys):
    zones = {"sel._domainkey.example.org": record(keys["rsa"])}
    [result] = results(tmp_path, reactor, zones, arrived(dkim_signature(keys["ed25519"])))
    assert (result.result, result.reason) == ("permerror", "key type does not match a=")


def test_a_failing_name_server_is_a_temperror(tmp_path, reactor, keys):
    zones = {"sel._domainkey.example.org": dns_error.DNSServerError("SERVFAIL")}
    [result] = results(tmp_path, reactor, zones, arrived(dkim_signature(keys["rsa"])))
    assert (result.result, result.reason) == ("temperror", "key lookup failed")


def test_a_key_lookup_without_answer_times_out_as_a_temperror(tmp_path, reactor, keys):
    policy, resolver = make(tmp_path, reactor, {"sel._domainkey.example.org": NEVER})
    message = info(arrived(dkim_signature(keys["rsa"])))
    d = policy.message(STRANGER, TRANSACTION, message)
    reactor.run_until(lambda: resolver.asked)
    reactor.clock.advance(KEY_TIMEOUT - 0.1)
    assert reactor.clock.getDelayedCalls() and reactor.calls.empty()
    reactor.clock.advance(0.1)
    assert not reactor.clock.getDelayedCalls()
    [verdict] = reactor.results(d)
    [result] = verdict.results
    assert (result.result, result.reason) == ("temperror", "key lookup timed out")


def test_each_signature_has_its_result_and_keys_are_fetched_once(tmp_path, reactor, keys):
    good = dkim_signature(keys["ed25519"])
    other = dkim_signature(keys["rsa"], selector=b"rsa")
    changed = MESSAGE.replace(b"Hello", b"Bye")
    bad = dkim_signature(keys["ed25519"], message=changed)
    zones = {
        "sel._domainkey.example.org": record(keys["ed25519"]),
        "rsa._domainkey.example.org": record(keys["rsa"]),
    }
    policy, resolver = make(tmp_path, reactor, zones)
    [verdict] = reactor.results(
        policy.message(STRANGER, TRANSACTION, info(arrived(good, bad, other)))
    )
    assert [(r.result, r.property("header.s")) for r in verdict.results] == [
        ("pass", "sel"),
        ("fail", "sel"),
        ("pass", "rsa"),
    ]
    assert sorted(resolver.asked) == ["rsa._domainkey.example.org", "sel._domainkey.example.org"]


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda f: f.replace(b"a=ed25519-sha256", b"a=ed448-sha256"), "unsupported algorithm"),
        (lambda f: f.replace(b"v=1", b"v=2"), "v= value is not 1"),
        (lambda f: f.replace(b"v=1;", b"v=1; x=1000;"), "x= value is past"),
        (lambda f: f.replace(b"; d=example.org", b""), "missing d="),
        (lambda f: b"DKIM-Signature: v=1; a\n", "signature syntax error"),
    ],
    ids=["algorithm", "version", "expired", "no-domain", "syntax"],
)
def test_a_signature_that_cannot_be_processed_is_neutral(tmp_path, reactor, keys, change, reason):
    field = change(dkim_signature(keys["ed25519"]))
    zones = {"sel._domainkey.example.org": record(keys["ed25519"])}
    policy, resolver = make(tmp_path, reactor, zones)
    [verdict] = reactor.results(policy.message(STRANGER, TRANSACTION, info(arrived(field))))
    [result] = verdict.results
    assert (result.result, result.reason) == ("neutral", reason)
    assert resolver.asked == []


def test_rsa_sha1_does_not_pass(tmp_path, reactor, keys):
    field = dkim.sign(
        MESSAGE.replace(b"\n", b"\r\n"),
        b"sel",
        b"example.org",
        keys["rsa"],
        signature_algorithm=b"rsa-sha1",
    ).replace(b"\r\n", b"\n")
    zones = {"sel._domainkey.example.org": record(keys["rsa"])}
    [result] = results(tmp_path, reactor, zones, arrived(field))
    assert (result.result, result.reason) == ("neutral", "unsupported algorithm")


def test_a_message_without_signature_is_none(tmp_path, reactor):
    policy, resolver = make(tmp_path, reactor, {})
    [verdict] = reactor.results(policy.message(STRANGER, TRANSACTION, info(arrived())))
    [result] = verdict.results
    assert (result.method, result.result, result.properties) == ("dkim", "none", ())
    assert resolver.asked == []


@pytest.mark.parametrize(
    "session",
    [
        SessionInfo("192.0.2.1", "submission", user="bob@example.test"),
        SessionInfo("192.0.2.1", "smtp", user="bob@example.test"),
        SessionInfo("127.0.0.1", "local", user="bob"),
        SessionInfo("10.1.2.3", "smtp"),
    ],
    ids=["submission", "authenticated", "local", "trusted"],
)
def test_exempt_sessions_are_not_verified(tmp_path, reactor, keys, session):
    policy, resolver = make(tmp_path, reactor, {})
    answer = policy.message(session, TRANSACTION, info(arrived(dkim_signature(keys["rsa"]))))
    verdict = reactor.results(answer)[0] if isinstance(answer, defer.Deferred) else answer
    assert verdict is None
    assert resolver.asked == []


def test_verification_can_be_turned_off(tmp_path, reactor, keys):
    policy, resolver = make(tmp_path, reactor, {}, verify=False)
    message = info(arrived(dkim_signature(keys["rsa"])))
    assert policy.message(STRANGER, TRANSACTION, message) is None
    assert resolver.asked == []


def test_the_verify_option_is_checked(tmp_path, reactor):
    with pytest.raises(ValueError, match="verify: expected true or false, not 'yes'"):
        make(tmp_path, reactor, {}, verify="yes")


# A 768-bit RSA key: too small to be trusted (RFC 8301), and too small for
# the key generators of today, hence written here.
SMALL_RSA_KEY = b"""\
-----BEGIN PRIVATE KEY-----
MIIB5AIBADANBgkqhkiG9w0BAQEFAASCAc4wggHKAgEAAmEA1JLecCU40IKHmxJg
kcsU+968e/VN0RZYYbzpPzjYVWmGPUdWsHTm45fmrlBDzvLREuK6au29jbO3Zg1W
HoPMXqr4Ex8f0U6Z2DReHujSpH/dGyFD1JJfvwxEb2GbLtADAgMBAAECYDvxwrpb
NL9P38+yCftzClLQh9Ro423P4FKHhDro29CSNmG3aVHPVYDeyBVl2wlT3W+IV+J8
FQb7064eREpdPdlZgxaZovuPfj2ehZ7Jzka4Sc303WHzjcq5pYl0oiLsOQIxAPtK
IAq1BccExVkOUbkv+hu8/SPTnJOnldEHsYY+Xqe91rV5BkPEytLCcvthT+GLdwIx
ANiO9MppdMlfaV+KlbydotLjnOCvUpNnaOk6yUCBYXzP+wj2uLoVRQxSdU7Kyg3q
1QIxALSoWdjYw8qM94RK8x38DAedGzCClfLhbKfWrB4jANH/fTkCRSq7dEWJXjiz
gUZZiQIwIGEnmsgvzRg2AjIPd3c+bDfaMgIk36NbnVvL0ZhGwkm6qDlzn2ckvtXp
clGB6pjNAjAU0uFpIuOnbBAylarhUA9mJlT5wEKv4oq7sFHQ+PvChUNllfvlllQi
zlgQ6KXHObY=
-----END PRIVATE KEY-----
"""


def test_a_signature_by_a_small_rsa_key_does_not_pass(tmp_path, reactor):
    private = serialization.load_pem_private_key(SMALL_RSA_KEY, None)
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    text = "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()
    field = dkim.sign(
        MESSAGE.replace(b"\n", b"\r\n"), b"sel", b"example.org", SMALL_RSA_KEY
    ).replace(b"\r\n", b"\n")
    zones = {"sel._domainkey.example.org": [[text]]}
    [result] = results(tmp_path, reactor, zones, arrived(field))
    assert (result.result, result.reason) == ("permerror", "public key too small")


# RFC 8463 Appendix A: the message of RFC 6376 Appendix A signed with an
# Ed25519 key (selector brisbane) and an RSA key (selector test), and the
# records that publish them (A.2), the RSA one in four strings.
RFC8463_SIGNED = b"""\
DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;
 d=football.example.com; i=@football.example.com;
 q=dns/txt; s=brisbane; t=1528637909; h=from : to :
 subject : date : message-id : from : subject : date;
 bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;
 b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus
 Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==
DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;
 d=football.example.com; i=@football.example.com;
 q=dns/txt; s=test; t=1528637909; h=from : to : subject :
 date : message-id : from : subject : date;
 bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;
 b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3
 DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz
 dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=
From: Joe SixPack <joe@football.example.com>
To: Suzie Q <suzie@shopping.example.net>
Subject: Is dinner ready?
Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)
Message-ID: <20030712040037.46341.5F8J@football.example.com>

Hi.

We lost the game.  Are you hungry yet?

Joe.
"""
RFC8463_ZONES = {
    "brisbane._domainkey.football.example.com": [
        ["v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="]
    ],
    "test._domainkey.football.example.com": [
        [
            "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWR",
            "iGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutAC",
            "DfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3",
            "Ip3G+2kryOTIKT+l/K4w3QIDAQAB",
        ]
    ],
}


def test_the_rfc8463_example_passes_with_both_signatures(tmp_path, reactor):
    found = results(tmp_path, reactor, RFC8463_ZONES, RECEIVED + RFC8463_SIGNED)
    assert [(r.result, r.property("header.a"), r.property("header.s")) for r in found] == [
        ("pass", "ed25519-sha256", "brisbane"),
        ("pass", "rsa-sha256", "test"),
    ]
    assert {r.property("header.d") for r in found} == {"football.example.com"}
    assert [r.property("header.b") for r in found] == ["/gCrinpc", "F45dVWDf"]


def test_the_rfc8463_example_fails_when_changed(tmp_path, reactor):
    changed = RECEIVED + RFC8463_SIGNED.replace(b"Is dinner ready?", b"Is lunch ready?")
    found = results(tmp_path, reactor, RFC8463_ZONES, changed)
    assert [r.result for r in found] == ["fail", "fail"]
