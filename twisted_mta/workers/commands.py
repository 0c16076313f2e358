"""What the main process and its workers say to each other, over AMP.

From a worker to the main process: a connection asks for its slot
(``Acquire``) and gives it back (``Release``), so that the limits hold
over all workers; a message entered the queue (``Queued``); a TLS
handshake ended (``Handshake``), for the metrics; the worker serves
(``Serving``).  Both ways: an AUTH failure (``AuthFailed``), so that every
worker's throttle counts those of all.  From the main process: re-read the
config (``Reload``), serve a renewed certificate (``RenewCertificate``).

A notice needs no answer; a slot does (the greeting waits for it), and
a reload or a renewal (the main process logs it once all are done).
"""

from __future__ import annotations

from twisted.protocols import amp


class Acquire(amp.Command):
    """May a new connection of ``ip`` on ``listener`` be served?"""

    arguments = [(b"listener", amp.Unicode()), (b"ip", amp.Unicode())]
    response = [(b"allowed", amp.Boolean()), (b"stressed", amp.Boolean())]


class Release(amp.Command):
    """A connection that had its slot has closed."""

    arguments = [(b"listener", amp.Unicode()), (b"ip", amp.Unicode())]
    response = [(b"stressed", amp.Boolean())]


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
