"""Which queued messages may be worked on now, and which wait.

At most ``max_concurrent`` attempts and reads run at once, and at most
``per_destination`` attempts to one destination.  A message that finds no
slot waits: for its destination's, or for any (``None``) when all are
taken.  When a slot frees, the messages waiting for it are released, the
longest waiting first, one a slot: a message released for its
destination holds that slot while it is read again, so that nothing else
takes it meanwhile.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from typing import Protocol


class Concurrency(Protocol):
    """How many may run: in all, and to one destination."""

    max_concurrent: int
    per_destination: int


@dataclass
class Slots:
    """The slots of the scheduler's attempts and reads, by the limits of
    ``limits()``: the policy in force, which a reload may replace."""

    limits: Callable[[], Concurrency]
    # Attempts running, by destination, and in all.
    _running: Counter = field(default_factory=Counter)
    _total: int = 0
    # Messages being read for an attempt: each holds a slot meanwhile.
    _loading: set[str] = field(default_factory=set)
    # Messages waiting, by destination (None: for any slot), oldest first.
    _waiting: dict[str | None, dict[str, None]] = field(default_factory=dict)
    # Released messages being read, holding their destination's slot:
    # message -> destination, and how many by destination.
    _released: dict[str, str] = field(default_factory=dict)
    _reserved: Counter = field(default_factory=Counter)

    def busy(self) -> int:
        """Attempts and reads under way."""
        return self._total + len(self._loading)

    def capacity(self) -> int:
        """How many more attempts and reads may start."""
        return self.limits().max_concurrent - self.busy()

    def full(self) -> bool:
        return self.capacity() <= 0

    def has_slot(self, destination: str) -> bool:
        """Whether one more attempt to ``destination`` may run."""
        taken = self._running[destination] + self._reserved[destination]
        return taken < self.limits().per_destination

    def loading(self, queue_id: str) -> bool:
        return queue_id in self._loading

    def start_read(self, queue_id: str) -> None:
        self._loading.add(queue_id)

    def read_done(self, queue_id: str) -> None:
        """The read is over: its slot, and the one it was released for,
        are free."""
        self._loading.discard(queue_id)
        destination = self._released.pop(queue_id, None)
        if destination is not None:
            self._reserved[destination] -= 1

    def wait(self, queue_id: str, destination: str | None) -> None:
        self._waiting.setdefault(destination, {})[queue_id] = None

    def start_attempt(self, queue_id: str, destination: str) -> None:
        # Tried by another way (a rescan): no longer waiting there.
        self._waiting.get(destination, {}).pop(queue_id, None)
        self._running[destination] += 1
        self._total += 1

    def end_attempt(self, destination: str) -> None:
        self._running[destination] -= 1
        self._total -= 1

    def release(self, skip: Container[str]) -> Iterator[str]:
        """The waiting messages to read again now, one for each free slot,
        the longest waiting first; each is no longer waiting anywhere.  A
        message in ``skip`` (being finished) or being read already is let go
        without taking a slot.  The caller starts each one's read before
        asking for the next."""
        for destination in list(self._waiting):
            waiting = self._waiting.get(destination, {})
            while waiting and self._slot_free(destination):
                queue_id = next(iter(waiting))
                for each in self._waiting.values():
                    each.pop(queue_id, None)
                if queue_id in self._loading or queue_id in skip:
                    continue  # already being read (it waits again if it must), or done
                if destination is not None:
                    self._released[queue_id] = destination
                    self._reserved[destination] += 1
                yield queue_id
            if not self._waiting.get(destination, True):
                del self._waiting[destination]

    def _slot_free(self, destination: str | None) -> bool:
        if self.full():
            return False
        return destination is None or self.has_slot(destination)
