"""The 7-bit copy of a queued message, for a server without 8BITMIME.

:func:`seven_bit_copy` converts (:mod:`twisted_mta.mail.sevenbit`) the
added header lines and the queue file, together, in a thread of the
reactor's pool: parsing and encoding a message of tens of megabytes would
otherwise stop every other session for a noticeable while.  The thread
holds the message in memory, which is bounded by the largest message
intake takes; the copy it gives back is an anonymous temporary file, not
memory, because sending it can take minutes on a slow link, and several
deliveries can be at it at once.  The file goes when it is closed (or the
process ends); the queue file is never changed, so each attempt converts
anew.
"""

from __future__ import annotations

import tempfile
from typing import BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool

from twisted_mta.mail.sevenbit import seven_bit
from twisted_mta.relay.outgoing import Outgoing, temporary

__all__ = ["seven_bit_copy"]


def seven_bit_copy(
    reactor: IReactorThreads, outgoing: Outgoing, eight_bit_headers: bool
) -> Deferred[BinaryIO]:
    """A temporary file, at its start, with the message made 7-bit.

    Fails with :class:`~twisted_mta.mail.sevenbit.Unconvertible`, or with a
    temporary :class:`~twisted_mta.relay.outgoing.RelayError` when the
    queue file cannot be read.
    """
    return deferToThreadPool(
        reactor, reactor.getThreadPool(), _convert, outgoing, eight_bit_headers
    )


def _convert(outgoing: Outgoing, eight_bit_headers: bool) -> BinaryIO:
    try:
        with open(outgoing.path, "rb") as file:
            message = outgoing.prefix + file.read()
    except OSError as error:
        raise temporary("4.3.0", f"cannot read the queue file: {error.strerror}") from None
    converted = seven_bit(message, eight_bit_headers=eight_bit_headers)
    copy = None
    try:
        copy = tempfile.TemporaryFile()
        copy.write(converted)
        copy.seek(0)
    except OSError as error:
        if copy is not None:
            copy.close()
        raise temporary("4.3.0", f"cannot write the 7-bit copy: {error.strerror}") from None
    return copy
