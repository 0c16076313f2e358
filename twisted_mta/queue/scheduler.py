"""When to try queued messages again, and what an attempt's results mean.

The scheduler keeps each queued message's next due time in memory and one
timer for the earliest of them: nothing polls.  A due message's pending
recipients are grouped by destination (their domain, or the smart host),
each group is one delivery attempt, and at most ``max_concurrent`` attempts
run at once (``per_destination`` to one destination).  After an attempt:

* delivered recipients are ``sent``;
* permanent failures are ``failed``;
* temporary failures wait ``retry_min * 2**(attempts-1)``, at most
  ``retry_max``; past ``lifetime`` since arrival they fail too (4.4.7).

When no recipient is pending any more, the failed ones are reported to the
sender in one DSN (never for the null sender) and the message leaves the
queue.  ``delay_warning`` (0: off) sends one "delayed" DSN for a message
still pending that long after arrival.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twisted.application import service
from twisted.internet import defer
from twisted.python import log

from twisted_mta.queue.store import FAILED, SENT, QueuedMessage, QueueStore, RecipientState, UnknownMessage

EXPIRED_STATUS = "4.4.7"


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt for one recipient."""

    address: str
    delivered: bool
    permanent: bool
    status: str
    text: str
    remote: str | None = None


@dataclass(frozen=True)
class Policy:
    retry_min: float
    retry_max: float
    lifetime: float
    delay_warning: float = 0.0
    max_concurrent: int = 20
    per_destination: int = 5

    def backoff(self, attempts: int) -> float:
        return min(self.retry_min * 2 ** max(attempts - 1, 0), self.retry_max)


Deliver = Callable[[QueuedMessage, Sequence[RecipientState]], "defer.Deferred[Sequence[Outcome]]"]
Report = Callable[[QueuedMessage, Sequence[RecipientState], str], "defer.Deferred[None]"]


@dataclass
class Scheduler(service.Service):
    """Runs the queue: due times, concurrency, retries, expiry, reports."""

    store: QueueStore
    deliver: Deliver
    report: Report
    destination: Callable[[str], str]
    policy: Policy
    clock: object
    _due: list[tuple[float, str]] = field(default_factory=list)
    _timer: object = None
    _active: set[str] = field(default_factory=set)
    _running: Counter = field(default_factory=Counter)
    _total: int = 0

    def startService(self) -> None:
        super().startService()
        self.rescan()

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def rescan(self) -> None:
        """Schedule every queued message afresh (start, flush, CLI changes)."""
        self._due = []
        for message in self.store.messages():
            self._schedule_message(message)
        self._wake()

    def enqueue(self, queue_id: str) -> None:
        """A new message was accepted: try it now."""
        heapq.heappush(self._due, (self.clock.seconds(), queue_id))
        self._wake()

    def _schedule_message(self, message: QueuedMessage) -> None:
        due = message.next_due()
        if due is None:
            heapq.heappush(self._due, (self.clock.seconds(), message.id))
        else:
            heapq.heappush(self._due, (due, message.id))

    def _wake(self) -> None:
        if not self.running:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._due:
            delay = max(self._due[0][0] - self.clock.seconds(), 0.0)
            self._timer = self.clock.callLater(delay, self._run_due)

    def _run_due(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        seen: set[str] = set()
        while self._due and self._due[0][0] <= now and self._total < self.policy.max_concurrent:
            _, queue_id = heapq.heappop(self._due)
            if queue_id in seen:
                # Already handled in this round: look again a little later.
                heapq.heappush(self._due, (now + 1.0, queue_id))
            elif queue_id not in self._active:
                seen.add(queue_id)
                self._process(queue_id)
        self._wake()

    def _process(self, queue_id: str) -> None:
        try:
            message = self.store.load(queue_id)
        except UnknownMessage:
            return
        now = self.clock.seconds()
        due = [r for r in message.pending() if r.next_attempt <= now]
        if not due:
            self._after_attempts(message)
            return
        groups: dict[str, list[RecipientState]] = {}
        for recipient in due:
            groups.setdefault(self.destination(recipient.address), []).append(recipient)
        startable = {
            destination: recipients
            for destination, recipients in groups.items()
            if self._running[destination] < self.policy.per_destination
        }
        if len(startable) < len(groups):
            heapq.heappush(self._due, (now + 1.0, queue_id))
        if not startable:
            return
        self._active.add(queue_id)
        attempts = [
            self._attempt(message, destination, recipients)
            for destination, recipients in startable.items()
        ]
        done = defer.DeferredList(attempts, consumeErrors=True)
        done.addBoth(lambda _: self._finished(queue_id))

    def _attempt(self, message, destination, recipients) -> defer.Deferred:
        self._running[destination] += 1
        self._total += 1
        d = defer.maybeDeferred(self.deliver, message, recipients)
        d.addCallback(self._record, message, recipients)
        d.addErrback(self._attempt_crashed, message)

        def release(result):
            self._running[destination] -= 1
            self._total -= 1
            return result

        return d.addBoth(release)

    def _attempt_crashed(self, failure, message) -> None:
        log.err(failure, f"id={message.id} delivery attempt failed unexpectedly")

    def _record(self, outcomes: Sequence[Outcome], message: QueuedMessage, recipients) -> None:
        now = self.clock.seconds()
        by_address = {o.address: o for o in outcomes}
        expired = now - message.arrival >= self.policy.lifetime

        def change(current: QueuedMessage) -> None:
            for state in current.recipients:
                outcome = by_address.get(state.address)
                if outcome is not None and state.pending:
                    _apply(state, outcome, now, expired, self.policy)

        try:
            updated = self.store.update(message.id, change)
        except UnknownMessage:
            log.msg(f"id={message.id} removed from the queue during a delivery attempt")
            return
        for state in updated.recipients:
            if state.address in by_address and state.last_attempt == now:
                _log_attempt(updated, state, now)

    def _finished(self, queue_id: str) -> None:
        self._active.discard(queue_id)
        try:
            message = self.store.load(queue_id)
        except UnknownMessage:
            return
        self._after_attempts(message)
        self._wake()

    def _after_attempts(self, message: QueuedMessage) -> None:
        """Report and remove a finished message, or schedule its next try."""
        now = self.clock.seconds()
        if message.pending():
            if self._needs_delay_warning(message, now):
                self._warn_delay(message)
            self._schedule_message(message)
            return
        failed = [r for r in message.recipients if r.state == FAILED]
        d = self.report(message, failed, "failed") if failed else defer.succeed(None)
        d.addCallback(lambda _: self.store.remove(message.id))
        d.addErrback(log.err, f"id={message.id} could not be finished")

    def _needs_delay_warning(self, message: QueuedMessage, now: float) -> bool:
        warning = self.policy.delay_warning
        return bool(warning) and not message.delay_warned and now - message.arrival >= warning

    def _warn_delay(self, message: QueuedMessage) -> None:
        def mark(current: QueuedMessage) -> None:
            current.delay_warned = True

        d = self.report(message, message.pending(), "delayed")
        d.addCallback(lambda _: self.store.update(message.id, mark))
        d.addErrback(log.err, f"id={message.id} delay warning not sent")


def _apply(state: RecipientState, outcome: Outcome, now: float, expired: bool, policy: Policy) -> None:
    state.attempts += 1
    state.last_attempt = now
    state.remote = outcome.remote
    state.status = outcome.status
    state.last_error = None if outcome.delivered else outcome.text
    if outcome.delivered:
        state.state = SENT
    elif outcome.permanent:
        state.state = FAILED
    elif expired:
        state.state = FAILED
        state.status = EXPIRED_STATUS
        state.last_error = f"message expired after too many attempts; last error: {outcome.text}"
    else:
        state.next_attempt = now + policy.backoff(state.attempts)


def _log_attempt(message: QueuedMessage, state: RecipientState, now: float) -> None:
    status = {SENT: "sent", FAILED: "bounced"}.get(state.state, "deferred")
    detail = f"{state.status} {state.last_error or 'delivered'}"
    log.msg(
        f"id={message.id} to=<{state.address}> relay={state.remote or 'none'} "
        f"delay={now - message.arrival:.2f} status={status} ({detail})"
    )
