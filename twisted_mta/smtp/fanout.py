"""Twisted-style delivery avatars: one ``IMessage`` per recipient.

Our own avatars provide ``ITransactionDelivery`` and take one message for
all recipients.  A third-party ``IMessageDelivery`` gets what Twisted's
server would give it: a ``User`` per recipient from ``validateTo`` and the
body line by line to each recipient's ``IMessage``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from twisted.internet import defer
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageSMTP


class RcptUser(smtp.User):
    """Twisted's ``User`` around an address we parsed ourselves.

    ``User.__init__`` would re-parse the address with Twisted's ASCII-only
    ``Address``; the attributes are the same, and ``params`` holds RCPT's
    parameters.
    """

    def __init__(
        self,
        dest: smtp.Address,
        helo: tuple[bytes | None, bytes],
        protocol: smtp.SMTP,
        orig: smtp.Address,
        params: Mapping[str, str | None] | None = None,
    ) -> None:
        self.dest = dest
        self.helo = helo
        self.protocol = protocol
        self.orig = orig
        self.params = dict(params or {})


class LineFanout:
    """Feed decoded body chunks to Twisted ``IMessage``s, line by line.

    Only used for third-party ``IMessageDelivery`` avatars that do not
    provide ``ITransactionDelivery``.
    """

    def __init__(self, messages: Sequence[IMessageSMTP], received: bytes | None) -> None:
        self.messages = messages
        self._partial = b""
        if received:
            # Twisted passes its (folded) Received header as one line.
            for message in messages:
                message.lineReceived(received.removesuffix(b"\n"))

    @classmethod
    def open(cls, factories: Sequence[Callable], received: bytes | None) -> LineFanout:
        """Call every factory; if one fails, release the messages made so far."""
        messages = []
        try:
            for factory in factories:
                messages.append(factory())
            return cls(messages, received)
        except BaseException:
            for message in messages:
                message.connectionLost()
            raise

    def write(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            for message in self.messages:
                message.lineReceived(line)

    def eomReceived(self) -> defer.Deferred:
        return defer.gatherResults(
            [defer.maybeDeferred(m.eomReceived) for m in self.messages], consumeErrors=True
        ).addErrback(lambda f: f.value.subFailure)

    def connectionLost(self) -> None:
        for message in self.messages:
            message.connectionLost()
