"""Strict parsing of the arguments of the SMTP ``MAIL`` and ``RCPT`` commands.

Implements the path grammar of RFC 5321 (sections 4.1.2 and 4.5.3.1), its
SMTPUTF8 extension (RFC 6531), and the ``SIZE`` (RFC 1870), ``BODY``
(RFC 6152) and ``SMTPUTF8`` ESMTP parameters.

We do not use the parser of :class:`twisted.mail.smtp.Address` because it is
too lenient for a server facing the Internet: it is ASCII-only, accepts bare
LF and other control characters inside quoted strings, keeps the quotes in the
local part, silently appends a default domain to unqualified addresses and has
no length limits.  We replace the parsing but keep its data model
(``local``/``domain`` bytes, ``str()``/``bytes()``) so that Twisted code
receiving our objects keeps working.

Every malformed input raises :class:`PathError`, which carries the reply code,
enhanced status code and text to send; error texts never echo the client's
address bytes.  Checks happen in this order: command syntax (501 5.5.2),
parameter syntax (501 5.5.4), address syntax (501 5.1.7 for senders, 501 5.1.3
for recipients), characters that change how an address is shown (553 5.1.7
or 5.1.3: line separators and bidirectional controls have no business in an
address, and would reach logs and the Return-Path and Delivered-To headers),
SMTPUTF8 requirement (553 5.6.7), unknown parameters (555 5.5.4) and
finally the message size (552 5.3.4).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from twisted.mail import smtp

from twisted_mta.mail.text import first_unsafe

__all__ = [
    "NULL_SENDER",
    "Address",
    "MailCommand",
    "NullAddress",
    "PathError",
    "RcptCommand",
    "parse_mail",
    "parse_rcpt",
]

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256  # including the angle brackets (RFC 5321 4.5.3.1.3)

_ATEXT = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\xff-]"
_DOT_STRING = re.compile(rb"%s+(?:\.%s+)*+" % (_ATEXT, _ATEXT))
_QUOTED_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"', re.DOTALL)
_QCONTENT = re.compile(rb"(?:[ !#-\[\]-~\x80-\xff]|\\[ -~])*+")
_QUOTED_PAIR = re.compile(rb"\\([ -~])")
_NEEDS_ESCAPE = re.compile(rb'(["\\])')
_PATH = re.compile(rb'<((?:[^">]|"(?:[^"\\]|\\.)*+")*+)>', re.DOTALL)
_LABEL = re.compile(
    rb"[A-Za-z0-9\x80-\xff](?:[A-Za-z0-9\x80-\xff-]{0,61}[A-Za-z0-9\x80-\xff])?"
)
_IPV4_TEXT = re.compile(rb"[0-9.]+")
_IPV6_TEXT = re.compile(rb"[0-9A-Fa-f:.]+")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc
_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*+")
_VALUE = re.compile(rb"[!-<>-~]+")
_SIZE = re.compile(r"[0-9]{1,20}")

_MAIL_USAGE = "Syntax: MAIL FROM:<address> [parameters]"
_RCPT_USAGE = "Syntax: RCPT TO:<address> [parameters]"
_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8"})
_RCPT_PARAMS: frozenset[str] = frozenset()
_BODY_TYPES = frozenset({"7BIT", "8BITMIME"})
_ENHANCED = {"sender": "5.1.7", "recipient": "5.1.3"}
_MAX_ECHO = 40  # longest parameter keyword repeated back in a reply


class PathError(Exception):
    """A ``MAIL``/``RCPT`` argument was rejected; carries the SMTP reply."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(code, enhanced, text)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


class _AddressSyntaxError(Exception):
    """An address is malformed; the message is a short, wire-safe reason."""


class Address(smtp.Address):
    """A validated mailbox.

    Subclasses Twisted's ``Address`` so that ``isinstance`` checks in Twisted
    code succeed, but deliberately does not call its ``__init__`` (which would
    re-parse the address with Twisted's lenient rules).

    ``local`` is the dequoted local part, ``domain`` the lower-cased domain;
    ``domain`` is only empty for the special recipient ``<Postmaster>``.
    """

    local: bytes
    domain: bytes

    def __init__(self, local: bytes, domain: bytes) -> None:
        self.local = local
        self.domain = domain

    @property
    def needs_utf8(self) -> bool:
        """Whether the address can only be relayed with SMTPUTF8."""
        return not (self.local.isascii() and self.domain.isascii())

    def __bytes__(self) -> bytes:
        local = _quote_local(self.local)
        return local + b"@" + self.domain if self.domain else local

    def __str__(self) -> str:
        return bytes(self).decode("utf-8")

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(local={self.local!r}, domain={self.domain!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Address):
            return NotImplemented
        return (self.local, self.domain) == (other.local, other.domain)

    def __hash__(self) -> int:
        return hash((self.local, self.domain))


class NullAddress(smtp.Address):
    """The null reverse-path of ``MAIL FROM:<>``; use :data:`NULL_SENDER`."""

    local: bytes
    domain: bytes

    def __init__(self) -> None:
        self.local = b""
        self.domain = b""

    @property
    def needs_utf8(self) -> bool:
        """The null path never needs SMTPUTF8."""
        return False

    def __bytes__(self) -> bytes:
        return b""

    def __str__(self) -> str:
        return ""

    def __repr__(self) -> str:
        return "NullAddress()"


NULL_SENDER = NullAddress()


@dataclass(frozen=True)
class MailCommand:
    """The parsed argument of ``MAIL FROM:``."""

    sender: Address | NullAddress
    size: int | None
    body: str | None
    smtputf8: bool
    params: dict[str, str | None]


@dataclass(frozen=True)
class RcptCommand:
    """The parsed argument of ``RCPT TO:``."""

    recipient: Address
    params: dict[str, str | None]


def parse_mail(argument: bytes, *, max_size: int) -> MailCommand:
    """Parse ``FROM:<reverse-path> [params]`` (the text after ``MAIL``)."""
    path, params = _split_command(argument, b"FROM:", _MAIL_USAGE)
    smtputf8 = _smtputf8_param(params)
    body = _body_param(params)
    size = _size_param(params)
    sender = _parse_reverse_path(path, smtputf8)
    _reject_unknown(params, _MAIL_PARAMS, "MAIL")
    if size is not None and size > max_size:
        raise PathError(
            552, "5.3.4", "Message size exceeds fixed maximum message size"
        )
    return MailCommand(sender, size, body, smtputf8, params)


def parse_rcpt(argument: bytes, *, smtputf8: bool) -> RcptCommand:
    """Parse ``TO:<forward-path> [params]`` (the text after ``RCPT``).

    ``smtputf8`` tells whether the transaction's ``MAIL`` had ``SMTPUTF8``.
    """
    path, params = _split_command(argument, b"TO:", _RCPT_USAGE)
    recipient = _parse_forward_path(path, smtputf8)
    _reject_unknown(params, _RCPT_PARAMS, "RCPT")
    return RcptCommand(recipient, params)


def _split_command(
    argument: bytes, prefix: bytes, usage: str
) -> tuple[bytes, dict[str, str | None]]:
    """Split the argument into the inside of ``<...>`` and the parameters."""
    if argument[: len(prefix)].upper() != prefix:
        raise PathError(501, "5.5.2", usage)
    rest = argument[len(prefix) :].lstrip(b" ")
    match = _PATH.match(rest)
    if match is None:
        raise PathError(501, "5.5.2", usage)
    tail = rest[match.end() :]
    if tail and not tail.startswith(b" "):
        raise PathError(501, "5.5.2", usage)
    return match.group(1), _parse_params(tail)


def _parse_params(tail: bytes) -> dict[str, str | None]:
    """Parse space-separated ``KEYWORD[=VALUE]`` pairs (RFC 5321 4.1.2)."""
    params: dict[str, str | None] = {}
    for token in tail.split(b" "):
        if not token:
            continue
        keyword, equals, value = token.partition(b"=")
        if not _KEYWORD.fullmatch(keyword) or (
            equals and not _VALUE.fullmatch(value)
        ):
            raise PathError(501, "5.5.4", "Invalid parameter syntax")
        name = keyword.decode("ascii").upper()
        if name in params:
            raise PathError(
                501, "5.5.4", f"Duplicate parameter {name[:_MAX_ECHO]}"
            )
        params[name] = value.decode("ascii") if equals else None
    return params


def _smtputf8_param(params: dict[str, str | None]) -> bool:
    if "SMTPUTF8" not in params:
        return False
    if params["SMTPUTF8"] is not None:
        raise PathError(501, "5.5.4", "SMTPUTF8 does not take a value")
    return True


def _body_param(params: dict[str, str | None]) -> str | None:
    if "BODY" not in params:
        return None
    body = (params["BODY"] or "").upper()
    if body not in _BODY_TYPES:
        raise PathError(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
    return body


def _size_param(params: dict[str, str | None]) -> int | None:
    if "SIZE" not in params:
        return None
    value = params["SIZE"]
    if value is None or not _SIZE.fullmatch(value):
        raise PathError(
            501, "5.5.4", "SIZE must be a number of at most 20 digits"
        )
    return int(value)


def _reject_unknown(
    params: dict[str, str | None], known: frozenset[str], verb: str
) -> None:
    for name in params:
        if name not in known:
            raise PathError(
                555,
                "5.5.4",
                f"{verb} parameter {name[:_MAX_ECHO]} not recognized",
            )


def _parse_reverse_path(path: bytes, smtputf8: bool) -> Address | NullAddress:
    if not path:
        return NULL_SENDER
    return _checked_path(path, smtputf8, "sender")


def _parse_forward_path(path: bytes, smtputf8: bool) -> Address:
    if path.lower() == b"postmaster":
        return Address(b"postmaster", b"")
    return _checked_path(path, smtputf8, "recipient")


def _checked_path(path: bytes, smtputf8: bool, role: str) -> Address:
    """Parse a path, turning failures into the reply suited to ``role``."""
    try:
        address = _parse_path(path)
    except _AddressSyntaxError as exc:
        raise PathError(
            501, _ENHANCED[role], f"Bad {role} address syntax ({exc})"
        ) from None
    unsafe = first_unsafe(path.decode("utf-8"))
    if unsafe:
        raise PathError(
            553,
            _ENHANCED[role],
            f"{role.capitalize()} address rejected: it contains {unsafe},"
            " a line separator or bidirectional control character",
        )
    if not smtputf8 and not path.isascii():
        raise PathError(
            553, "5.6.7", "SMTPUTF8 required for non-ASCII address"
        )
    return address


def _parse_path(path: bytes) -> Address:
    """Parse the inside of ``<...>``: ``[source-route:]local-part@domain``."""
    _check_text(path)
    local, domain = _split_mailbox(_strip_route(path))
    address = Address(_parse_local(local), _parse_domain(domain))
    if len(path) + 2 > MAX_PATH:
        raise _AddressSyntaxError("path too long")
    return address


def _check_text(path: bytes) -> None:
    """Require valid UTF-8 (no surrogates, no overlongs) without controls."""
    try:
        text = path.decode("utf-8")
    except UnicodeDecodeError:
        raise _AddressSyntaxError("not valid UTF-8") from None
    if _CONTROL.search(text):
        raise _AddressSyntaxError("control character")


def _strip_route(path: bytes) -> bytes:
    """Validate and drop an ``@a,@b:`` source route (RFC 5321 4.1.1.3, C)."""
    if not path.startswith(b"@"):
        return path
    route, colon, mailbox = path.partition(b":")
    if not colon:
        raise _AddressSyntaxError("malformed source route")
    for hop in route.split(b","):
        if not hop.startswith(b"@"):
            raise _AddressSyntaxError("malformed source route")
        _check_hostname(hop[1:])
    return mailbox


def _split_mailbox(mailbox: bytes) -> tuple[bytes, bytes]:
    """Split at the ``@`` that follows the (possibly quoted) local part."""
    quoted = _QUOTED_STRING.match(mailbox)
    end = quoted.end() if quoted else mailbox.find(b"@")
    if end < 0 or mailbox[end : end + 1] != b"@":
        raise _AddressSyntaxError("expected local-part@domain")
    return mailbox[:end], mailbox[end + 1 :]


def _parse_local(raw: bytes) -> bytes:
    """Return the dequoted local part (a dot-string or a quoted-string)."""
    if len(raw) > MAX_LOCAL_PART:
        raise _AddressSyntaxError("local part too long")
    if _QUOTED_STRING.fullmatch(raw):
        return _dequote(raw[1:-1])
    if not _DOT_STRING.fullmatch(raw):
        raise _AddressSyntaxError("invalid local part")
    return raw


def _dequote(content: bytes) -> bytes:
    if not _QCONTENT.fullmatch(content):
        raise _AddressSyntaxError("invalid quoted local part")
    local = _QUOTED_PAIR.sub(rb"\1", content)
    if not local:
        raise _AddressSyntaxError("empty local part")
    return local


def _quote_local(local: bytes) -> bytes:
    """Quote a local part unless it is a valid dot-string."""
    if _DOT_STRING.fullmatch(local):
        return local
    return b'"' + _NEEDS_ESCAPE.sub(rb"\\\1", local) + b'"'


def _parse_domain(raw: bytes) -> bytes:
    """Validate a domain name or address literal; return it lower-cased."""
    if len(raw) > MAX_DOMAIN:
        raise _AddressSyntaxError("domain too long")
    if raw.startswith(b"["):
        _check_literal(raw)
    else:
        _check_hostname(raw)
    return raw.lower()


def _check_hostname(name: bytes) -> None:
    """Labels of letters, digits, hyphens (and UTF-8 with SMTPUTF8)."""
    if not all(_LABEL.fullmatch(label) for label in name.split(b".")):
        raise _AddressSyntaxError("invalid domain")


def _check_literal(raw: bytes) -> None:
    """Accept ``[IPv4]`` and ``[IPv6:...]`` address literals only."""
    content = raw[1:-1] if raw.endswith(b"]") else b""
    if content[:5].lower() == b"ipv6:":
        valid = _is_ip(content[5:], _IPV6_TEXT, ipaddress.IPv6Address)
    else:
        valid = _is_ip(content, _IPV4_TEXT, ipaddress.IPv4Address)
    if not valid:
        raise _AddressSyntaxError("invalid address literal")


def _is_ip(
    text: bytes, charset: re.Pattern[bytes], parse: Callable[[str], object]
) -> bool:
    if not charset.fullmatch(text):
        return False
    try:
        parse(text.decode("ascii"))
    except ValueError:
        return False
    return True
