"""Our Received header (RFC 5321 4.4), built only from validated values.

Twisted's ``receivedHeader`` echoes the HELO argument and the recipients
verbatim, so a bare LF in either injects headers (audit S7), and it crashes
without HELO (S9).  Here the HELO name appears only if it is a domain or an
address literal; anything else is replaced by ``unknown``.
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import re
import time
from dataclasses import dataclass

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_RECEIVED_FIELD = re.compile(rb"\nreceived:", re.IGNORECASE)
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def clean_helo(helo: bytes | None) -> str:
    """The HELO argument if it is a domain or address literal, else 'unknown'."""
    if not helo or len(helo) > 255:
        return "unknown"
    try:
        text = helo.decode("ascii")
    except UnicodeDecodeError:
        return "unknown"
    if _DOMAIN.fullmatch(text):
        return text
    if text.startswith("[") and text.endswith("]"):
        literal = text[1:-1]
        if literal[:5].lower() == "ipv6:":
            literal = literal[5:]
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return "unknown"
        return text
    return "unknown"


@dataclass(frozen=True)
class TraceInfo:
    """The facts of one transaction that go into its Received header."""

    helo: bytes | None
    client_ip: str
    hostname: str
    queue_id: str
    esmtp: bool
    tls: str | None = None
    authenticated: bool = False
    user: str | None = None
    recipient: str | None = None
    utf8: bool = False


def received_header(info: TraceInfo, now: float | None = None) -> bytes:
    """The header, LF-terminated, folded with tabs."""
    protocol = _with_protocol(info)
    lines = [
        f"Received: from {clean_helo(info.helo)} ([{info.client_ip}])",
        f"\tby {info.hostname} (twisted-mta) with {protocol} id {info.queue_id}",
    ]
    if info.tls:
        lines.append(f"\t({info.tls})")
    if info.user:
        lines.append(f"\t(authenticated as {info.user})")
    date = _date(time.time() if now is None else now)
    if info.recipient:
        lines.append(f"\tfor <{info.recipient}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\n".join(lines) + "\n").encode("utf-8")


@functools.lru_cache(maxsize=2)
def _formatted_second(second: int) -> str:
    return email.utils.formatdate(second, localtime=True)


def _date(now: float) -> str:
    """RFC 5322 date, formatted once a second: it shows in every message."""
    return _formatted_second(int(now))


def _with_protocol(info: TraceInfo) -> str:
    """RFC 3848 / RFC 6531 names: SMTP, ESMTP, ESMTPS, ESMTPA, UTF8SMTPSA..."""
    if not info.esmtp:
        return "SMTP"
    name = "UTF8SMTP" if info.utf8 else "ESMTP"
    return name + ("S" if info.tls else "") + ("A" if info.authenticated else "")


def count_received(header: bytes) -> int:
    """Received headers in a header block (LF endings) that starts with LF
    or at a line start."""
    return len(_RECEIVED_FIELD.findall(header if header.startswith(b"\n") else b"\n" + header))
