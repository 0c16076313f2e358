"""Line endings of a message that did not come over SMTP.

A local file or a generated message may end its lines in CRLF, LF or a
lone CR; what we store uses LF, as Maildir readers expect.
"""

from __future__ import annotations


def normalise_line_endings(data: bytes) -> bytes:
    """CRLF and lone CR to LF."""
    endings = LineEndings()
    return endings.feed(data) + endings.finish()


class LineEndings:
    """CRLF and lone CR to LF, in a stream cut anywhere (even inside CRLF)."""

    def __init__(self) -> None:
        self._carriage_return = False

    def feed(self, chunk: bytes) -> bytes:
        if self._carriage_return:
            chunk = b"\r" + chunk
        self._carriage_return = chunk.endswith(b"\r")
        if self._carriage_return:
            chunk = chunk[:-1]
        return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def finish(self) -> bytes:
        return b"\n" if self._carriage_return else b""
