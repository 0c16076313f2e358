"""The main process's side of the connection slots: every worker's,
counted against the limits.

A worker holds the slots of its open connections and, while the limits
are far off, a few free ones leased to it (the worker's side is
:mod:`twisted_mta.workers.leases`).  A slot that cannot be granted is
first looked for among the free ones the workers hold (``Reclaim``).  Free
slots count against the limits but not towards stress, whose changes
every worker is told (``Stress``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer

from twisted_mta.smtp.limits import ConnectionLimits
from twisted_mta.workers.commands import Reclaim, Stress

# Slots granted at once at most: the connection's, and free ones to keep.
LEASE = 4


class Holder(Protocol):
    """A worker as the ledger sees it: its number, and its channel (None
    while no process fills its place)."""

    number: int
    control: Any


@dataclass
class _Holding:
    # The slots a worker holds, in use or free, by address; how many of
    # them are free, as it last told.
    slots: Counter[str] = field(default_factory=Counter)
    unused: int = 0


class SlotLedger:
    """The slots ``holders`` hold, against ``limits``."""

    def __init__(self, limits: ConnectionLimits, holders: Sequence[Holder]) -> None:
        self.limits = limits
        self._holders = holders
        self._held = {holder.number: _Holding() for holder in holders}
        limits.on_stress = self._stress

    def acquire(self, holder: Holder, ip: str) -> int | defer.Deferred:
        """How many slots of ``ip`` ``holder`` is granted: none, or the
        connection's and maybe a few to keep.  Deferred when free slots
        are reclaimed from the workers first."""
        if self.limits.acquire(ip):
            return self._lease(holder, ip)
        d = self._reclaim(ip)
        return d.addCallback(lambda _: self._lease(holder, ip) if self.limits.acquire(ip) else 0)

    def give_back(self, holder: Holder, ip: str, count: int) -> None:
        """``holder`` gives back ``count`` free slots of ``ip``."""
        held = self._held[holder.number]
        self.set_unused(holder, max(held.unused - count, 0))
        self._release(holder, ip, count)

    def set_unused(self, holder: Holder, count: int) -> None:
        self._held[holder.number].unused = count
        self.limits.set_unused(sum(held.unused for held in self._held.values()))

    def forget(self, holder: Holder) -> None:
        """``holder``'s process is gone: every slot it held is free."""
        for ip, count in list(self._held[holder.number].slots.items()):
            self._release(holder, ip, count)
        self.set_unused(holder, 0)

    def greet(self, holder: Holder) -> None:
        """A worker starts serving: it learns of a stress under way."""
        if self.limits.stressed:
            holder.control.tell(Stress, stressed=True)

    def _lease(self, holder: Holder, ip: str) -> int:
        granted = 1
        while granted < LEASE and self._far_from_limits(ip) and self.limits.acquire(ip):
            granted += 1
        self._held[holder.number].slots[ip] += granted
        return granted

    def _far_from_limits(self, ip: str) -> bool:
        """Whether one slot more keeps ``ip`` and the total at half their
        limits at most: free slots are leased only then, so that they are
        seldom reclaimed."""
        limits = self.limits
        return (
            2 * (limits.total + 1) <= limits.max_total
            and 2 * (limits.per_ip.get(ip, 0) + 1) <= limits.max_per_ip
        )

    def _reclaim(self, ip: str) -> defer.Deferred:
        """Ask the workers for the free slots in the way of a connection of
        ``ip``: that address's, or every address's when the total is reached."""
        everyone = self.limits.total >= self.limits.max_total
        asked = []
        for holder in self._connected():
            slots = self._held[holder.number].slots
            if slots[ip] or (everyone and slots):
                d = holder.control.callRemote(Reclaim, ip="" if everyone else ip)
                d.addCallback(self._reclaimed, holder)
                asked.append(d.addErrback(lambda _: None))
        return defer.gatherResults(asked)

    def _reclaimed(self, answer: dict, holder: Holder) -> None:
        for returned in answer["returned"]:
            self.give_back(holder, returned["ip"], returned["count"])

    def _release(self, holder: Holder, ip: str, count: int) -> None:
        slots = self._held[holder.number].slots
        count = min(count, slots[ip])
        if count <= 0:
            return
        slots[ip] -= count
        if not slots[ip]:
            del slots[ip]
        for _ in range(count):
            self.limits.release(ip)

    def _stress(self, stressed: bool) -> None:
        for holder in self._connected():
            holder.control.tell(Stress, stressed=stressed)

    def _connected(self) -> list[Holder]:
        return [holder for holder in self._holders if holder.control is not None]
