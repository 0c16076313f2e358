"""The dkim plugin's signer: signatures that dkimpy verifies, for RSA and
Ed25519 keys made as ``twisted-mta dkim keygen`` makes them, and the mail
it leaves alone."""

from __future__ import annotations

import email.parser
import email.policy
import io
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.python.threadpool import ThreadPool

from tests.helpers.threads import ThreadReactor
from twisted_mta.interfaces import MessageInfo, PolicyContext, SessionInfo, TransactionInfo
from twisted_mta.mail import dkimkeys
from twisted_mta.policies.dkim import factory
from twisted_mta.policies.dkim.sign import from_domain, sign

MESSAGE = (
    b"Received: from client.example.org by mx.example.test\n"
    b"From: Alice <alice@example.test>\n"
    b"To: bob@remote.example\n"
    b"Subject: signed\n"
    b"Message-ID: <1@example.test>\n"
    b"\n"
    b"Hello,\n"
    b"a line\n"
)


class ThreadPoolReactor(ThreadReactor):
    """A stand-in reactor with a thread pool, for ``deferToThreadPool``."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = ThreadPool(1, 1)
        self.pool.start()

    def getThreadPool(self):
        return self.pool


@pytest.fixture
def reactor():
    made = ThreadPoolReactor()
    yield made
    made.pool.stop()


def make_key(folder: Path, domain: str, kind: str, selector: str = "mta") -> str:
    """A key file as keygen writes it; the text of its TXT record."""
    pem = dkimkeys.generate(kind)
    (folder / dkimkeys.key_file_name(domain, selector)).write_bytes(pem)
    return dkimkeys.dns_record(pem)


def dns_with(records: dict[str, str]):
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name.decode().rstrip("."), "").encode()

    return dnsfunc


def info(message: bytes) -> MessageInfo:
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(message)
    return MessageInfo(headers, len(message), lambda: io.BytesIO(message))


def policy(tmp_path: Path, reactor, **options):
    context = PolicyContext(
        reactor=reactor,
        hostname="mx.example.test",
        state_dir=tmp_path / "spool" / "plugins" / "dkim",
        resolver=None,
    )
    return factory.policy({"keys": str(tmp_path), **options}, context)


def signed(value: str, message: bytes) -> bytes:
    """The message as it leaves: our header prepended, CRLF line ends."""
    folded = "\n\t".join(part.strip() for part in value.splitlines())
    whole = f"DKIM-Signature: {folded}\n".encode() + message
    return whole.replace(b"\n", b"\r\n")


SUBMITTED = SessionInfo("192.0.2.1", "submission", user="alice@example.test")
TRANSACTION = TransactionInfo("ABC123", "alice@example.test", ("bob@remote.example",))


def hook(tmp_path, reactor, session=SUBMITTED, message=MESSAGE):
    answer = policy(tmp_path, reactor).message(session, TRANSACTION, info(message))
    if answer is None:
        return None
    [verdict] = reactor.results(answer)
    return verdict


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_submitted_mail_is_signed_and_verifies(tmp_path, reactor, kind):
    record = make_key(tmp_path, "example.test", kind)
    verdict = hook(tmp_path, reactor)
    [(name, value)] = verdict.headers
    assert name == "DKIM-Signature"
    assert not value.startswith("DKIM-Signature")
    tags = dict(
        part.strip().split("=", 1) for part in "".join(value.split()).split(";") if part
    )
    assert tags["d"] == "example.test" and tags["s"] == "mta"
    assert tags["c"] == "relaxed/relaxed"
    assert tags["a"] == ("rsa-sha256" if kind == "rsa" else "ed25519-sha256")
    assert tags["h"].split(":") == ["from", "to", "subject", "message-id", "from"]
    dnsfunc = dns_with({"mta._domainkey.example.test": record})
    assert dkim.verify(signed(value, MESSAGE), dnsfunc=dnsfunc)


def test_local_submission_is_signed(tmp_path, reactor):
    make_key(tmp_path, "example.test", "ed25519")
    local = SessionInfo("127.0.0.1", "local", user="alice")
    assert hook(tmp_path, reactor, local).headers[0][0] == "DKIM-Signature"


def test_a_changed_message_fails_verification(tmp_path, reactor):
    record = make_key(tmp_path, "example.test", "rsa")
    [(_, value)] = hook(tmp_path, reactor).headers
    dnsfunc = dns_with({"mta._domainkey.example.test": record})
    assert not dkim.verify(signed(value, MESSAGE.replace(b"a line", b"a lie")), dnsfunc=dnsfunc)
    changed = MESSAGE.replace(b"Subject: signed", b"Subject: changed")
    assert not dkim.verify(signed(value, changed), dnsfunc=dnsfunc)
    added_from = b"From: mallory@example.test\n" + MESSAGE
    assert not dkim.verify(signed(value, added_from), dnsfunc=dnsfunc)


def test_unauthenticated_smtp_mail_is_not_signed(tmp_path, reactor):
    make_key(tmp_path, "example.test", "rsa")
    stranger = SessionInfo("192.0.2.1", "smtp")
    assert hook(tmp_path, reactor, stranger).headers == ()


def test_no_key_for_the_from_domain_means_no_signature(tmp_path, reactor):
    make_key(tmp_path, "example.test", "rsa", selector="other")
    make_key(tmp_path, "elsewhere.example", "rsa")
    assert hook(tmp_path, reactor) is None


def test_a_replaced_key_file_is_read_again(tmp_path, reactor):
    make_key(tmp_path, "example.test", "rsa")
    signer = policy(tmp_path, reactor)
    first = reactor.results(signer.message(SUBMITTED, TRANSACTION, info(MESSAGE)))[0]
    assert "a=rsa-sha256" in first.headers[0][1]
    make_key(tmp_path, "example.test", "ed25519")
    second = reactor.results(signer.message(SUBMITTED, TRANSACTION, info(MESSAGE)))[0]
    assert "a=ed25519-sha256" in second.headers[0][1]


def test_crlf_and_lf_messages_sign_alike(tmp_path):
    make_key(tmp_path, "example.test", "rsa")
    key = dkimkeys.signing_key((tmp_path / "example.test.mta.key").read_bytes())
    lf = sign(MESSAGE, "example.test", "mta", key)
    crlf = sign(MESSAGE.replace(b"\n", b"\r\n"), "example.test", "mta", key)
    body_hash = [part for part in "".join(lf.split()).split(";") if part.startswith("bh=")]
    assert body_hash and body_hash[0] in "".join(crlf.split())


@pytest.mark.parametrize(
    "header, domain",
    [
        ("Alice <Alice@Example.TEST>", "example.test"),
        ("a@one.example, b@two.example", None),
        ("no address", None),
        ("a@bad/domain", None),
    ],
)
def test_the_from_domain(header, domain):
    assert from_domain(info(f"From: {header}\n\nx\n".encode()).headers) == domain


def test_options_are_checked(tmp_path, reactor):
    with pytest.raises(ValueError, match="wrong: unknown option"):
        policy(tmp_path, reactor, wrong=1, verify=True)
    with pytest.raises(ValueError, match="sign:"):
        policy(tmp_path, reactor, sign="all")
    with pytest.raises(ValueError, match="selector:"):
        policy(tmp_path, reactor, selector="a/b")


def test_a_relative_keys_folder_is_under_the_spool(tmp_path, reactor):
    signer = policy(tmp_path, reactor, keys="dkim")
    assert signer.signer.keys.folder == tmp_path / "spool" / "dkim"


def test_small_rsa_keys_are_refused():
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="1024 bits"):
        dkimkeys.signing_key(small)
