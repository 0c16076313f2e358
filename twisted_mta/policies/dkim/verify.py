"""The verifier of the ``dkim`` plugin: every DKIM-Signature of a message
that arrives gives one ``dkim=`` result (RFC 6376 section 6, RFC 8601).

The signatures are checked by dkimpy, the library the signer uses: it
knows both algorithms of today (``rsa-sha256``, and ``ed25519-sha256`` of
RFC 8463), the canonicalizations, and refuses RSA keys under 1024 bits
(RFC 8301).  Its own key lookup is a blocking DNS query, which the
server's single thread cannot afford, so dkimpy never asks DNS here:

1. in a worker thread, the stored message is read, turned into its CRLF
   form (the one that was signed) and parsed, and each signature's tags
   are checked for what can be verified at all;
2. in the reactor, the key records (``<s>._domainkey.<d>`` TXT) are
   fetched through the server's ``twisted.names`` resolver, all at once,
   each lookup with a timeout well under the plugin's own;
3. in a worker thread again, dkimpy verifies each signature with a
   ``dnsfunc`` that answers from the records fetched, and nothing else.

The results, per RFC 8601 section 2.7.1: ``pass``; ``fail`` when the body
hash or the signature does not verify; ``neutral`` when the signature
cannot be processed (bad syntax, an algorithm or version we do not know,
expired); ``permerror`` when its key is absent or unusable; ``temperror``
when the key could not be fetched for now.  Each result names the
signature by ``header.d``, ``header.i``, ``header.s``, ``header.a`` and
the first characters of ``b=`` (``header.b``, RFC 6008).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value
from twisted.internet import defer, threads
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.python.failure import Failure

from twisted_mta.interfaces import AuthResult, MessageInfo
from twisted_mta.mail.dkimkeys import valid_name
from twisted_mta.policies.dkim.sign import crlf

PASS, FAIL, NEUTRAL = "pass", "fail", "neutral"
PERMERROR, TEMPERROR, NONE = "permerror", "temperror", "none"
# Well under the default plugin timeout (10 s): a dead name server gives
# temperror rather than the plugin's 451 4.3.0.
KEY_TIMEOUT = 5.0
# rsa-sha1, which dkimpy still checks, must not pass (RFC 8301 section 3.1).
ALGORITHMS = (b"rsa-sha256", b"ed25519-sha256")
B_PREFIX = 8
_WHITESPACE = re.compile(rb"\s+")
_PRINTABLE = re.compile(r"[!-~]+")
_BYTES_REPR = re.compile(r"b'([^']*)'")
# How a lookup fails for a name that does not exist (NXDOMAIN); the other
# DomainErrors (SERVFAIL, REFUSED...) are temporary.
_ABSENT = (dns_error.DNSNameError, dns_error.AuthoritativeDomainError)


@dataclass(frozen=True)
class Signature:
    """One DKIM-Signature field: its tags, and ``problem`` when it cannot
    be verified at all (the reason of its ``neutral``)."""

    tags: Mapping[bytes, bytes] = field(default_factory=dict)
    problem: str = ""

    @property
    def key_name(self) -> str:
        """Where its key is published: ``<s>._domainkey.<d>``, lower case."""
        return f"{self.text(b's')}._domainkey.{self.text(b'd')}".lower()

    def text(self, tag: bytes) -> str:
        """A tag's value without its folding whitespace; empty when absent
        or not printable ASCII (nothing else goes into our header)."""
        value = _WHITESPACE.sub(b"", self.tags.get(tag, b"")).decode("ascii", "replace")
        return value if _PRINTABLE.fullmatch(value) else ""

    def result(self, result: str, reason: str = "") -> AuthResult:
        """Its ``dkim=`` result, with the properties that name it."""
        properties = (
            ("header.d", self.text(b"d")),
            ("header.i", self.text(b"i")),
            ("header.s", self.text(b"s")),
            ("header.a", self.text(b"a")),
            ("header.b", self.text(b"b")[:B_PREFIX]),
        )
        kept = tuple((name, value) for name, value in properties if value)
        return AuthResult("dkim", result, kept, reason=reason)


def read_signature(value: bytes) -> Signature:
    """The signature of a DKIM-Signature field's value."""
    try:
        tags = parse_tag_value(value)
    except InvalidTagValueList:
        return Signature(problem="signature syntax error")
    if b"a" in tags and tags[b"a"] not in ALGORITHMS:
        return Signature(tags, "unsupported algorithm")
    try:
        dkim.validate_signature_fields(tags)
    except dkim.ValidationError as error:
        return Signature(tags, short(error))
    signature = Signature(tags)
    if not (valid_name(signature.text(b"d")) and valid_name(signature.text(b"s"))):
        return Signature(tags, "d= or s= is not a domain name")
    return signature


def short(error: Exception) -> str:
    """dkimpy's message without the values it quotes (``x= value is past``):
    they come from the message and are long."""
    text = _BYTES_REPR.sub(r"\1", str(error))
    return re.split(r" \(|: ", text, maxsplit=1)[0]


@dataclass(frozen=True)
class Parsed:
    """A message as dkimpy verifies it, and its signatures, top first."""

    checker: dkim.DKIM
    signatures: list[Signature]

    def key_names(self) -> set[str]:
        return {signature.key_name for signature in self.signatures if not signature.problem}


def parse(data: bytes) -> Parsed | None:
    """The message (stored, LF line ends) in its signed form; None when
    its header cannot be parsed."""
    try:
        checker = dkim.DKIM(crlf(data))
    except dkim.MessageFormatError:
        return None
    values = [value for name, value in checker.headers if name.lower() == b"dkim-signature"]
    return Parsed(checker, [read_signature(value) for value in values])


@dataclass(frozen=True)
class Key:
    """What DNS said of one key: its record (the strings of the first TXT
    record joined), or the result and reason of its absence."""

    record: bytes = b""
    result: str = ""
    reason: str = ""


def key_of(answer: tuple[list, list, list]) -> Key:
    """The key of a ``lookupText`` answer.  With several TXT records
    (RFC 6376 3.6.2.2 leaves that undefined) the first is used."""
    records = [b"".join(rr.payload.data) for rr in answer[0] if rr.type == dns.TXT]
    if not records:
        return Key(result=PERMERROR, reason="no key for signature")
    return Key(records[0])


def lookup_failed(failure: Failure) -> Key:
    """The key of a failed lookup: none there, or none for now."""
    if failure.check(*_ABSENT):
        return Key(result=PERMERROR, reason="no key for signature")
    if failure.check(defer.TimeoutError):
        return Key(result=TEMPERROR, reason="key lookup timed out")
    return Key(result=TEMPERROR, reason="key lookup failed")


def key_problem(signature: Signature, record: bytes) -> str:
    """Why the key record cannot check the signature; empty if it can."""
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList:
        return "key syntax error"
    if b"p" in tags and not tags[b"p"].strip():
        return "key revoked"
    kind = tags.get(b"k", b"rsa")
    if not signature.tags[b"a"].startswith(kind + b"-"):
        return "key type does not match a="
    try:
        dkim.evaluate_pk(signature.key_name.encode(), record)
    except (dkim.DKIMException, ValueError) as error:
        return short(error)
    return ""


def answering(keys: Mapping[str, Key]) -> Callable[..., bytes]:
    """A dkimpy ``dnsfunc`` that answers from the keys fetched."""

    def dnsfunc(name: bytes, timeout: float = 0) -> bytes:
        key = keys.get(name.decode("ascii", "replace").rstrip(".").lower())
        return key.record if key is not None else b""

    return dnsfunc


def check(parsed: Parsed, index: int, keys: Mapping[str, Key]) -> AuthResult:
    """The result of the signature at ``index``."""
    signature = parsed.signatures[index]
    if signature.problem:
        return signature.result(NEUTRAL, signature.problem)
    key = keys[signature.key_name]
    if not key.record:
        return signature.result(key.result, key.reason)
    problem = key_problem(signature, key.record)
    if problem:
        return signature.result(PERMERROR, problem)
    try:
        verified = parsed.checker.verify(idx=index, dnsfunc=answering(keys))
    except dkim.ValidationError as error:
        if str(error).startswith("body hash mismatch"):
            return signature.result(FAIL, "body hash did not verify")
        return signature.result(NEUTRAL, short(error))
    except dkim.KeyFormatError as error:
        # A key too small to trust (RFC 8301), or too small for the hash.
        return signature.result(PERMERROR, short(error))
    except dkim.DKIMException as error:
        return signature.result(NEUTRAL, short(error))
    if not verified:
        return signature.result(FAIL, "signature did not verify")
    return signature.result(PASS)


def check_all(parsed: Parsed, keys: Mapping[str, Key]) -> list[AuthResult]:
    return [check(parsed, index, keys) for index in range(len(parsed.signatures))]


class Verifier:
    """Verifies the signatures of a message, with keys from ``resolver``."""

    def __init__(self, resolver: Any, reactor: Any, timeout: float = KEY_TIMEOUT) -> None:
        self.resolver = resolver
        self.reactor = reactor
        self.timeout = timeout

    def verify_message(self, message: MessageInfo) -> defer.Deferred[list[AuthResult]]:
        """A Deferred of one result per signature, or of one ``none``."""
        d = self._in_thread(_read, message)
        d.addCallback(self._verify)
        return d

    def _verify(self, parsed: Parsed | None) -> defer.Deferred[list[AuthResult]] | list[AuthResult]:
        if parsed is None:
            return [AuthResult("dkim", PERMERROR, reason="message header cannot be parsed")]
        if not parsed.signatures:
            return [AuthResult("dkim", NONE)]
        d = self._fetch(parsed.key_names())
        d.addCallback(lambda keys: self._in_thread(check_all, parsed, keys))
        return d

    def _fetch(self, names: Iterable[str]) -> defer.Deferred[dict[str, Key]]:
        """The keys of ``names``, looked up in parallel."""
        ordered = sorted(names)
        d = defer.gatherResults([self._lookup(name) for name in ordered], consumeErrors=True)
        d.addCallback(lambda keys: dict(zip(ordered, keys)))
        return d

    def _lookup(self, name: str) -> defer.Deferred[Key]:
        d = self.resolver.lookupText(name)
        d.addTimeout(self.timeout, self.reactor)
        d.addCallbacks(key_of, lookup_failed)
        return d

    def _in_thread(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), function, *args
        )


def _read(message: MessageInfo) -> Parsed | None:
    with message.open() as stream:
        return parse(stream.read())
