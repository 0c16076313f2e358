"""The milter wire format (Sendmail's libmilter ``mfdef.h``, protocol 6).

Every packet is a 4-byte big-endian length, then a one-byte command or
reply code, then ``length - 1`` bytes of data; strings in the data end
with NUL.  This module only turns packets into bytes and back.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

VERSION = 6

# Commands, MTA to milter.
ABORT, BODY, CONNECT, MACRO, BODYEOB, HELO = b"A", b"B", b"C", b"D", b"E", b"H"
HEADER, MAIL, EOH, OPTNEG, QUIT, RCPT, DATA = b"L", b"M", b"N", b"O", b"Q", b"R", b"T"

# Replies, milter to MTA.
ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL, REPLYCODE = b"a", b"c", b"d", b"r", b"t", b"y"
ADDHEADER, INSHEADER, CHGHEADER, QUARANTINE = b"h", b"i", b"m", b"q"
PROGRESS, SKIP = b"p", b"s"
ADDRCPT, DELRCPT, ADDRCPT_PAR, REPLBODY, CHGFROM = b"+", b"-", b"2", b"b", b"e"
CONN_FAIL, SHUTDOWN = b"f", b"4"

# Actions the milter may take (SMFIF_*).
ADDHDRS, CHGBODY, ADDRCPT_FLAG, DELRCPT_FLAG = 0x01, 0x02, 0x04, 0x08
CHGHDRS, QUARANTINE_FLAG, CHGFROM_FLAG, ADDRCPT_PAR_FLAG, SETSYMLIST = 0x10, 0x20, 0x40, 0x80, 0x100

# Protocol steps the milter may ask us to leave out (SMFIP_NO*) or not
# to wait a reply for (SMFIP_NR_*).
NOCONNECT, NOHELO, NOMAIL, NORCPT, NOBODY, NOHDRS, NOEOH = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40
NR_HDR, NOUNKNOWN, NODATA, SKIP_FLAG, RCPT_REJ = 0x80, 0x100, 0x200, 0x400, 0x800
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
NR_DATA, NR_UNKN, NR_EOH, NR_BODY, HDR_LEADSPC = 0x10000, 0x20000, 0x40000, 0x80000, 0x100000

# Sendmail's MILTER_CHUNK_SIZE: the largest body packet a milter expects.
BODY_CHUNK = 65535
# A milter's reply is small (a header at most); more is a broken peer.
MAX_PACKET = 1 << 20

_ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}")


class ProtocolError(Exception):
    """The milter sent something that is not the milter protocol."""


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def _strings(values: Iterable[bytes]) -> bytes:
    return b"".join(value + b"\0" for value in values)


def optneg(actions: int, protocol: int, version: int = VERSION) -> bytes:
    return packet(OPTNEG, struct.pack(">III", version, actions, protocol))


def macros(command: bytes, values: Mapping[bytes, bytes]) -> bytes:
    """Macro values (``{name}`` or one letter) for the next ``command``."""
    return packet(MACRO, command + _strings(b for pair in values.items() for b in pair))


def connect(hostname: bytes, family: bytes, port: int = 0, address: bytes = b"") -> bytes:
    """``family`` is ``4``, ``6``, ``L`` (a Unix socket) or ``U`` (unknown,
    which carries no port nor address)."""
    data = hostname + b"\0" + family
    if family != b"U":
        data += struct.pack(">H", port) + address + b"\0"
    return packet(CONNECT, data)


def helo(name: bytes) -> bytes:
    return packet(HELO, name + b"\0")


def mail(sender: bytes, args: Iterable[bytes] = ()) -> bytes:
    return packet(MAIL, _strings([b"<" + sender + b">", *args]))


def rcpt(recipient: bytes, args: Iterable[bytes] = ()) -> bytes:
    return packet(RCPT, _strings([b"<" + recipient + b">", *args]))


def header(name: bytes, value: bytes) -> bytes:
    return packet(HEADER, _strings([name, value]))


def body(chunk: bytes) -> bytes:
    if len(chunk) > BODY_CHUNK:
        raise ValueError("a body chunk is at most 65535 bytes")
    return packet(BODY, chunk)


@dataclass(frozen=True)
class Negotiated:
    """The milter's answer to OPTNEG: its version, the actions it will
    take, the steps it wants left out or unanswered."""

    version: int
    actions: int
    protocol: int


@dataclass(frozen=True)
class ReplyCode:
    """An SMFIR_REPLYCODE: the SMTP reply the milter wants sent."""

    code: int
    enhanced: str
    text: str


@dataclass(frozen=True)
class HeaderChange:
    """ADDHEADER (index None), INSHEADER or CHGHEADER (index given)."""

    kind: bytes
    name: str
    value: str
    index: int | None = None


class Decoder:
    """Packets out of a byte stream that may split them anywhere."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The whole packets now available, as ``(code, data)``."""
        self._buffer += data
        packets = []
        while len(self._buffer) >= 4:
            (length,) = struct.unpack(">I", self._buffer[:4])
            if not 1 <= length <= MAX_PACKET:
                raise ProtocolError(f"packet length {length}")
            if len(self._buffer) < 4 + length:
                break
            code, data = self._buffer[4:5], self._buffer[5 : 4 + length]
            self._buffer = self._buffer[4 + length :]
            packets.append((code, data))
        return packets


def split_strings(data: bytes, count: int) -> list[bytes]:
    """``count`` NUL-terminated strings; the last NUL may be missing."""
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) != count:
        raise ProtocolError(f"expected {count} strings, got {len(parts)}")
    return parts


def decode_optneg(data: bytes) -> Negotiated:
    # A milter may append the macros it wants (SMFIF_SETSYMLIST); we send
    # ours regardless, so only the first three words matter.
    if len(data) < 12:
        raise ProtocolError("short OPTNEG reply")
    return Negotiated(*struct.unpack(">III", data[:12]))


def decode_replycode(data: bytes) -> ReplyCode:
    """``550 5.7.1 text``, or ``550 text``, or a multi-line reply (its
    lines' texts joined)."""
    lines = [line for line in data.rstrip(b"\0").replace(b"\r\n", b"\n").split(b"\n") if line]
    if not lines or not re.fullmatch(rb"[45]\d\d", lines[0][:3]):
        raise ProtocolError(f"reply code {data[:40]!r}: not a 4xx or 5xx reply")
    code = int(lines[0][:3])
    enhanced = b""
    texts = []
    for line in lines:
        text = line[4:] if line[:3] == lines[0][:3] else line
        first, _, rest = text.partition(b" ")
        if _ENHANCED.fullmatch(first) and first[:1] == lines[0][:1]:
            enhanced, text = enhanced or first, rest
        texts.append(text.strip())
    text = b" ".join(texts)
    default = "5.7.1" if code >= 500 else "4.7.1"
    return ReplyCode(
        code, enhanced.decode("ascii") or default, text.decode("utf-8", "replace") or "Refused"
    )


def decode_header_change(code: bytes, data: bytes) -> HeaderChange:
    index = None
    if code in (INSHEADER, CHGHEADER):
        if len(data) < 4:
            raise ProtocolError("short header change")
        (index,) = struct.unpack(">I", data[:4])
        data = data[4:]
    name, value = split_strings(data, 2)
    return HeaderChange(code, _text(name), _text(value), index)


def decode_quarantine(data: bytes) -> str:
    return _text(data.rstrip(b"\0"))


def _text(value: bytes) -> str:
    # Milters fold with CRLF or LF; the message is stored with LF.
    return value.replace(b"\r\n", b"\n").replace(b"\r", b"").decode("utf-8", "replace")
