"""The signer of the ``dkim`` plugin: submitted mail gets a signature.

The signature is made with dkimpy (``dkim.sign``): a small, pure Python
signer that does RSA-SHA256 itself and Ed25519-SHA256 through PyNaCl,
with the canonicalizations and header selection of the RFC, and is the
verifier the tests check the result with.  It runs in a worker thread
(``deferToThreadPool``): reading the key and hashing the message would
block the reactor.

Mail is signed once, in the ``message`` hook, when a key of the From:
header's domain is in the ``keys`` folder.  The header is then prepended
to the stored message, so every copy carries it, local and queued alike,
and the relay sends it unchanged; there is no ``outbound`` hook, which
would sign the queued copy a second time.

The message is stored with LF line ends; it is signed in its CRLF form,
the one it has on the wire.  Keys are read again whenever their file
changes.
"""

from __future__ import annotations

import email.utils
from email.message import Message
from pathlib import Path
from typing import Any

import dkim
from twisted.internet import defer, threads
from twisted.logger import Logger

from twisted_mta.interfaces import MessageInfo, TransactionInfo, Verdict
from twisted_mta.mail.dkimkeys import SigningKey, key_file_name, signing_key, valid_name

SIGNED_HEADERS = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "reply-to",
    "in-reply-to",
    "references",
)
_log = Logger()


def from_domain(headers: Message) -> str | None:
    """The domain of the single address in the single From: header."""
    values = headers.get_all("From") or []
    if len(values) != 1:
        return None
    addresses = email.utils.getaddresses([str(values[0])])
    if len(addresses) != 1:
        return None
    local, at, domain = addresses[0][1].rpartition("@")
    if not (local and at) or not valid_name(domain):
        return None
    return domain.lower()


def crlf(data: bytes) -> bytes:
    """The message with CRLF line ends, as it goes on the wire."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def signed_header_names(message: bytes) -> list[bytes]:
    """The headers of :data:`SIGNED_HEADERS` that the message has, and
    ``from`` once more, so that no From: can be added above ours."""
    head = message.split(b"\r\n\r\n", 1)[0]
    present = {
        line.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
        for line in head.split(b"\r\n")
        if line[:1] not in (b" ", b"\t") and b":" in line
    }
    return [name.encode() for name in SIGNED_HEADERS if name in present] + [b"from"]


def sign(message: bytes, domain: str, selector: str, key: SigningKey) -> str:
    """The DKIM-Signature header's value (folded with LF) for ``message``
    (LF or CRLF line ends), relaxed/relaxed."""
    wire = crlf(message)
    header = dkim.sign(
        wire,
        selector.encode("ascii"),
        domain.encode("ascii"),
        key.private,
        signature_algorithm=key.algorithm,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=signed_header_names(wire),
    )
    name, _, value = header.decode("ascii").partition(":")
    assert name.lower() == "dkim-signature", name
    return value.strip().replace("\r\n", "\n")


class KeyFolder:
    """The keys of a folder of ``<domain>.<selector>.key`` files, read
    again when a file changes (its size, mtime or inode)."""

    def __init__(self, folder: Path, selector: str) -> None:
        self.folder = folder
        self.selector = selector
        self._cache: dict[str, tuple[tuple[int, int, int], SigningKey]] = {}

    def key_for(self, domain: str) -> SigningKey | None:
        """The key of ``domain``, None if it has none; ValueError or
        OSError when its file cannot be used."""
        path = self.folder / key_file_name(domain, self.selector)
        try:
            status = path.stat()
        except FileNotFoundError:
            self._cache.pop(domain, None)
            return None
        stamp = (status.st_size, status.st_mtime_ns, status.st_ino)
        cached = self._cache.get(domain)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            key = signing_key(path.read_bytes())
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        self._cache[domain] = (stamp, key)
        return key


class Signer:
    """Signs a submitted message whose From: domain has a key."""

    def __init__(self, keys: KeyFolder, reactor: Any) -> None:
        self.keys = keys
        self.reactor = reactor

    def sign_message(
        self, transaction: TransactionInfo, message: MessageInfo
    ) -> defer.Deferred[Verdict | None] | None:
        """A Deferred of the verdict that prepends the signature, or of
        None when the domain has no key; None without a From: domain."""
        domain = from_domain(message.headers)
        if domain is None:
            return None
        return threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._sign, domain, message, transaction
        )

    def _sign(
        self, domain: str, message: MessageInfo, transaction: TransactionInfo
    ) -> Verdict | None:
        key = self.keys.key_for(domain)
        if key is None:
            return None
        with message.open() as stream:
            value = sign(stream.read(), domain, self.keys.selector, key)
        _log.info(
            "dkim: id={queue_id} signed d={domain} s={selector}",
            queue_id=transaction.queue_id,
            domain=domain,
            selector=self.keys.selector,
        )
        return Verdict.proceed([("DKIM-Signature", value)])
