"""A worker's side of the connection slots: the limits, kept by the main
process for all workers, as this worker's sessions see them.

Slots are leased (see :class:`RemoteLimits`); the main process's side is
:mod:`twisted_mta.workers.ledger`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.protocols import amp

from twisted_mta.workers.commands import Acquire, Release, Unused

# Free slots of an address not used since the last sweep are given back.
SWEEP_INTERVAL = 1.0
# Counts the main process reads (slots held free, connections) are told at
# most this long after they change.
TALLY_DELAY = 0.2


class Coalesced:
    """``tell()`` once, ``TALLY_DELAY`` after the first of any number of
    changes: counts that change at every connection cost one notice a
    window."""

    def __init__(self, clock: IReactorTime, tell: Callable[[], None]) -> None:
        self._clock = clock
        self._tell = tell
        self._pending = None

    def changed(self) -> None:
        if self._pending is None:
            self._pending = self._clock.callLater(TALLY_DELAY, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self._tell()


class Channel(Protocol):
    """The worker's channel to the main process, as the limits use it."""

    stressed: bool
    limits: Any

    def callRemote(self, command: type[amp.Command], **arguments: Any) -> defer.Deferred: ...

    def tell(self, command: type[amp.Command], **arguments: Any) -> None: ...


@dataclass
class _Lease:
    """The slots of one address that this worker holds."""

    in_use: int = 0
    free: int = 0
    # Free slots the main process lets this worker keep for the address.
    keep: int = 0


class RemoteLimits:
    """The connection limits, kept by the main process for all workers,
    as this worker's sessions see them.

    Slots are leased: while the limits are far off, the main process
    grants a few more than the one asked for, and a closed connection's
    slot is kept, so that the next connections of a busy client are served
    without a round trip.  A free slot goes back to the main process when
    the lease shrinks, once its address has been idle for a sweep, or at
    once when a connection elsewhere needs it (``reclaim``): a client is
    refused only when the connections it has open reach a limit.
    """

    def __init__(self, channel: Channel, clock: IReactorTime) -> None:
        self._channel = channel
        self._leases: dict[str, _Lease] = {}
        self._used: set[str] = set()
        self._sweeps = task.LoopingCall(self.sweep)
        self._sweeps.clock = clock
        self._told_free = 0
        self._free_changed = Coalesced(clock, self._tell_free).changed
        channel.limits = self

    @property
    def stressed(self) -> bool:
        return self._channel.stressed

    def start(self) -> None:
        self._sweeps.start(SWEEP_INTERVAL, now=False)

    def stop(self) -> None:
        if self._sweeps.running:
            self._sweeps.stop()

    def acquire(self, ip: str) -> bool | defer.Deferred:
        """Whether a connection of ``ip`` may be served, or a Deferred
        firing with it once the main process has answered."""
        lease = self._leases.get(ip)
        if lease is not None and lease.free:
            lease.free -= 1
            self._use(ip, lease)
            self._free_changed()
            return True
        d = self._channel.callRemote(Acquire, ip=ip)
        return d.addCallback(self._granted, ip)

    def _granted(self, answer: dict, ip: str) -> bool:
        granted = answer["granted"]
        if not granted:
            return False
        lease = self._leases.setdefault(ip, _Lease())
        lease.free += granted - 1
        # A slot granted alone (near the limits) goes back once free.
        lease.keep = granted if granted > 1 else 0
        self._use(ip, lease)
        self._trim(ip, lease)
        self._free_changed()
        return True

    def _use(self, ip: str, lease: _Lease) -> None:
        lease.in_use += 1
        self._used.add(ip)

    def release(self, ip: str) -> None:
        lease = self._leases[ip]
        lease.in_use -= 1
        lease.free += 1
        self._trim(ip, lease)
        self._free_changed()

    def sweep(self) -> None:
        """Give back the free slots of every address unused since the
        last sweep."""
        for ip, lease in list(self._leases.items()):
            if ip not in self._used:
                lease.keep = 0
                self._trim(ip, lease)
        self._used.clear()
        self._free_changed()

    def reclaim(self, ip: str) -> list[tuple[str, int]]:
        """Give up the free slots of ``ip``, or of every address if it is
        empty; the slots given up, by address."""
        returned = []
        for each in [ip] if ip else list(self._leases):
            lease = self._leases.get(each)
            if lease is None:
                continue
            if lease.free:
                returned.append((each, lease.free))
            lease.free = lease.keep = 0
            self._forget_if_unused(each, lease)
        self._free_changed()
        return returned

    def _tell_free(self) -> None:
        """How many free slots this worker holds: stress counts only slots
        in use."""
        free = sum(lease.free for lease in self._leases.values())
        if free != self._told_free:
            self._told_free = free
            self._channel.tell(Unused, count=free)

    def _trim(self, ip: str, lease: _Lease) -> None:
        excess = lease.free - lease.keep
        if excess > 0:
            lease.free -= excess
            self._channel.tell(Release, ip=ip, count=excess)
        self._forget_if_unused(ip, lease)

    def _forget_if_unused(self, ip: str, lease: _Lease) -> None:
        if not lease.in_use and not lease.free:
            del self._leases[ip]
