"""Slow down password guessing, per connection and per client address.

An address's failures count for ``WINDOW`` seconds each, across
connections, hang-ups and successes (a success by an account the guesser
owns must not reset the count).  From them follow:

* the answer delay: once an address has failed, every AUTH answer to it
  (a success too, so that hanging up early tells nothing) comes
  ``base_delay * 2**n`` seconds (at most ``MAX_DELAY``) after its check,
  n being its failures before this attempt;
* the block: with ``max_failures`` failures (counting checks still
  running) AUTH is refused at once, without a password check;
* the share of checks: an address with recent failures has at most
  ``PER_ADDRESS`` attempts queued, checked or waiting for their answer.
  An attempt holds its place until its answer is due, whether or not the
  client is still there, so reconnecting does not buy more checks.  An
  address without failures is not held back (a webmail logging several
  users in at once), beyond the block counting its checks under way;
* the pool: at most ``CHECKS`` password checks run at once, the others
  wait in turn.  A client that goes away withdraws its waiting check; one
  that has started still counts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

MAX_DELAY = 30.0
WINDOW = 900.0
PER_ADDRESS = 2
CHECKS = 3
MAX_TRACKED = 100_000
# Failures remembered per address beyond max_failures: enough for the
# delay to reach MAX_DELAY at any base delay worth configuring.
_KEPT = 64


class Refusal(Enum):
    """Why an address may not start an AUTH attempt now."""

    BLOCKED = "too many authentication failures"
    BUSY = "too many authentication attempts in progress"


@dataclass
class _Address:
    failures: deque[float] = field(default_factory=deque)
    attempts: int = 0
    checking: int = 0
    block_told: bool = False


@dataclass
class AuthThrottle:
    """The AUTH state of every client address, shared by all listeners."""

    base_delay: float
    max_failures: int = 10
    _addresses: dict[str, _Address] = field(default_factory=dict)
    _checks: defer.DeferredSemaphore = field(
        default_factory=lambda: defer.DeferredSemaphore(CHECKS)
    )
    # Told each failure found here (``ip``, when): other processes' throttles.
    on_failure: Callable[[str, float], None] | None = None

    def attempt(
        self,
        ip: str,
        check: Callable[[], defer.Deferred],
        clock: IReactorTime,
        session_failures: int = 0,
    ) -> defer.Deferred:
        """Run ``check`` for an attempt of ``ip`` in its turn.

        The result fires with the check's outcome when its answer is due.
        Cancelling it withdraws a check that has not started; a started
        one runs, counts and holds the address's place to its end anyway.
        ``UnauthorizedLogin`` counts as a failure.
        """
        self.begin(ip, clock.seconds())
        turn = self._checks.acquire()
        answer = defer.Deferred(lambda _: turn.cancel())
        turn.addCallbacks(
            self._run, lambda _: self.cancelled(ip),
            callbackArgs=(ip, check, clock, session_failures, answer),
        )
        return answer

    def _run(self, _, ip, check, clock, session_failures, answer) -> None:
        # Not returned: cancelling the answer must not reach the check.
        d = defer.maybeDeferred(check)
        d.addBoth(self._answer_later, ip, clock, session_failures, answer)

    def _answer_later(self, outcome, ip, clock, session_failures, answer) -> None:
        self._checks.release()
        failed = isinstance(outcome, Failure) and outcome.check(UnauthorizedLogin) is not None
        delay = self.checked(ip, failed, clock.seconds(), session_failures)
        if delay:
            clock.callLater(delay, self._answer, ip, outcome, answer)
        else:
            self._answer(ip, outcome, answer)

    def _answer(self, ip: str, outcome, answer: defer.Deferred) -> None:
        self.end(ip)
        if answer.called:
            return
        if isinstance(outcome, Failure):
            answer.errback(outcome)
        else:
            answer.callback(outcome)

    def refusal(self, ip: str, now: float) -> Refusal | None:
        """Why ``ip`` may not start an attempt now, or None if it may."""
        state = self._addresses.get(ip)
        if state is None:
            return None
        recent = self._recent(state, now)
        if recent + state.checking >= self.max_failures:
            return Refusal.BLOCKED
        if recent and state.attempts >= PER_ADDRESS:
            return Refusal.BUSY
        return None

    def block_is_news(self, ip: str) -> bool:
        """True for the first refusal of a block, not for the others.

        A guesser gets its refusals as fast as it asks: one log line a
        block, not one a refusal.  A block is new after each failure.
        """
        state = self._addresses[ip]
        news, state.block_told = not state.block_told, True
        return news

    def begin(self, ip: str, now: float) -> None:
        """An attempt of ``ip`` is queued for its check."""
        state = self._tracked(ip, now)
        state.attempts += 1
        state.checking += 1

    def checked(self, ip: str, failed: bool, now: float, session_failures: int = 0) -> float:
        """The check of an attempt of ``ip`` is done; the delay of its answer.

        ``session_failures`` are the connection's own failures before this
        one; the address's count is normally the larger.
        """
        state = self._addresses[ip]
        state.checking -= 1
        before = max(self._recent(state, now), session_failures)
        if failed:
            self._count_failure(state, now)
            if self.on_failure is not None:
                self.on_failure(ip, now)
        if failed or before:
            return self.delay(before + 1)
        return 0.0

    def failed_elsewhere(self, ip: str, when: float) -> None:
        """A failure of ``ip`` found by another process's throttle."""
        self._count_failure(self._tracked(ip, when), when)

    def _tracked(self, ip: str, now: float) -> _Address:
        state = self._addresses.get(ip)
        if state is None:
            if len(self._addresses) >= MAX_TRACKED:
                self._forget_old(now)
            state = self._addresses[ip] = _Address()
        return state

    def _count_failure(self, state: _Address, when: float) -> None:
        state.block_told = False
        state.failures.append(when)
        while len(state.failures) > max(self.max_failures, _KEPT):
            state.failures.popleft()

    def cancelled(self, ip: str) -> None:
        """An attempt of ``ip`` was given up before its check ran."""
        self._addresses[ip].checking -= 1
        self.end(ip)

    def end(self, ip: str) -> None:
        """An attempt of ``ip`` is answered (or would have been)."""
        state = self._addresses[ip]
        state.attempts -= 1
        if not state.attempts and not state.failures:
            del self._addresses[ip]

    def recent_failures(self, ip: str, now: float) -> int:
        state = self._addresses.get(ip)
        return 0 if state is None else self._recent(state, now)

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        return min(self.base_delay * 2 ** (failures - 1), MAX_DELAY)

    def _recent(self, state: _Address, now: float) -> int:
        failures = state.failures
        while failures and now - failures[0] >= WINDOW:
            failures.popleft()
        return len(failures)

    def _forget_old(self, now: float) -> None:
        for ip, state in list(self._addresses.items()):
            if not state.attempts and not self._recent(state, now):
                del self._addresses[ip]
        if len(self._addresses) >= MAX_TRACKED:
            # A flood from more addresses than we track: keep only those
            # with attempts open, whose counters must stay right.
            for ip, state in list(self._addresses.items()):
                if not state.attempts:
                    del self._addresses[ip]
