"""Loading a certificate and its key: each problem is one line naming the files."""

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.helpers.capture import TestCA
from twisted_mta.tls import TLSError, load_certificate, load_pair


@pytest.fixture
def ca(tmp_path):
    return TestCA(tmp_path)


def refusal(certificate, key) -> str:
    with pytest.raises(TLSError) as raised:
        load_pair(certificate, key)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_a_chain_and_its_key_make_a_context(tmp_path, ca):
    pair = ca.issue("mx.example.test")
    chain = tmp_path / "fullchain.pem"
    chain.write_bytes(pair.certificate.read_bytes() + ca.path.read_bytes())
    options = load_pair(chain, pair.key)
    assert options.getContext() is not None
    assert len(options.extraCertChain) == 1


def test_the_key_of_another_certificate(ca):
    certificate, key = ca.issue("mx.example.test").certificate, ca.issue("other.test").key
    assert refusal(certificate, key) == f"{key} is not the private key of the certificate {certificate}"


def test_a_missing_file(tmp_path, ca):
    pair = ca.issue("mx.example.test")
    missing = tmp_path / "missing.pem"
    assert refusal(missing, pair.key) == f"{missing}: cannot load certificate: No such file or directory"


def test_an_encrypted_key(tmp_path, ca):
    pair = ca.issue("mx.example.test")
    key = serialization.load_pem_private_key(pair.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))
    assert refusal(pair.certificate, encrypted).startswith(f"{encrypted}: cannot load private key: ")


def test_a_pair_openssl_refuses(tmp_path):
    key = rsa.generate_private_key(65537, 1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    certificate_file, key_file = tmp_path / "weak.pem", tmp_path / "weak.key"
    certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    try:
        load_pair(certificate_file, key_file)
    except TLSError as error:
        assert str(error) == f"{certificate_file} with {key_file}: OpenSSL refuses them: ee key too small"
    else:
        pytest.skip("this OpenSSL accepts 1024-bit RSA keys")


def test_without_a_pair_a_self_signed_one_is_made_once(tmp_path):
    first = load_certificate(None, None, tmp_path / "tls", "mx.example.test").options
    made = sorted(p.name for p in (tmp_path / "tls").iterdir())
    assert made == ["selfsigned.key", "selfsigned.pem"]
    again = load_certificate(None, None, tmp_path / "tls", "mx.example.test").options
    assert again.certificate.digest("sha256") == first.certificate.digest("sha256")
