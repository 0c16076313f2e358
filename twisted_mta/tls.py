"""Server TLS: the configured certificate, or a self-signed one made once.

TLS 1.2 is the floor (RFC 8314 and current practice).  TLS 1.2 offers
only ECDHE key exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305),
as RFC 9325 recommends: no CBC suites, no static RSA, no finite-field
DHE.  TLS 1.3 suites are OpenSSL's, all of which are AEAD and forward
secret.  The listeners hold a :class:`ServerTLS`, whose certificate can
be replaced while they run (a reload, a renewal on disk): connections made after the
change get the new one, open ones keep theirs.  A certificate and key are
checked when loaded, so that a pair that does not belong together stops
the start (or is kept out by a reload) instead of failing every STARTTLS.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from zope.interface import implementer

from twisted_mta.storage.files import write_atomically

# TLS 1.2 suites; TLS 1.3 ones are configured apart by OpenSSL.
TLS12_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString("ECDHE+AESGCM:ECDHE+CHACHA20")


class TLSError(Exception):
    """The certificate or key cannot be used; one line, naming the files."""


Stamp = tuple[tuple[int, int, int] | None, ...]


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """What the listeners and STARTTLS make their TLS connections with."""

    def __init__(self) -> None:
        self._options: CertificateOptions | None = None

    def use(self, options: CertificateOptions) -> None:
        self._options = options

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._options.getContext(), None)


@dataclass(frozen=True)
class Certificate:
    """A loaded certificate and key, and how their files were when read."""

    options: CertificateOptions
    files: tuple[Path, Path]
    stamp: Stamp


def load_certificate(
    certificate: Path | None, private_key: Path | None, tls_dir: Path, hostname: str
) -> Certificate:
    """The configured pair, or the self-signed one (made if missing)."""
    if certificate is None or private_key is None:
        certificate, private_key = self_signed(tls_dir, hostname)
    files = (certificate, private_key)
    # Taken before reading: a change made while we read is seen next time.
    stamp = files_stamp(files)
    return Certificate(load_pair(certificate, private_key), files, stamp)


def files_stamp(paths: tuple[Path, ...]) -> Stamp:
    """What tells a replaced or rewritten file: time, size and inode."""
    return tuple(_stamp(path) for path in paths)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


def check_configured_pair(certificate: Path | None, private_key: Path | None) -> None:
    """Load a configured pair to refuse it before anything starts.

    Without one there is nothing to check: the self-signed pair is made at
    the start.  Raises TLSError.
    """
    if certificate is not None and private_key is not None:
        load_pair(certificate, private_key)


def load_pair(certificate: Path, private_key: Path) -> CertificateOptions:
    """Options serving the PEM chain ``certificate`` with ``private_key``.

    Raises TLSError, naming the files, for a file that cannot be read or
    parsed, a key that does not match the first certificate of the chain,
    or a pair OpenSSL will not use.
    """
    chain = _load_chain(certificate)
    key = _load_key(private_key)
    if _public_der(chain[0].public_key()) != _public_der(key.public_key()):
        raise TLSError(
            f"{private_key} is not the private key of the certificate {certificate}"
        )
    try:
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(chain[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
            raiseMinimumTo=TLSVersion.TLSv1_2,
            acceptableCiphers=TLS12_CIPHERS,
        )
        options.getContext()
    except (SSL.Error, TypeError, ValueError) as error:
        raise TLSError(
            f"{certificate} with {private_key}: OpenSSL refuses them: {_one_line(error)}"
        ) from None
    return options


def _load_chain(path: Path) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as error:
        raise TLSError(f"{path}: cannot load certificate: {_one_line(error)}") from None
    return chain


def _load_key(path: Path):
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise TLSError(f"{path}: cannot load private key: {_one_line(error)}") from None


def _public_der(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        # pyOpenSSL's (library, function, reason) tuples; the reasons say it.
        return "; ".join(reason for *_, reason in error.args[0])
    return " ".join(str(error).split()) or type(error).__name__


def self_signed(tls_dir: Path, hostname: str) -> tuple[Path, Path]:
    """Return (certificate, key) under ``tls_dir``, making them if missing."""
    certificate = tls_dir / "selfsigned.pem"
    key_path = tls_dir / "selfsigned.key"
    if certificate.exists() and key_path.exists():
        return certificate, key_path
    os.makedirs(tls_dir, 0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), False)
        .sign(key, hashes.SHA256())
    )
    write_atomically(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_atomically(certificate, cert.public_bytes(serialization.Encoding.PEM))
    return certificate, key_path
