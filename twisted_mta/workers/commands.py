"""What the main process and its workers say to each other, over AMP.

From a worker to the main process: connection slots are asked for
(``Acquire``) and given back (``Release``), and how many it holds free
(``Unused``), so that the limits hold over all workers; the worker's
connections made and open (``Tally``) and its TLS handshakes
(``Handshake``), for the metrics; a message entered the queue
(``Queued``); the worker serves (``Serving``).  Both ways: an AUTH
failure (``AuthFailed``), so that every worker's throttle counts those of
all, and what a policy tells its peers (``PolicyEvent``), so that its
limits hold over all.  From the main process: give back free slots
(``Reclaim``), the stress state changed (``Stress``), re-read the config
(``Reload``), serve a renewed certificate (``RenewCertificate``).

A notice needs no answer; a slot does (the greeting waits for it), and so
do a reclaim (the slot waits for it), a reload or a renewal (the main
process logs it once all are done).
"""

from __future__ import annotations

from twisted.protocols import amp


class Acquire(amp.Command):
    """May a new connection of ``ip`` be served?  ``granted`` slots: none,
    or the connection's and as many more for the worker to keep free for
    the address's next connections."""

    arguments = [(b"ip", amp.Unicode())]
    response = [(b"granted", amp.Integer())]


class Release(amp.Command):
    """``count`` slots of ``ip`` that the worker held are free again."""

    arguments = [(b"ip", amp.Unicode()), (b"count", amp.Integer())]
    requiresAnswer = False


class Reclaim(amp.Command):
    """Give back the free slots of ``ip`` (of every address when empty):
    a connection elsewhere needs them."""

    arguments = [(b"ip", amp.Unicode())]
    response = [
        (b"returned", amp.AmpList([(b"ip", amp.Unicode()), (b"count", amp.Integer())]))
    ]


class Unused(amp.Command):
    """The worker holds ``count`` free slots in all: they count against the
    limits, not towards stress."""

    arguments = [(b"count", amp.Integer())]
    requiresAnswer = False


class Stress(amp.Command):
    """The server is under stress now, or no longer."""

    arguments = [(b"stressed", amp.Boolean())]
    requiresAnswer = False


class Tally(amp.Command):
    """``made`` connections more on ``listener`` since the last tally, and
    ``open`` open now."""

    arguments = [
        (b"listener", amp.Unicode()),
        (b"made", amp.Integer()),
        (b"open", amp.Integer()),
    ]
    requiresAnswer = False


class Queued(amp.Command):
    """A message entered the queue: the scheduler may try it at once."""

    arguments = [(b"queue_id", amp.Unicode())]
    requiresAnswer = False


class Handshake(amp.Command):
    """A TLS handshake on ``listener`` completed, or the session closed
    before it did."""

    arguments = [(b"listener", amp.Unicode()), (b"completed", amp.Boolean())]
    requiresAnswer = False


class AuthFailed(amp.Command):
    """An AUTH attempt of ``ip`` failed at ``when`` (seconds since the epoch)."""

    arguments = [(b"ip", amp.Unicode()), (b"when", amp.Float())]
    requiresAnswer = False


class PolicyEvent(amp.Command):
    """A policy told its peers ``payload`` on ``topic`` (``IPolicyPeers``)."""

    arguments = [(b"topic", amp.Unicode()), (b"payload", amp.Unicode())]
    requiresAnswer = False


class Serving(amp.Command):
    """The worker accepts connections on every listener."""

    arguments = [(b"pid", amp.Integer())]
    requiresAnswer = False


class Reload(amp.Command):
    """Re-read the config, as the main process did at its SIGHUP; the
    answer says it is done."""

    arguments: list = []


class RenewCertificate(amp.Command):
    """Serve the certificate on disk: the main process saw it renewed."""

    arguments: list = []


class QuietAMP(amp.AMP):
    """AMP without a log line at each connection and loss: a worker's
    start and end are logged once, by the main process."""

    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    def tell(self, command: type[amp.Command], **arguments) -> None:
        """A notice, unless the other end is gone: there is no one to tell."""
        if self.transport is not None:
            self.callRemote(command, **arguments)
