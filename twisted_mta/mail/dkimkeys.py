"""DKIM keys: made, read, and published in DNS (RFC 6376, RFC 8463).

A key file is a PEM private key (PKCS#8, or PKCS#1 for RSA), RSA of 2048
bits or more, or Ed25519.  :func:`signing_key` turns one into what
dkimpy's ``sign`` takes: the PEM itself for RSA, and for Ed25519 the
base64 of the raw 32-byte private key (dkimpy reads no PEM for Ed25519).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

KEY_TYPES = ("rsa", "ed25519")
RSA_BITS = 2048
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class SigningKey:
    """A private key as dkimpy signs with it: ``algorithm`` is its
    ``a=`` tag, ``private`` the key in the form dkimpy's ``sign`` takes."""

    algorithm: bytes
    private: bytes


def valid_name(name: str) -> bool:
    """Whether ``name`` is a domain or selector usable in a file name and
    in DNS: dot-separated labels of letters, digits and hyphens."""
    return all(_LABEL.match(label) for label in name.lower().split("."))


def key_file_name(domain: str, selector: str) -> str:
    return f"{domain.lower()}.{selector.lower()}.key"


def generate(kind: str) -> bytes:
    """A new private key of ``kind`` (``rsa``: 2048 bits), as PKCS#8 PEM."""
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown key type {kind!r} (known: {', '.join(KEY_TYPES)})")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load(pem: bytes) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"not an unencrypted PEM private key ({error})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_BITS:
            raise ValueError(f"an RSA key of {key.key_size} bits (at least {RSA_BITS} needed)")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise ValueError("neither an RSA nor an Ed25519 key")


def signing_key(pem: bytes) -> SigningKey:
    """The key of a key file; ValueError if it is not one we sign with."""
    key = _load(pem)
    if isinstance(key, rsa.RSAPrivateKey):
        return SigningKey(b"rsa-sha256", pem)
    raw = key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    return SigningKey(b"ed25519-sha256", base64.b64encode(raw))


def dns_record(pem: bytes) -> str:
    """The TXT record's text for the key: ``p=`` is the DER public key for
    RSA, the raw 32-byte public key for Ed25519 (RFC 8463), in base64."""
    key = _load(pem)
    if isinstance(key, rsa.RSAPrivateKey):
        kind = "rsa"
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        kind = "ed25519"
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode('ascii')}"


def zone_line(domain: str, selector: str, record: str) -> str:
    """The record as a zone file line; TXT strings are cut at 255 bytes."""
    strings = " ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))
    return f"{selector.lower()}._domainkey.{domain.lower()}. IN TXT {strings}"
