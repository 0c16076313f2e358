"""The message body on the wire: from the queue file to DATA.

Twisted's ``ESMTPSender`` dot-stuffs each 16 KiB chunk on its own and
never the first line (audit 4.5, C1, C2) and forwards bare CR (C3).  Here
the body streams from the queue file in :data:`CHUNK_SIZE` reads under
the transport's flow control, LF turned into CRLF and dot-stuffed across
chunk boundaries, first line included (:class:`DataEncoder`).  The file
has LF line ends only (intake refused bare CR and bare LF); a CR in it is
refused (``5.6.0``) by dropping the connection before the final dot,
never forwarded.

:class:`BodyProducer` does the streaming and reports each step to its
:class:`BodyOwner`, the connection, which keeps the timeouts.
"""

from __future__ import annotations

from typing import BinaryIO, Protocol

from twisted.internet.interfaces import IPushProducer, ITransport
from zope.interface import implementer

from twisted_mta.relay.outgoing import RelayError, permanent, temporary

CHUNK_SIZE = 64 * 1024

__all__ = [
    "CHUNK_SIZE",
    "BareCarriageReturn",
    "BodyOwner",
    "BodyProducer",
    "Prefixed",
    "DataEncoder",
]


class BareCarriageReturn(ValueError):
    """The queue file holds a CR; intake should have made that impossible."""


class DataEncoder:
    """The queue file's bytes (LF line ends) as DATA on the wire.

    Each LF becomes CRLF and each line starting with "." gets one more:
    the state (are we at the start of a line?) carries across chunks, so
    a "." at a chunk boundary or on the first line is stuffed too.
    """

    def __init__(self) -> None:
        self._line_start = True

    def encode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if b"\r" in chunk:
            raise BareCarriageReturn("bare CR in the queue file")
        stuffed = chunk.replace(b"\n.", b"\n..")
        if self._line_start and chunk.startswith(b"."):
            stuffed = b"." + stuffed
        self._line_start = chunk.endswith(b"\n")
        return stuffed.replace(b"\n", b"\r\n")

    def end(self) -> bytes:
        """The terminator, after a line end if the message lacks one."""
        return b".\r\n" if self._line_start else b"\r\n.\r\n"



class Prefixed:
    """A queue file read after bytes of our own: headers added on the way
    out, so the file itself stays as it was stored."""

    def __init__(self, prefix: bytes, file: BinaryIO) -> None:
        self._prefix = prefix
        self._file = file

    def read(self, size: int) -> bytes:
        if self._prefix:
            chunk, self._prefix = self._prefix[:size], self._prefix[size:]
            return chunk
        return self._file.read(size)


class BodyOwner(Protocol):
    """What a :class:`BodyProducer` tells of its progress."""

    def body_progress(self) -> None:
        """A chunk went out; more follow."""

    def body_written(self) -> None:
        """The last chunk and the final dot went out."""

    def body_failed(self, error: RelayError) -> None:
        """The body cannot go out; the conversation must end."""


@implementer(IPushProducer)
class BodyProducer:
    """Streams a queue file into the transport, one chunk per step.

    A push producer: a pull producer over TLS is driven by the global
    cooperator, so on the global reactor only.  Writing stops as soon as
    the transport pauses us, so at most one chunk waits in memory.
    """

    def __init__(self, file: BinaryIO, consumer: ITransport, owner: BodyOwner) -> None:
        self._file = file
        self._consumer = consumer
        self._owner = owner
        self._encoder = DataEncoder()
        self._paused = False
        self._busy = False
        self._stopped = False

    def start(self) -> None:
        self._consumer.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._busy:
            return
        self._busy = True
        try:
            while not (self._paused or self._stopped):
                self._step()
        finally:
            self._busy = False

    def stopProducing(self) -> None:
        self._stopped = True

    def _step(self) -> None:
        try:
            chunk = self._file.read(CHUNK_SIZE)
            data = self._encoder.encode(chunk) if chunk else self._encoder.end()
        except BareCarriageReturn:
            self._fail(permanent("5.6.0", "queue file has a bare CR; message not sent"))
            return
        except OSError as error:
            self._fail(temporary("4.3.0", f"cannot read the queue file: {error.strerror}"))
            return
        self._consumer.write(data)
        if chunk:
            self._owner.body_progress()
        else:
            self._finish()
            self._owner.body_written()

    def _finish(self) -> None:
        self._stopped = True
        self._consumer.unregisterProducer()

    def _fail(self, error: RelayError) -> None:
        self._finish()
        self._owner.body_failed(error)

