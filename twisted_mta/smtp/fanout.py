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

    def __init__(self, messages: Sequence[IMessageSMTP]) -> None:
        self.messages = messages
        self._partial = b""

    @classmethod
    def open(
        cls,
        recipients: Sequence[tuple[RcptUser, Callable[[], IMessageSMTP]]],
        received: Callable[[RcptUser], bytes | None],
    ) -> LineFanout:
        """Make each recipient's message and give it its own Received header.

        ``recipients`` are the ``(user, factory)`` pairs of ``validateTo``;
        ``received`` the header for one of them (Twisted's
        ``receivedHeader(helo, origin, [user])``), asked for in turn after
        each factory, as Twisted's server does.  If anything fails, the
        messages made so far are released.
        """
        messages = []
        try:
            for user, factory in recipients:
                message = factory()
                messages.append(message)
                header = received(user)
                if header:
                    # Twisted passes its (folded) Received header as one line.
                    message.lineReceived(header.removesuffix(b"\n"))
            return cls(messages)
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
