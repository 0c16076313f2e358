"""Limit how many messages a user, or a client address, sends per window.

A stolen password or a compromised host shows first as a burst of mail;
a limit per authenticated user and per unauthenticated client address
caps the damage, and a temporary refusal lets an honest client, whose
queue simply retries later, through once the window moves on.

Each message is counted when the whole of it was received (the
``message`` hook), so transactions that end in a refusal or a RSET cost
nothing; the next ``MAIL`` is refused once the last ``window`` seconds
hold the limit.  The window slides: it is the time of the accepted
messages themselves that is kept, at most ``limit`` of them per key, and
a key idle for a whole window is forgotten.  With worker processes, each
message counted is told to the other workers (``PolicyContext.peers``),
which count it too, so a limit holds over all of them.  Options and
replies are described in ``docs/plugins/ratelimit.md``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta.durations import option_seconds
from twisted_mta.interfaces import (
    IMailPolicy,
    MessageInfo,
    PolicyContext,
    SessionInfo,
    TransactionInfo,
    Verdict,
    address_in,
)
from twisted_mta.policies import BuiltinFactory

OPTIONS = ("per_user", "per_address", "window")
# What the workers tell each other: "user KEY" or "client KEY".
TOPIC = "ratelimit"
DEFAULT_WINDOW = "1h"
_log = Logger()


def parse_limit(value: Any, key: str) -> int:
    """A message count; 0 means no limit."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key}: expected a number of messages (0 for no limit), not {value!r}")
    return value


class SlidingCounter:
    """The times of the last ``limit`` events of each key, for the last
    ``window`` seconds."""

    def __init__(self, limit: int, window: float, clock: Any) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._times: dict[str, deque[float]] = {}
        self._next_sweep = clock.seconds() + window

    def full(self, key: str) -> bool:
        """Whether ``key`` had ``limit`` events in the last window."""
        times = self._times.get(key)
        if times is None:
            return False
        since = self.clock.seconds() - self.window
        while times and times[0] <= since:
            times.popleft()
        return len(times) >= self.limit

    def add(self, key: str) -> None:
        now = self.clock.seconds()
        times = self._times.get(key)
        if times is None:
            # Only the newest ``limit`` times can decide whether it is full.
            times = self._times[key] = deque(maxlen=self.limit)
        times.append(now)
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Forget the keys with no event in the last window."""
        since = now - self.window
        for key in [key for key, times in self._times.items() if times[-1] <= since]:
            del self._times[key]
        self._next_sweep = now + self.window

    def __len__(self) -> int:
        return len(self._times)


@implementer(IMailPolicy)
class RateLimit:
    """Counts accepted messages; refuses MAIL over the limit."""

    def __init__(self, per_user: int, per_address: int, window: float, context: PolicyContext):
        self.window = window
        self.trusted = tuple(context.trusted_networks)
        clock = context.reactor
        self.users = SlidingCounter(per_user, window, clock) if per_user else None
        self.addresses = SlidingCounter(per_address, window, clock) if per_address else None
        self._peers = context.peers
        self._peers.listen(TOPIC, self._counted_elsewhere)

    def mail_from(
        self, session: SessionInfo, sender: str, params: Mapping[str, str]
    ) -> Verdict | None:
        counter, key = self._counted_as(session)
        if counter is None or not counter.full(key):
            return None
        if counter is self.users:
            self._log_refusal("user", key, counter)
            return Verdict.tempfail(
                452, "4.7.0", f"Too many messages from user {key}, try again later"
            )
        self._log_refusal("client", key, counter)
        return Verdict.tempfail(450, "4.7.1", f"Too many messages from [{key}], try again later")

    def message(
        self, session: SessionInfo, transaction: TransactionInfo, message: MessageInfo
    ) -> None:
        counter, key = self._counted_as(session)
        if counter is not None:
            counter.add(key)
            kind = "user" if counter is self.users else "client"
            self._peers.tell(TOPIC, f"{kind} {key}")

    def _counted_elsewhere(self, payload: str) -> None:
        """A message another worker counted."""
        kind, _, key = payload.partition(" ")
        counter = self.users if kind == "user" else self.addresses
        if counter is not None and key:
            counter.add(key)

    def _counted_as(self, session: SessionInfo) -> tuple[SlidingCounter | None, str]:
        """An authenticated user counts by login, any other client by its
        address; local submission and trusted networks are not counted."""
        if session.listener == "local":
            return None, ""
        if session.user is not None:
            return self.users, session.user.lower()
        if address_in(session.client_ip, self.trusted):
            return None, ""
        return self.addresses, session.client_ip

    def _log_refusal(self, kind: str, key: str, counter: SlidingCounter) -> None:
        _log.info(
            "ratelimit: {kind} {key} over {limit} messages in {window:g}s; MAIL refused",
            kind=kind,
            key=key,
            limit=counter.limit,
            window=self.window,
        )


def make_policy(options: Mapping[str, Any], context: PolicyContext) -> RateLimit:
    """The policy for ``[plugins.ratelimit]``; raises ValueError naming the
    option that is wrong."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option (known: {', '.join(OPTIONS)})")
    per_user = parse_limit(options.get("per_user", 0), "per_user")
    per_address = parse_limit(options.get("per_address", 0), "per_address")
    window = option_seconds(options.get("window", DEFAULT_WINDOW), "window", positive=True)
    return RateLimit(per_user, per_address, window, context)


factory = BuiltinFactory(
    "ratelimit",
    "Limit the messages per authenticated user and per client address per window",
    make_policy,
)
