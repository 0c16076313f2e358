"""Open relay sessions kept between messages, by destination.

A session that carried a message well is kept idle for ``IDLE_SECONDS``
(Postfix's ``smtp_connection_cache_time_limit`` is 2 s), so the next
message to the same destination skips the connection, the greeting, EHLO,
STARTTLS and AUTH.  Up to ``per_destination`` are kept for each one: as
many as the scheduler runs attempts to it at once, so that a steady
stream to one smart host reuses every connection rather than one.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

# How long an idle session is kept for the next message to its destination.
IDLE_SECONDS = 5.0


class Reusable(Protocol):
    """A session as the pool sees it."""

    @property
    def usable(self) -> bool:
        """Whether the connection can carry another message."""

    def close(self) -> defer.Deferred[None]:
        """QUIT, and close."""


class IdleSessions:
    """Idle sessions by destination key, the most recently used first."""

    def __init__(self, clock: IReactorTime, per_destination: int) -> None:
        self._clock = clock
        self._per_destination = per_destination
        self._idle: dict[str, list[tuple[Reusable, IDelayedCall]]] = {}

    def check_in(self, key: str, session: Reusable) -> None:
        """Keep ``session`` for the next message to ``key``, if it can
        carry one and there is room; close it otherwise."""
        if not session.usable or len(self._idle.get(key, ())) >= self._per_destination:
            session.close()
            return
        expiry = self._clock.callLater(IDLE_SECONDS, self._expire, key, session)
        self._idle.setdefault(key, []).append((session, expiry))

    def check_out(self, key: str) -> Reusable | None:
        """An idle session to ``key`` that can still be used, or None."""
        kept = self._idle.get(key, [])
        while kept:
            session, expiry = kept.pop()
            expiry.cancel()
            if session.usable:
                self._forget_if_empty(key)
                return session
            session.close()
        self._forget_if_empty(key)
        return None

    def close_all(self) -> defer.Deferred:
        """QUIT every idle session; fires once all are closed."""
        closing = []
        for kept in self._idle.values():
            for session, expiry in kept:
                expiry.cancel()
                closing.append(session.close())
        self._idle.clear()
        return defer.DeferredList(closing)

    def _expire(self, key: str, session: Reusable) -> None:
        kept = self._idle.get(key, [])
        self._idle[key] = [entry for entry in kept if entry[0] is not session]
        self._forget_if_empty(key)
        session.close()

    def _forget_if_empty(self, key: str) -> None:
        if not self._idle.get(key, True):
            del self._idle[key]
