"""Decode the DATA stream a buffer at a time.

Twisted's server handles DATA one Python call chain per line, which caps it
near 90 MB/s, and it returns to command mode after an over-long line (the
S1 smuggling defect).  This decoder works on whole buffers with bytes
methods: it finds ``<CRLF>.<CRLF>`` (the only end of DATA), checks for bare
CR or LF and over-long lines, turns CRLF into LF and removes dot-stuffing.
After any fault it keeps reading, discarding, until the real end, so the
body can never be read as commands.

A ``DataTransfer`` is one message in DATA: the decoder and the message it
writes to, and the first error the message raised.  A message that does not
start with a header field gets an empty line before it, as Postfix's cleanup
and Twisted's server insert one: a Received header goes on top, and the
message's first line must not read as part of it.  Its header block may
pass through a filter on the way (the removal of forged
``Authentication-Results``): it is held until its empty line, at most
``HEADERS_LIMIT`` bytes; a longer block passes as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

from twisted_mta.mail.dsn import HEADERS_LIMIT
from twisted_mta.mail.received import count_received

MAX_LINE = 998  # RFC 5321 4.5.3.1.6, without the CRLF

BARE_LINE_ENDING = "bare CR or LF"
LINE_TOO_LONG = "line too long"
TOO_BIG = "message too big"
TOO_MANY_HOPS = "too many hops"

# RFC 5322 2.2: a field name is printable US-ASCII other than ':', then ':'.
_HEADER_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")

FAULT_REPLIES = {
    BARE_LINE_ENDING: (554, "5.6.0", "Error: bare CR or LF in message; message refused"),
    LINE_TOO_LONG: (554, "5.6.0", "Error: line longer than 998 characters; message refused"),
    TOO_BIG: (552, "5.3.4", "Error: message exceeds fixed maximum message size"),
    TOO_MANY_HOPS: (554, "5.4.6", "Error: too many hops (mail loop?); message refused"),
}


@dataclass
class DataDecoder:
    """Feed raw DATA bytes; get decoded body chunks and the end of DATA.

    ``sink`` receives body bytes (LF line endings, unstuffed) while no fault
    has been seen and the size stays within ``max_size``.  ``feed`` returns
    ``None`` while the message goes on, or the bytes that followed the final
    ``.<CRLF>`` (pipelined commands) once it has ended.

    ``hops`` counts the Received headers of the message header; more than
    ``max_hops`` (0: no limit) is a mail loop (RFC 5321 6.3).
    """

    sink: Callable[[bytes], None]
    max_size: int
    max_hops: int = 0
    size: int = 0
    hops: int = 0
    fault: str | None = None
    _partial: bytes = b""
    _in_header: bool = True

    def feed(self, chunk: bytes) -> bytes | None:
        data = self._partial + chunk if self._partial else chunk
        if data.startswith(b".\r\n"):
            self._partial = b""
            return data[3:]
        end = data.find(b"\r\n.\r\n")
        if end >= 0:
            self._partial = b""
            self._take(data[: end + 2])
            return data[end + 5 :]
        last = data.rfind(b"\r\n")
        complete = last + 2 if last >= 0 else 0
        self._partial = data[complete:]
        if complete:
            self._take(data[:complete])
        self._check_partial()
        return None

    def _check_partial(self) -> None:
        partial = self._partial
        if len(partial) > MAX_LINE + 1:
            self._fail(LINE_TOO_LONG)
            # Only the tail can still begin the end marker; keep that much.
            self._partial = partial[-4:]
            return
        if b"\n" in partial or b"\r" in partial[:-1]:
            self._fail(BARE_LINE_ENDING)

    def _take(self, lines: bytes) -> None:
        """Handle complete lines, each ending in CRLF."""
        if self.fault is not None:
            return
        # Deleting every CR is one cheap pass (a replace of CRLF is several
        # times slower); it is CRLF -> LF when no CR or LF is bare: when
        # there are as many CRs, and as many LFs, as CRLFs.
        body = lines.translate(None, b"\r")
        pairs = lines.count(b"\r\n")
        if len(lines) - len(body) != pairs or body.count(b"\n") != pairs:
            self._fail(BARE_LINE_ENDING)
            return
        if len(body) > MAX_LINE + 1 and _has_long_line(body):
            self._fail(LINE_TOO_LONG)
            return
        if body.startswith(b".") or b"\n." in body:
            body = (b"\n" + body).replace(b"\n.", b"\n")[1:]
        self.size += len(body)
        if self.size > self.max_size:
            self._fail(TOO_BIG)
            return
        if self._in_header:
            self._count_hops(body)
            if self.max_hops and self.hops > self.max_hops:
                self._fail(TOO_MANY_HOPS)
                return
        self.sink(body)

    def _count_hops(self, body: bytes) -> None:
        """Count Received headers up to the empty line ending the header.

        ``body`` always starts at a line start, so "\n" before it is true.
        """
        section = b"\n" + body
        end = section.find(b"\n\n")
        if end >= 0:
            section = section[: end + 1]
            self._in_header = False
        self.hops += count_received(section)

    def _fail(self, fault: str) -> None:
        if self.fault is None:
            self.fault = fault


def _has_long_line(body: bytes) -> bool:
    """Whether a line of ``body`` (complete lines, LF endings) is longer than
    MAX_LINE.  Jumps from a line start to the last LF within reach: one
    ``rfind`` per ~1000 bytes instead of one object per line."""
    end = len(body)
    start = 0
    while end - start > MAX_LINE + 1:
        newline = body.rfind(b"\n", start, start + MAX_LINE + 1)
        if newline < 0:
            return True
        start = newline + 1
    return False


class OpenMessage(Protocol):
    """A message being received: the spool's, or a ``LineFanout``."""

    def write(self, data: bytes) -> None:
        """Body bytes, LF line endings, unstuffed."""

    def eomReceived(self) -> defer.Deferred:
        """The end of the message: store it."""

    def connectionLost(self) -> None:
        """Drop what was written."""


class DataTransfer:
    """One message in DATA: the decoder, and the message it writes to.

    Twisted lets an ``IMessage`` raise ``SMTPServerError`` from
    ``lineReceived`` to refuse a message in the middle (a size limit, a
    full disk): the first error is kept in ``failure``, to be answered at
    the end of DATA, and the rest of the body is read and dropped.
    """

    def __init__(
        self,
        message: OpenMessage,
        max_size: int,
        max_hops: int,
        header_filter: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.message = message
        self.failure: Failure | None = None
        self.decoder = DataDecoder(self._write_first, max_size, max_hops)
        self._header_filter = header_filter
        self._held = b""

    def feed(self, data: bytes) -> bytes | None:
        """As ``DataDecoder.feed``: the bytes after the end of DATA, once it
        came (then a header block still held has been written)."""
        rest = self.decoder.feed(data)
        if rest is not None and self._header_filter is not None:
            self._release(self._header_filter(self._held))
        return rest

    def _write_first(self, data: bytes) -> None:
        """The first lines of the message; an empty line first if it has no header.

        The decoder hands over whole lines, so ``data`` starts with the
        message's whole first line.
        """
        self.decoder.sink = self._write if self._header_filter is None else self._hold
        if not _HEADER_FIELD.match(data) and not data.startswith(b"\n"):
            data = b"\n" + data
        self.decoder.sink(data)

    def _hold(self, data: bytes) -> None:
        """Keep the header block until its end; then filter it and go on."""
        held = self._held + data
        end = b"\n" + held
        blank = end.find(b"\n\n")
        if blank >= 0:
            self._release(self._header_filter(held[:blank]) + held[blank:])
        elif len(held) > HEADERS_LIMIT:
            self._release(held)
        else:
            self._held = held

    def _release(self, data: bytes) -> None:
        self._held = b""
        self._header_filter = None
        self.decoder.sink = self._write
        if data:
            self._write(data)

    def _write(self, data: bytes) -> None:
        if self.failure is not None:
            return
        try:
            self.message.write(data)
        except Exception:
            self.failure = Failure()
