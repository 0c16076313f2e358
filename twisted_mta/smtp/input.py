"""What a session has read and not handled yet, cut into command lines.

Twisted's ``LineOnlyReceiver`` takes a bare LF as a line end and drops the
connection on an over-long line.  Here command lines must end in CRLF and
fit 512 octets (12288 for a SASL response), bare CR or LF and control
characters are refused (S2, S7), and a line over the limit is discarded up
to its end without being kept (S2); each malformed line is reported to the
session, which answers it (S8).  During DATA the session takes the buffer
whole instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, including the CRLF
MAX_AUTH_LINE = 12288  # RFC 4954 4
# NUL and other controls have no place in a command; HT is tolerated.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Malformed:
    """A line that was refused, and why."""

    reason: str


class InputBuffer:
    """Bytes received and not handled yet.

    A ``bytearray``: removing a consumed line from the front is O(1).
    """

    __slots__ = ("_data", "_skipping_long_line")

    def __init__(self) -> None:
        self._data = bytearray()
        self._skipping_long_line = False

    def __len__(self) -> int:
        return len(self._data)

    def append(self, data: bytes) -> None:
        self._data += data

    def push_front(self, data: bytes) -> None:
        """Put back what followed the end of DATA: pipelined commands."""
        self._data[:0] = data

    def take_all(self) -> bytes:
        data = bytes(self._data)
        self._data.clear()
        return data

    def clear(self) -> None:
        self._data.clear()

    def next_line(self, limit: int) -> bytes | Malformed | None:
        """The next command line without its CRLF, if it is well-formed.

        ``limit`` counts the CRLF.  None means: wait for more input.  A line
        over the limit is ``Malformed`` at once and the rest of it, however
        long, is dropped as it comes.
        """
        buffer = self._data
        if self._skipping_long_line and not self._skip_rest_of_line():
            return None
        end = buffer.find(b"\n", 0, limit)
        if end < 0:
            if len(buffer) < limit:
                return None
            self._skipping_long_line = True
            return Malformed("line too long")
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        if not line.endswith(b"\r") or b"\r" in line[:-1]:
            return Malformed("bare CR or LF received; lines end in CRLF")
        if _CONTROL.search(line, 0, len(line) - 1):
            return Malformed("control character in command")
        return line[:-1]

    def _skip_rest_of_line(self) -> bool:
        """Drop input up to the end of an over-long line; True once found."""
        end = self._data.find(b"\n")
        if end < 0:
            self._data.clear()
            return False
        del self._data[: end + 1]
        self._skipping_long_line = False
        return True
