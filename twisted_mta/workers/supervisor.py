"""The main process's side: spawning the workers, restarting them, and
answering them.

A worker is ``python -m twisted_mta.workers``, spawned once the reactor
runs (after the privilege drop: it runs as the run user), with these
file descriptors:

* 1: its log, one event a line as JSON (``eventAsJSON``), emitted here
  again with ``log_system`` naming the worker: one log, one metrics
  observer, one file for twistd to rotate;
* 2: our standard error, for what a worker says before its log is set up;
* 3: its end of the control socket pair, spoken in AMP (``commands``);
* 4 onwards: the listening sockets, in the order of ``--listener`` options.

The connection limits are counted here, over every worker, in slots a
worker holds (``ledger.SlotLedger``).

A worker that ends is restarted: at once if it ran for a while, after a
growing pause (up to ``MAX_BACKOFF``) if it keeps dying as it starts.  Its
connection slots are given back, and the queue folder is read again: what
it acknowledged (250 after fsync) but had not told of yet is found there.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure

from twisted_mta.smtp.limits import ConnectionLimits
from twisted_mta.workers.commands import (
    Acquire,
    AuthFailed,
    Handshake,
    PolicyEvent,
    Queued,
    QuietAMP,
    Release,
    Reload,
    RenewCertificate,
    Serving,
    Tally,
    Unused,
)
from twisted_mta.workers.ledger import SlotLedger

CONTROL_FD = 3
FIRST_LISTENER_FD = 4
# A worker that ends sooner than this after its start waits before the next.
QUICK_DEATH = 10.0
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
# After shutdown_timeout, workers get this long to end before SIGKILL.
KILL_GRACE = 10.0

_log = Logger()


@dataclass(frozen=True)
class ListeningSocket:
    """A bound socket the workers accept on: its listener kind, its file
    descriptor here, its address family."""

    kind: str
    fd: int
    family: int


class Tallies:
    """The sessions of all workers as the metrics read them, from what the
    workers tell: connections made and open, TLS handshakes."""

    def __init__(self) -> None:
        self.connections: Counter[str] = Counter()
        self.tls_handshakes: Counter[str] = Counter()
        self.tls_failures: Counter[str] = Counter()
        self._open: dict[int, Counter[str]] = {}

    def open_by_listener(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for each in self._open.values():
            total.update(each)
        return +total

    def counted(self, worker: int, listener: str, made: int, open_now: int) -> None:
        self.connections[listener] += made
        self._open.setdefault(worker, Counter())[listener] = open_now

    def forget(self, worker: int) -> None:
        """A worker ended: its connections are closed."""
        self._open.pop(worker, None)


@dataclass
class _Worker:
    """One place in the pool, filled by one process after another."""

    number: int
    process: object | None = None
    control: ControlProtocol | None = None
    pid: int | None = None
    started: float = 0.0
    backoff: float = 0.0
    serving: bool = False
    ended: defer.Deferred | None = None

    @property
    def system(self) -> str:
        return f"worker-{self.number}"


class WorkerPool:
    """``count`` worker processes serving ``sockets``, kept running."""

    def __init__(
        self,
        count: int,
        arguments: Sequence[str],
        limits: ConnectionLimits,
        queued: Callable[[str], None],
        lost: Callable[[], None],
        clock: IReactorProcess,
    ) -> None:
        self.limits = limits
        self.tallies = Tallies()
        self._arguments = list(arguments)
        self._queued = queued
        self._lost = lost
        self._clock = clock
        self.workers = [_Worker(number) for number in range(1, count + 1)]
        self.slots = SlotLedger(limits, self.workers)
        self._sockets: list[ListeningSocket] = []
        self._running = False
        self._all_serving: defer.Deferred | None = None
        self._restarts: dict[int, object] = {}

    # -- start and restart ---------------------------------------------------

    def start(self, sockets: Sequence[ListeningSocket]) -> defer.Deferred:
        """Spawn every worker; fires once each one serves."""
        self._sockets = list(sockets)
        self._running = True
        self._all_serving = defer.Deferred()
        for worker in self.workers:
            self._spawn(worker)
        return self._all_serving

    def _spawn(self, worker: _Worker) -> None:
        self._restarts.pop(worker.number, None)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: dict[int, object] = {0: "w", 1: "r", 2: 2, CONTROL_FD: theirs.fileno()}
        arguments = [sys.executable, "-m", "twisted_mta.workers"]
        for offset, listening in enumerate(self._sockets):
            fd = FIRST_LISTENER_FD + offset
            child_fds[fd] = listening.fd
            arguments.append(f"--listener={listening.kind}:{fd}:{listening.family}")
        arguments.extend(self._arguments)
        worker.ended = defer.Deferred()
        worker.started = self._clock.seconds()
        worker.process = self._clock.spawnProcess(
            _WorkerProcess(self, worker),
            sys.executable,
            arguments,
            env=os.environ.copy(),
            childFDs=child_fds,
        )
        worker.pid = worker.process.pid
        theirs.close()
        worker.control = ControlProtocol(self, worker)
        factory = GivenProtocol(worker.control)
        self._clock.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        ours.close()

    def serving(self, worker: _Worker, pid: int) -> None:
        worker.serving = True
        self.slots.greet(worker)
        _log.info("worker {number} serving: pid {pid}", number=worker.number, pid=pid)
        if self._all_serving is not None and all(each.serving for each in self.workers):
            d, self._all_serving = self._all_serving, None
            d.callback(None)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        """A worker process is gone: give back what it held, look for
        what it queued, and start another unless we are stopping."""
        worker.process = worker.control = None
        worker.serving = False
        self.slots.forget(worker)
        self.tallies.forget(worker.number)
        how = _how_it_ended(reason)
        ended, worker.ended = worker.ended, None
        if not self._running:
            _log.info("worker {number} (pid {pid}) {how}", number=worker.number,
                      pid=worker.pid, how=how)
            ended.callback(None)
            return
        self._lost()
        delay = self._next_delay(worker)
        _log.info(
            "worker {number} (pid {pid}) {how}; restarting it in {delay:g} s",
            number=worker.number, pid=worker.pid, how=how, delay=delay,
        )
        self._restarts[worker.number] = self._clock.callLater(delay, self._spawn, worker)
        ended.callback(None)

    def _next_delay(self, worker: _Worker) -> float:
        if self._clock.seconds() - worker.started >= QUICK_DEATH:
            worker.backoff = 0.0
        else:
            worker.backoff = min(max(FIRST_BACKOFF, worker.backoff * 2), MAX_BACKOFF)
        return worker.backoff

    # -- what workers ask and tell -------------------------------------------

    def tally(self, worker: _Worker, listener: str, made: int, open_now: int) -> None:
        self.tallies.counted(worker.number, listener, made, open_now)

    def handshake(self, listener: str, completed: bool) -> None:
        tally = self.tallies.tls_handshakes if completed else self.tallies.tls_failures
        tally[listener] += 1

    def queued(self, queue_id: str) -> None:
        self._queued(queue_id)

    def auth_failed(self, source: _Worker, ip: str, when: float) -> None:
        """Every other worker's throttle counts it too."""
        for worker in self._connected():
            if worker is not source:
                worker.control.callRemote(AuthFailed, ip=ip, when=when)

    def policy_event(self, source: _Worker, topic: str, payload: str) -> None:
        """The same policy in every other worker hears it."""
        for worker in self._connected():
            if worker is not source:
                worker.control.tell(PolicyEvent, topic=topic, payload=payload)

    def _connected(self) -> list[_Worker]:
        return [worker for worker in self.workers if worker.control is not None]

    # -- SIGHUP and SIGTERM --------------------------------------------------

    def reload(self) -> defer.Deferred:
        """Every worker re-reads the config; fires once all have."""
        return self._ask_all(Reload)

    def renew_certificate(self) -> defer.Deferred:
        """Every worker serves the certificate on disk; fires once all do."""
        return self._ask_all(RenewCertificate)

    def _ask_all(self, command: type[amp.Command]) -> defer.Deferred:
        # A worker that ends meanwhile reads the files anew when restarted.
        asked = [
            worker.control.callRemote(command).addErrback(lambda _: None)
            for worker in self._connected()
        ]
        return defer.gatherResults(asked)

    def stop(self, shutdown_timeout: float) -> defer.Deferred:
        """SIGTERM to every worker: each drains its sessions and ends.
        Fires once all have ended; one still there after
        ``shutdown_timeout`` and a grace is killed."""
        self._running = False
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        ends = [worker.ended for worker in self.workers if worker.ended is not None]
        for worker in self.workers:
            _signal(worker, "TERM")
        kill = self._clock.callLater(shutdown_timeout + KILL_GRACE, self._kill_all)
        d = defer.gatherResults(ends)
        return d.addBoth(_cancel_and_pass, kill)

    def _kill_all(self) -> None:
        for worker in self.workers:
            _signal(worker, "KILL")


class ControlProtocol(QuietAMP):
    """The main process's end of one worker's channel."""

    def __init__(self, pool: WorkerPool, worker: _Worker) -> None:
        super().__init__()
        self._pool = pool
        self._worker = worker

    @Acquire.responder
    def acquire(self, ip: str) -> dict | defer.Deferred:
        granted = self._pool.slots.acquire(self._worker, ip)
        if isinstance(granted, defer.Deferred):
            return granted.addCallback(lambda count: {"granted": count})
        return {"granted": granted}

    @Release.responder
    def release(self, ip: str, count: int) -> dict:
        self._pool.slots.give_back(self._worker, ip, count)
        return {}

    @Unused.responder
    def unused(self, count: int) -> dict:
        self._pool.slots.set_unused(self._worker, count)
        return {}

    @Tally.responder
    def tally(self, listener: str, made: int, open: int) -> dict:  # noqa: A002
        self._pool.tally(self._worker, listener, made, open)
        return {}

    @Queued.responder
    def queued(self, queue_id: str) -> dict:
        self._pool.queued(queue_id)
        return {}

    @Handshake.responder
    def handshake(self, listener: str, completed: bool) -> dict:
        self._pool.handshake(listener, completed)
        return {}

    @AuthFailed.responder
    def auth_failed(self, ip: str, when: float) -> dict:
        self._pool.auth_failed(self._worker, ip, when)
        return {}

    @PolicyEvent.responder
    def policy_event(self, topic: str, payload: str) -> dict:
        self._pool.policy_event(self._worker, topic, payload)
        return {}

    @Serving.responder
    def serving(self, pid: int) -> dict:
        self._pool.serving(self._worker, pid)
        return {}


class _WorkerProcess(protocol.ProcessProtocol):
    """A worker process: its log lines, and its end."""

    def __init__(self, pool: WorkerPool, worker: _Worker) -> None:
        self._pool = pool
        self._worker = worker
        self._partial = b""

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            reemit(line, self._worker.system)

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            reemit(self._partial, self._worker.system)
        self._pool.ended(self._worker, reason)


def reemit(line: bytes, system: str) -> None:
    """A worker's log line, as the event it logged; what is not an event
    (a worker's own output) is logged as it is."""
    text = line.decode("utf-8", "replace")
    if not text.strip():
        return
    try:
        event = eventFromJSON(text)
    except ValueError:
        _log.info("{text}", text=text, log_system=system)
        return
    event["log_system"] = system
    globalLogPublisher(event)


class GivenProtocol(protocol.Factory):
    """A factory for one connection made already: its protocol is given."""

    def __init__(self, given: protocol.Protocol) -> None:
        self._given = given

    def buildProtocol(self, addr) -> protocol.Protocol:
        return self._given


def _signal(worker: _Worker, name: str) -> None:
    if worker.process is None:
        return
    try:
        worker.process.signalProcess(name)
    except error.ProcessExitedAlready:
        pass


def _how_it_ended(reason: Failure) -> str:
    ended = reason.value
    if getattr(ended, "signal", None):
        return f"killed by signal {ended.signal}"
    return f"exited with status {getattr(ended, 'exitCode', None)}"


def _cancel_and_pass(result, call):
    if call.active():
        call.cancel()
    return result
