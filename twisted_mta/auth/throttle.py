"""Slow down password guessing, per connection and per client address.

Each failed AUTH is answered after ``base_delay * 2**(n-1)`` seconds (at
most ``MAX_DELAY``), where n is the larger of the connection's failures and
the client address's recent failures.  An address's count decays: it is
forgotten ``WINDOW`` seconds after its last failure.  Reconnecting
therefore does not reset the delay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_DELAY = 30.0
WINDOW = 900.0
MAX_TRACKED = 100_000


@dataclass
class AuthThrottle:
    base_delay: float
    _failures: dict[str, tuple[int, float]] = field(default_factory=dict)

    def record_failure(self, ip: str, now: float) -> int:
        """Count a failure of ``ip``; return its recent failures."""
        count = self.recent_failures(ip, now) + 1
        if len(self._failures) >= MAX_TRACKED and ip not in self._failures:
            self._forget_old(now)
        self._failures[ip] = (count, now)
        return count

    def recent_failures(self, ip: str, now: float) -> int:
        count, last = self._failures.get(ip, (0, 0.0))
        return count if now - last < WINDOW else 0

    def record_success(self, ip: str) -> None:
        self._failures.pop(ip, None)

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        return min(self.base_delay * 2 ** (failures - 1), MAX_DELAY)

    def _forget_old(self, now: float) -> None:
        for ip, (_, last) in list(self._failures.items()):
            if now - last >= WINDOW:
                del self._failures[ip]
        if len(self._failures) >= MAX_TRACKED:
            self._failures.clear()
