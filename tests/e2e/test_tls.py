"""TLS on the listeners: configured certificate, TLS 1.2 floor and suites, self-signed default."""

import smtplib
import socket
import ssl

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.helpers.certificates import make_certificate, peer_certificate
from tests.helpers.daemon import insecure_context


def test_self_signed_certificate_made_at_first_start(mta):
    assert (mta.spool / "tls" / "selfsigned.pem").exists()
    with mta.smtp() as client:
        client.ehlo("client.example.org")
        client.starttls(context=insecure_context())
        cn = peer_certificate(client).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == "mx.example.test"


def test_configured_certificate_is_served_on_both_tls_kinds(start_mta, tmp_path):
    (tmp_path / "tls").mkdir()
    certificate = make_certificate(tmp_path / "tls", "mail.example.test")
    extra = f'[tls]\ncertificate = "{tmp_path}/tls/cert.pem"\nprivate_key = "{tmp_path}/tls/key.pem"\n'
    daemon = start_mta(extra=extra)
    with daemon.smtp("submission") as client:
        client.ehlo("client.example.org")
        client.starttls(context=insecure_context())
        assert peer_certificate(client) == certificate
    with daemon.smtp("submissions") as client:
        assert peer_certificate(client) == certificate
    assert not (daemon.spool / "tls" / "selfsigned.pem").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_before_1_2_is_refused(mta, version):
    context = insecure_context()
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = version
    try:
        context.set_ciphers("ALL:@SECLEVEL=0")
    except ssl.SSLError:
        pytest.skip("this OpenSSL cannot offer old TLS at all")
    with mta.smtp() as client:
        client.ehlo("client.example.org")
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            client.starttls(context=context)


def test_tls_1_2_works(mta):
    context = insecure_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with mta.smtp() as client:
        client.ehlo("client.example.org")
        client.starttls(context=context)
        assert client.sock.version() == "TLSv1.2"
        assert client.sendmail("a@example.org", ["postmaster@example.test"], b"Subject: t\r\n\r\nx\r\n") == {}
    [message] = [m for m in mta.messages("example.test", "postmaster") if b"TLSv1.2 with cipher" in m]
    assert b"with ESMTPS" in message


def test_unreadable_certificate_stops_the_start(tmp_path):
    from tests.helpers.daemon import make_daemon

    daemon = make_daemon(tmp_path / "mta", extra=f'[tls]\ncertificate = "{tmp_path}/missing.pem"\nprivate_key = "{tmp_path}/missing.key"\n')
    with pytest.raises(RuntimeError) as raised:
        daemon.start()
    assert "missing.pem" in str(raised.value) and "tls.certificate" in str(raised.value)


def tls12_ciphers() -> list[str]:
    """Every TLS 1.2 suite this client's OpenSSL can offer."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("ALL:@SECLEVEL=0")
    return [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]


def handshake_succeeds(port: int, cipher: str) -> bool:
    context = insecure_context()
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(f"{cipher}:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                return tls.cipher()[0] == cipher
        except (ssl.SSLError, ConnectionError):
            return False


def forward_secret_aead(cipher: str) -> bool:
    return cipher.startswith("ECDHE-") and ("-GCM-" in cipher or "CHACHA20-POLY1305" in cipher)


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_tls_1_2_accepts_only_ecdhe_with_aead(start_mta, tmp_path, key_type):
    (tmp_path / "tls").mkdir()
    key = rsa.generate_private_key(65537, 2048) if key_type == "rsa" else None
    make_certificate(tmp_path / "tls", "mail.example.test", key)
    extra = f'[tls]\ncertificate = "{tmp_path}/tls/cert.pem"\nprivate_key = "{tmp_path}/tls/key.pem"\n'
    daemon = start_mta(extra=extra)
    offered = tls12_ciphers()
    accepted = [c for c in offered if handshake_succeeds(daemon.ports["submissions"], c)]
    print(f"{key_type}: {len(accepted)} of {len(offered)} TLS 1.2 suites accepted: {accepted}")
    assert accepted
    assert all(forward_secret_aead(c) for c in accepted), accepted
