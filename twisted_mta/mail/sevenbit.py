"""An 8-bit MIME message made 7-bit, for a next hop without 8BITMIME.

RFC 6152 lets a relay either refuse such a message or convert it; like
Postfix, :func:`seven_bit` converts, part by part:

* a leaf part labelled ``8bit``, or labelled ``7bit`` or not labelled but
  holding 8-bit bytes, gets its body encoded as quoted-printable and its
  ``Content-Transfer-Encoding`` field says so (the field is added at the
  end of the part's header when missing; the message itself also gets
  ``MIME-Version: 1.0`` when missing, without which a reader ignores the
  encoding).  No charset is declared where none was: the bytes go through
  unchanged, so whatever the reader guessed before it still can;
* multipart containers and ``message/rfc822`` parts are walked, and their
  ``8bit`` label, now untrue, becomes ``7bit``;
* everything else, header fields, boundary lines, preamble, epilogue and
  line ends, stays byte for byte.

That last point is why the bytes are spliced here rather than written
back by ``email.generator``: the generator writes its own whitespace
after a field's colon, its own boundary lines and line ends, and closes
what the sender left open.  The ``email`` package reads each part's header
(policy ``compat32``, which keeps the values as written): content type,
boundary (quoted or RFC 2231), transfer encoding; :mod:`binascii` encodes.

What cannot be made 7-bit raises :class:`Unconvertible`: a message with a
``DKIM-Signature`` (:class:`SignedMessage`; the signature covers the body
and would break), 8-bit bytes in a header field (unless the caller may
send them: SMTPUTF8), in a preamble or epilogue, or in a part already
labelled base64, quoted-printable or binary.
"""

from __future__ import annotations

import binascii
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

__all__ = ["SignedMessage", "Unconvertible", "seven_bit"]

_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
# A header field's first line: a name, maybe blanks (obsolete syntax), a colon.
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
_IDENTITY = ("", "7bit", "8bit")
_CTE = b"content-transfer-encoding"
_SIGNED = "the message is DKIM-signed, and converting it to 7-bit would break the signature"


class Unconvertible(ValueError):
    """The message cannot be made 7-bit; the text says why."""


class SignedMessage(Unconvertible):
    """The message has a DKIM signature, which converting would break."""


def seven_bit(message: bytes, *, eight_bit_headers: bool = False) -> bytes:
    """``message`` with every 8-bit part quoted-printable; see the module
    docstring.  ``eight_bit_headers`` lets 8-bit header fields through, for
    a next hop that takes SMTPUTF8.  Raises :class:`Unconvertible`."""
    return _Converter(eight_bit_headers).message(message)


class _Converter:
    def __init__(self, eight_bit_headers: bool) -> None:
        self._eight_bit_headers = eight_bit_headers

    def message(self, data: bytes) -> bytes:
        entity = _Entity.split(data)
        if entity.fields.get("dkim-signature") is not None:
            raise SignedMessage(_SIGNED)
        return self._entity(entity, "text/plain", top=True)

    def _entity(self, entity: _Entity, default_type: str, top: bool = False) -> bytes:
        if not self._eight_bit_headers and _EIGHT_BIT.search(entity.head):
            raise Unconvertible("8-bit bytes in a header field cannot be converted")
        entity.fields.set_default_type(default_type)
        content_type = entity.fields.get_content_type()
        encoding = str(entity.fields.get("content-transfer-encoding", "")).strip().lower()
        boundary = entity.fields.get_boundary()
        if encoding in _IDENTITY and content_type.startswith("multipart/") and boundary:
            inner = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
            return self._container(entity, encoding, self._multipart(entity.body, boundary, inner))
        if encoding in _IDENTITY and content_type == "message/rfc822":
            inner = self._entity(_Entity.split(entity.body), "text/plain")
            return self._container(entity, encoding, inner)
        return self._leaf(entity, encoding, top)

    def _container(self, entity: _Entity, encoding: str, body: bytes) -> bytes:
        if encoding == "8bit":
            entity.relabel(b"7bit")
        return entity.joined(body)

    def _leaf(self, entity: _Entity, encoding: str, top: bool) -> bytes:
        eight_bit = _EIGHT_BIT.search(entity.body) is not None
        if encoding in _IDENTITY and (eight_bit or encoding == "8bit"):
            entity.relabel(b"quoted-printable")
            if top and entity.fields.get("mime-version") is None:
                entity.add_field(b"MIME-Version: 1.0")
            return entity.joined(binascii.b2a_qp(entity.body, istext=True))
        if eight_bit:
            raise Unconvertible(f"8-bit bytes in a part already encoded as {encoding}")
        return entity.joined(entity.body)

    def _multipart(self, body: bytes, boundary: str, inner_type: str) -> bytes:
        """The parts between the delimiter lines (RFC 2046 5.1.1) converted;
        the line end before a delimiter belongs to the delimiter."""
        delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")
        out: list[bytes] = []
        part: list[bytes] | None = None  # None outside the parts
        closed = False
        for line in body.splitlines(keepends=True):
            kind = None if closed else _delimiter_kind(line, delimiter)
            if kind is None:
                if part is not None:
                    part.append(line)
                else:
                    _outside_parts(line)
                    out.append(line)
                continue
            if part is not None:
                out.append(self._part(part, inner_type, before_delimiter=True))
            out.append(line)
            closed = kind == "close"
            part = None if closed else []
        if part is not None:
            out.append(self._part(part, inner_type, before_delimiter=False))
        return b"".join(out)

    def _part(self, lines: list[bytes], inner_type: str, before_delimiter: bool) -> bytes:
        data = b"".join(lines)
        ending = _line_end(data) if before_delimiter else b""
        content = data[: len(data) - len(ending)]
        return self._entity(_Entity.split(content), inner_type) + ending


class _Entity:
    """A message or a part: its header as lines, the blank line, the body."""

    def __init__(self, lines: list[bytes], separator: bytes, body: bytes, newline: bytes) -> None:
        self.lines = lines
        self.separator = separator
        self.body = body
        self.newline = newline
        self.fields: Message = BytesHeaderParser(policy=compat32).parsebytes(self.head)

    @classmethod
    def split(cls, data: bytes) -> _Entity:
        """The header ends at the first empty line, or at the first line that
        is neither a field nor the continuation of one (then no blank line)."""
        lines: list[bytes] = []
        position = 0
        while position < len(data):
            end = data.find(b"\n", position)
            end = len(data) if end < 0 else end + 1
            line = data[position:end]
            if line in (b"\n", b"\r\n"):
                return cls(lines, line, data[end:], _line_end(line))
            if not (_FIELD.match(line) or (lines and line[:1] in (b" ", b"\t"))):
                break
            lines.append(line)
            position = end
        newline = _line_end(lines[0]) if lines else b"\n"
        return cls(lines, b"", data[position:], newline or b"\n")

    @property
    def head(self) -> bytes:
        return b"".join(self.lines)

    def relabel(self, encoding: bytes) -> None:
        """Content-Transfer-Encoding: ``encoding``, in place of every such
        field (continuation lines included) or added at the end."""
        field = b"Content-Transfer-Encoding: " + encoding
        kept: list[bytes] = []
        replaced = False
        skipping = False
        for line in self.lines:
            if line[:1] in (b" ", b"\t"):
                if not skipping:
                    kept.append(line)
                continue
            skipping = line.split(b":", 1)[0].strip().lower() == _CTE
            if not skipping:
                kept.append(line)
            elif not replaced:
                kept.append(field + (_line_end(line) or self.newline))
                replaced = True
        self.lines = kept
        if not replaced:
            self.add_field(field)

    def add_field(self, field: bytes) -> None:
        if self.lines and not _line_end(self.lines[-1]):
            self.lines[-1] += self.newline
        self.lines.append(field + self.newline)
        if not self.separator:
            self.separator = self.newline

    def joined(self, body: bytes) -> bytes:
        return self.head + self.separator + body


def _delimiter_kind(line: bytes, delimiter: bytes) -> str | None:
    """"open" or "close" if ``line`` is a delimiter line (transport padding
    allowed after it), else None."""
    if not line.startswith(delimiter):
        return None
    rest = line[len(delimiter) :].rstrip(b"\r\n")
    kind = "open"
    if rest.startswith(b"--"):
        kind, rest = "close", rest[2:]
    return kind if not rest.strip(b" \t") else None


def _outside_parts(line: bytes) -> None:
    if _EIGHT_BIT.search(line):
        raise Unconvertible("8-bit bytes in a multipart preamble or epilogue")


def _line_end(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return b"\r\n"
    return b"\n" if data.endswith(b"\n") else b""
