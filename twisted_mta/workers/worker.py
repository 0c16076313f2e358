"""A worker process: SMTP on the sockets it was given, what it accepts
written by its own committer; what it cannot decide alone is asked of the
main process over its channel.

* Connection limits: a connection has its slot from the main process
  before its greeting (``leases.RemoteLimits``), so that ``max_connections``
  and ``max_connections_per_ip`` hold over all workers.  Slots are leased,
  so that a busy client's next connections need no round trip; the main
  process also says when the server comes under stress.
* AUTH throttling: each worker runs its own ``AuthThrottle`` (its answer
  delays, its blocks, its pool of checks), and every failure found by one
  is counted by all the others, through the main process.
* Policies: what one tells its peers (``ChannelPeers``) reaches the same
  policy in every other worker, through the main process.
* The queue: each message queued is told to the main process, whose
  scheduler tries it at once.
* Metrics: ``ReportingSessions`` tells the main process the connections
  made and open, a few times a second at most, and each TLS handshake.
* The log: every event goes to standard output as one line of JSON, for
  the main process to emit again.

SIGTERM drains this worker as it drains a single process (twisted's
reactor stops, and the service's stop lets DATA finish); SIGHUP is the
main process's: it asks its workers to reload over the channel.  A worker
whose main process has gone (its channel closed) stops too.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence

from twisted.cred import strcred
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, eventAsJSON, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta.auth.throttle import AuthThrottle
from twisted_mta.config import Config, ConfigError, load_config
from twisted_mta.front import PortService, SMTPService
from twisted_mta.intake.policies import PluginError
from twisted_mta.interfaces import IPolicyPeers
from twisted_mta.smtp.limits import Sessions
from twisted_mta.workers.commands import (
    AuthFailed,
    Handshake,
    PolicyEvent,
    Queued,
    QuietAMP,
    Reclaim,
    Reload,
    RenewCertificate,
    Serving,
    Stress,
    Tally,
)
from twisted_mta.workers.leases import Coalesced, RemoteLimits
from twisted_mta.workers.supervisor import CONTROL_FD, GivenProtocol, ListeningSocket

_PR_SET_PDEATHSIG = 1

_log = Logger()


class MainChannel(QuietAMP):
    """A worker's end of its channel to the main process."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        super().__init__()
        self.stressed = False
        # Those of the worker's server, once it is made.
        self.throttle: AuthThrottle | None = None
        self.reread: Callable[[], object] | None = None
        self.renew_certificate: Callable[[], None] | None = None
        self.limits: RemoteLimits | None = None
        self.peers = ChannelPeers(self)
        self._on_lost = on_lost

    def queued(self, queue_id: str) -> None:
        self.tell(Queued, queue_id=queue_id)

    def auth_failed(self, ip: str, when: float) -> None:
        self.tell(AuthFailed, ip=ip, when=when)

    def handshake(self, listener: str, completed: bool) -> None:
        self.tell(Handshake, listener=listener, completed=completed)

    @PolicyEvent.responder
    def policy_event(self, topic: str, payload: str) -> dict:
        self.peers.heard(topic, payload)
        return {}

    @Reclaim.responder
    def reclaim(self, ip: str) -> dict:
        returned = [] if self.limits is None else self.limits.reclaim(ip)
        return {"returned": [{"ip": each, "count": count} for each, count in returned]}

    @Stress.responder
    def stress(self, stressed: bool) -> dict:
        self.stressed = stressed
        return {}

    @Reload.responder
    def reload(self) -> dict:
        if self.reread is not None:
            self.reread()
        return {}

    @RenewCertificate.responder
    def renew(self) -> dict:
        if self.renew_certificate is not None:
            self.renew_certificate()
        return {}

    @AuthFailed.responder
    def failed_elsewhere(self, ip: str, when: float) -> dict:
        if self.throttle is not None:
            self.throttle.failed_elsewhere(ip, when)
        return {}

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._on_lost()


@implementer(IPolicyPeers)
class ChannelPeers:
    """The other workers, as this worker's policies reach them: through the
    main process, which passes on what one tells to all the others."""

    def __init__(self, channel: MainChannel) -> None:
        self._channel = channel
        self._listeners: dict[str, Callable[[str], None]] = {}

    def tell(self, topic: str, payload: str) -> None:
        self._channel.tell(PolicyEvent, topic=topic, payload=payload)

    def listen(self, topic: str, heard: Callable[[str], None]) -> None:
        self._listeners[topic] = heard

    def heard(self, topic: str, payload: str) -> None:
        listener = self._listeners.get(topic)
        if listener is not None:
            listener(payload)


class ReportingSessions(Sessions):
    """The sessions of a worker, whose connections and TLS handshakes the
    main process counts.  Connections are told in one tally at most every
    ``TALLY_DELAY``: the metrics need no message per connection."""

    def __init__(self, channel: MainChannel, clock: IReactorTime) -> None:
        super().__init__()
        self._channel = channel
        self._told_made: Counter[str] = Counter()
        self._told_open: Counter[str] = Counter()
        self._changed = Coalesced(clock, self._tell).changed

    def add(self, server) -> None:
        super().add(server)
        self._changed()

    def remove(self, server) -> None:
        super().remove(server)
        self._changed()

    def _tell(self) -> None:
        made, open_now = self.connections.copy(), self.open_by_listener()
        for listener in set(made) | set(self._told_open):
            new = made[listener] - self._told_made[listener]
            if new or open_now[listener] != self._told_open[listener]:
                self._channel.tell(Tally, listener=listener, made=new, open=open_now[listener])
        self._told_made, self._told_open = made, open_now

    def handshake_completed(self, listener: str) -> None:
        super().handshake_completed(listener)
        self._channel.handshake(listener, True)

    def handshake_failed(self, listener: str) -> None:
        super().handshake_failed(listener)
        self._channel.handshake(listener, False)


class AdoptedListener(PortService):
    """Accept on a listening socket bound by the main process."""

    def __init__(self, given: ListeningSocket, factory: protocol.Factory) -> None:
        self.given = given
        self.factory = factory

    def startService(self) -> None:
        super().startService()
        self.port = reactor.adoptStreamPort(self.given.fd, self.given.family, self.factory)
        # The port holds its own copy of the socket.
        os.close(self.given.fd)


class WorkerService(SMTPService):
    """The SMTP side of the server, on sockets given, with limits, queue
    and part of the throttle behind the channel."""

    # The main process watches it, and tells every worker at once.
    watches_certificate = False

    def __init__(
        self,
        config: Config,
        checkers: Sequence,
        sockets: Sequence[ListeningSocket],
        channel: MainChannel,
    ) -> None:
        self.peers = channel.peers
        super().__init__(config, checkers, ReportingSessions(channel, reactor))
        self.channel = channel
        self.limits = RemoteLimits(channel, reactor)
        channel.throttle = self.throttle
        channel.reread = self.reread
        channel.renew_certificate = self.renew_certificate
        self.throttle.on_failure = channel.auth_failed
        self.spool.on_queued = channel.queued
        for given in sockets:
            self.add_listener(
                given.kind,
                self.limits,
                lambda factory, given=given: AdoptedListener(given, factory),
            )

    def startService(self) -> None:
        super().startService()
        self.limits.start()
        self.channel.tell(Serving, pid=os.getpid())

    def stopService(self) -> defer.Deferred:
        self.limits.stop()
        d = self.stop_listening()
        d.addCallback(self.drain)
        return d.addBoth(self.stop_committer)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m twisted_mta.workers``: as the main process spawns it."""
    options = _parse(argv)
    _die_with_parent()
    # The main process's signal: it asks its workers over the channel.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _log_to_main_process()
    try:
        config = load_config(options.config, {})
        checkers = [strcred.makeChecker(description) for description in options.auth]
    except ConfigError as error:
        raise SystemExit(f"twistd mta: worker: {error}") from None
    channel = MainChannel(_stop)
    reactor.adoptStreamConnection(CONTROL_FD, socket.AF_UNIX, GivenProtocol(channel))
    os.close(CONTROL_FD)
    try:
        server = WorkerService(config, checkers, options.listener, channel)
    except PluginError as error:
        raise SystemExit(f"twistd mta: worker: {error}") from None
    status: list[int] = []
    reactor.callWhenRunning(_serve, server, status)
    reactor.run()
    sys.exit(status[0] if status else 0)


def _serve(server: WorkerService, status: list[int]) -> None:
    try:
        server.startService()
    except SystemExit as stop:
        _log.info("{reason}", reason=str(stop))
        status.append(1)
        reactor.stop()
        return
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)


def _stop() -> None:
    if reactor.running:
        reactor.stop()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m twisted_mta.workers")
    parser.add_argument("--config")
    parser.add_argument("--auth", action="append", default=[])
    parser.add_argument("--listener", action="append", default=[], type=_listening_socket)
    return parser.parse_args(argv)


def _listening_socket(text: str) -> ListeningSocket:
    """``KIND:FD:FAMILY``."""
    kind, fd, family = text.split(":")
    return ListeningSocket(kind, int(fd), int(family))


def _die_with_parent() -> None:
    """Be killed with the main process, as one process was before: a main
    process killed (SIGKILL) cannot stop its workers itself."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # Not Linux: the channel's close stops the worker instead.


def _log_to_main_process() -> None:
    """Each event as one line on standard output.

    Events come from threads (the committer's) and from signal handlers,
    which may interrupt a write under way: a line is queued, and written
    by whoever holds the lock, never by waiting for it, so lines stay
    whole and in order, and a handler never waits for the frame it
    interrupted.
    """
    pending: deque[bytes] = deque()
    writing = threading.Lock()
    fd = sys.stdout.fileno()

    def forward(event: dict) -> None:
        pending.append((eventAsJSON(event) + "\n").encode("utf-8"))
        while pending and writing.acquire(blocking=False):
            try:
                while pending:
                    _write_all(fd, pending.popleft())
            finally:
                writing.release()

    globalLogBeginner.beginLoggingTo([forward], redirectStandardIO=False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
