"""When to try queued messages again, and what an attempt's results mean.

The scheduler keeps each queued message's next due time in memory and one
timer for the earliest of them: nothing polls.  A due message's pending
recipients are grouped by destination (their domain, or the smart host),
each group is one delivery attempt, run when it has a slot
(:mod:`twisted_mta.queue.slots`: how many run at once, in all and to one
destination, and who waits), however many destinations one message has.
A recipient is never in two attempts at once.  What an attempt's result
makes of each recipient (sent, failed, retried after a backoff, expired)
is :mod:`twisted_mta.queue.outcomes`.

When no recipient is pending any more, the failed ones are reported to the
sender in one DSN (never for the null sender) and the message leaves the
queue.  ``delay_warning`` (0: off) sends one "delayed" DSN for a message
still pending that long after arrival.  An envelope that cannot be read
is moved to ``queue/corrupt/`` and stops nothing else.

A message on hold (``twisted-mta queue hold``) with recipients pending is
not scheduled: not tried, not warned about, and so never expired while
held (as in Postfix's hold queue).  An attempt already under way when it
is held is finished and recorded; a held message with nothing pending
(bounced by the administrator) is reported and removed as usual.
Released, it is due at once and expires, if that attempt fails, by its
arrival time like any other.

An attempt's results that cannot be written (a full disk) are kept in
memory and laid over the envelope each time it is read, so the backoff
holds; they are written with the message's next change.

Envelopes are read, changed and removed off the reactor thread, through
the :class:`~twisted_mta.queue.writer.QueueWriter`: an attempt reads its
message once, its results are recorded (read, changed and written under
the queue lock) and durable before the attempt counts as finished, and
the message as recorded decides what comes next, without reading it
again.  The last recipient delivered removes the message in that same
change; a failed one is reported from the recorded message and only then
removed.  Reading the whole queue (at start, and when ``twisted-mta
queue`` asks for it) is one job of that thread too.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mta.intake.policies import NO_POLICIES, PolicyChain
from twisted_mta.intake.spool import StorageError
from twisted_mta.interfaces import DeliveryResult
from twisted_mta.queue.outcomes import (
    Outcome,
    Policy,
    apply_outcome,
    envelope_info,
    log_attempt,
)
from twisted_mta.queue.slots import Slots
from twisted_mta.queue.store import CorruptMessage, QueueStore, delivered
from twisted_mta.queue.writer import QueueWriter
from twisted_mta.storage.envelope import FAILED, SENT, QueuedMessage, RecipientState, UnknownMessage

_log = Logger()



Change = Callable[[QueuedMessage], None]
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
    writer: QueueWriter
    _due: list[tuple[float, str]] = field(default_factory=list)
    _timer: object = None
    # Recipients of each message being attempted now: never twice at once.
    _in_flight: dict[str, set[str]] = field(default_factory=dict)
    # Messages being reported and removed: not to be looked at meanwhile.
    _finishing: set[str] = field(default_factory=set)
    _slots: Slots = field(init=False)
    # Each message as its last attempt recorded it, None once removed: what
    # decides what comes next when its attempts are over.
    _last_recorded: dict[str, QueuedMessage | None] = field(default_factory=dict)
    # Changes to envelopes not yet on disk (ENOSPC): id -> changes, in order.
    _unwritten: dict[str, list[Change]] = field(default_factory=dict)
    policies: PolicyChain = NO_POLICIES

    def __post_init__(self) -> None:
        self._slots = Slots(lambda: self.policy)

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
        d = self.writer.scan()
        d.addCallback(self._rescanned)
        d.addErrback(lambda failure: _log.failure("the queue could not be read", failure))

    def _rescanned(self, found: Sequence[tuple[str, QueuedMessage | None]]) -> None:
        self._due = []
        now = self.clock.seconds()
        for queue_id, message in found:
            if message is None:
                # Read again when due, which sets a damaged one aside.
                heapq.heappush(self._due, (now, queue_id))
            else:
                self._schedule_message(self._with_unwritten(message))
        self._wake()

    def _read(self, queue_id: str) -> defer.Deferred[QueuedMessage | None]:
        """The message as we know it, or None if it is gone or was
        unreadable (moved aside)."""
        d = self.writer.load(queue_id)
        d.addCallback(self._with_unwritten)
        d.addErrback(self._read_failed, queue_id)
        return d

    def _read_failed(self, failure: Failure, queue_id: str) -> None:
        failure.trap(UnknownMessage, CorruptMessage)
        if failure.check(CorruptMessage):
            self._quarantine(queue_id)
        else:
            self._unwritten.pop(queue_id, None)

    def _with_unwritten(self, message: QueuedMessage) -> QueuedMessage:
        for change in self._unwritten.get(message.id, ()):
            change(message)
        return message

    def _change(self, queue_id: str, change: Change) -> defer.Deferred[QueuedMessage | None]:
        """Apply ``change`` to the envelope on disk, with any changes still
        waiting to be written; if the disk refuses, keep them in memory and
        fire with the message as it would be.

        Fails with UnknownMessage if the message is gone.
        """
        # Taken along: a change submitted meanwhile must not apply them again.
        changes = [*self._unwritten.pop(queue_id, ()), change]
        d = self.writer.update(queue_id, _applying(changes))
        # With what another change that failed meanwhile put back.
        d.addCallbacks(self._with_unwritten, self._not_written, errbackArgs=(queue_id, changes))
        return d

    def _not_written(
        self, failure: Failure, queue_id: str, changes: list[Change]
    ) -> defer.Deferred[QueuedMessage | None]:
        failure.trap(OSError)
        self._unwritten[queue_id] = [*changes, *self._unwritten.get(queue_id, ())]
        _log.info(
            "id={queue_id} queue file not updated ({reason}); kept in memory until it can be",
            queue_id=queue_id,
            reason=failure.value.strerror or str(failure.value),
        )
        return self._read(queue_id)

    def enqueue(self, queue_id: str) -> None:
        """A new message was accepted: try it now."""
        heapq.heappush(self._due, (self.clock.seconds(), queue_id))
        self._wake()

    def _schedule_message(self, message: QueuedMessage) -> None:
        if message.held and message.pending():
            return  # the queue command asks for a rescan when it releases it
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
            if delay == 0 and self._slots.full():
                return  # the next attempt or read to finish wakes us
            self._timer = self.clock.callLater(delay, self._run_due)

    def _run_due(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        seen: set[str] = set()
        while self._due and self._due[0][0] <= now and not self._slots.full():
            _, queue_id = heapq.heappop(self._due)
            if queue_id in seen or self._slots.loading(queue_id):
                # Already handled in this round: look again a little later.
                heapq.heappush(self._due, (now + 1.0, queue_id))
            elif queue_id not in self._finishing:
                seen.add(queue_id)
                self._process(queue_id)
        self._wake()

    def _process(self, queue_id: str) -> None:
        self._slots.start_read(queue_id)
        d = self._read(queue_id)
        d.addBoth(self._read_done, queue_id)
        d.addCallback(self._start_attempts)
        d.addErrback(self._not_read, queue_id)
        # A released message that did not take its slot passes it on.
        d.addBoth(lambda _: self._unblock())

    def _read_done(self, result: object, queue_id: str) -> object:
        self._slots.read_done(queue_id)
        return result

    def _not_read(self, failure: Failure, queue_id: str) -> None:
        """The envelope could not be read (an I/O error): try again later."""
        if failure.check(OSError):
            _log.info(
                "id={queue_id} queue file not read ({reason}); trying again later",
                queue_id=queue_id,
                reason=failure.getErrorMessage(),
            )
        else:
            _logged(failure, "id={queue_id} not tried; trying again later", queue_id)
        self._due_later(queue_id)

    def _start_attempts(self, message: QueuedMessage | None) -> None:
        if not self.running or message is None or (message.held and message.pending()):
            return
        if message.id in self._finishing:
            return  # its last attempt ended while it was being read
        queue_id = message.id
        now = self.clock.seconds()
        flying = self._in_flight.get(queue_id, set())
        due = [r for r in message.pending() if r.next_attempt <= now and r.address not in flying]
        if not due:
            if not flying:
                self._after_attempts(message)
            return  # else the attempts in flight finish it
        groups: dict[str, list[RecipientState]] = {}
        for recipient in due:
            groups.setdefault(self.destination(recipient.address), []).append(recipient)
        capacity = self._slots.capacity()
        startable = {}
        for destination, recipients in groups.items():
            if not self._slots.has_slot(destination):
                self._slots.wait(queue_id, destination)
            elif len(startable) >= capacity:
                self._slots.wait(queue_id, None)
            else:
                startable[destination] = recipients
        for destination, recipients in startable.items():
            self._attempt(message, destination, recipients)

    def _attempt(self, message: QueuedMessage, destination: str, recipients) -> None:
        addresses = {r.address for r in recipients}
        self._slots.start_attempt(message.id, destination)
        self._in_flight.setdefault(message.id, set()).update(addresses)
        d = defer.maybeDeferred(self.deliver, message, recipients)
        d.addCallback(self._record, message, recipients)
        d.addErrback(self._attempt_crashed, message, recipients)
        d.addErrback(_logged, "id={queue_id} attempt not recorded", message.id)
        d.addBoth(lambda _: self._attempt_done(message.id, destination, addresses))

    def _attempt_done(self, queue_id: str, destination: str, addresses: set[str]) -> None:
        self._slots.end_attempt(destination)
        flying = self._in_flight.get(queue_id, set())
        flying -= addresses
        if not flying:
            self._in_flight.pop(queue_id, None)
            self._finished(queue_id)
        self._unblock()

    def _unblock(self) -> None:
        """Slots are free: as many waiting messages are read again."""
        for queue_id in self._slots.release(self._finishing):
            self._process(queue_id)
        self._wake()

    def _attempt_crashed(
        self, failure, message: QueuedMessage, recipients
    ) -> defer.Deferred[None]:
        """A bug, not a delivery failure: logged, and retried later like one
        (not at once, which could loop)."""
        _logged(failure, "id={queue_id} delivery attempt failed unexpectedly", message.id)
        text = f"internal error: {failure.getErrorMessage()}"
        outcomes = [Outcome(r.address, False, False, "4.3.0", text) for r in recipients]
        return self._record(outcomes, message, recipients)

    def _record(
        self, outcomes: Sequence[Outcome], message: QueuedMessage, recipients
    ) -> defer.Deferred[None]:
        now = self.clock.seconds()
        by_address = {o.address: o for o in outcomes}
        expired = now - message.arrival >= self.policy.lifetime

        def change(current: QueuedMessage) -> None:
            for state in current.recipients:
                outcome = by_address.get(state.address)
                # Applied once only: a write reported as failed (its
                # directory fsync) may have reached the disk all the same.
                if outcome is not None and state.pending and state.last_attempt != now:
                    apply_outcome(state, outcome, now, expired, self.policy)

        d = self._change(message.id, change)
        d.addErrback(_gone_meanwhile)
        d.addCallback(self._recorded, message.id, by_address, now)
        return d

    def _recorded(
        self,
        updated: QueuedMessage | None,
        queue_id: str,
        by_address: dict[str, Outcome],
        now: float,
    ) -> None:
        if updated is None:
            _log.info(
                "id={queue_id} removed from the queue during a delivery attempt",
                queue_id=queue_id,
            )
            self._last_recorded[queue_id] = None
            return
        # Delivered to all and written: the store removed it (``delivered``).
        gone = delivered(updated) and queue_id not in self._unwritten
        self._last_recorded[queue_id] = None if gone else updated
        for state in updated.recipients:
            if state.address in by_address and state.last_attempt == now:
                log_attempt(updated, state, by_address[state.address], now)
                if not state.pending:
                    self._tell_delivered(updated, state)

    def _tell_delivered(self, message: QueuedMessage, state: RecipientState) -> None:
        if not self.policies.has("delivered"):
            return
        status = "sent" if state.state == SENT else "bounced"
        detail = f"{state.status} {state.last_error or 'delivered'}"
        result = DeliveryResult(status, state.remote or "none", detail)
        self.policies.run("delivered", envelope_info(message), state.address, result)

    def _finished(self, queue_id: str) -> None:
        if queue_id in self._last_recorded:
            self._finish(self._last_recorded.pop(queue_id))
            return
        # The results were not recorded (a bug, logged): as the disk has it.
        d = self._read(queue_id)
        d.addCallback(self._finish)
        d.addErrback(self._not_read, queue_id)

    def _finish(self, message: QueuedMessage | None) -> None:
        if message is not None:
            self._after_attempts(message)
        self._wake()

    def _after_attempts(self, message: QueuedMessage) -> None:
        """Report and remove a finished message, or schedule its next try."""
        now = self.clock.seconds()
        if message.pending():
            if message.held:
                return
            if self._needs_delay_warning(message, now):
                self._warn_delay(message)
            self._schedule_message(message)
            return
        failed = [r for r in message.recipients if r.state == FAILED]
        # Busy until removed, so that a rescan meanwhile does not report twice.
        self._finishing.add(message.id)
        if failed:
            d = defer.maybeDeferred(self.report, message, failed, "failed")
        else:
            d = defer.succeed(None)
        d.addCallback(lambda _: self._remove(message.id))
        d.addErrback(self._not_finished, message.id)
        d.addBoth(lambda _: self._finishing.discard(message.id))

    def _remove(self, queue_id: str) -> defer.Deferred[None]:
        d = self.writer.remove(queue_id)
        d.addCallback(lambda _: self._unwritten.pop(queue_id, None))
        return d

    def _not_finished(self, failure, queue_id: str) -> None:
        """The report or the removal failed: try again later."""
        if failure.check(UnknownMessage):
            return  # deleted meanwhile (``twisted-mta queue delete``)
        if failure.check(OSError, StorageError):
            _log.info(
                "id={queue_id} could not be finished ({reason}); trying again later",
                queue_id=queue_id,
                reason=failure.getErrorMessage(),
            )
        else:
            _logged(failure, "id={queue_id} could not be finished; trying again later", queue_id)
        self._due_later(queue_id)

    def _due_later(self, queue_id: str) -> None:
        heapq.heappush(self._due, (self.clock.seconds() + self.policy.retry_min, queue_id))
        self._wake()

    def _quarantine(self, queue_id: str) -> None:
        """An envelope we cannot read stops nothing else: it is set aside."""
        try:
            reason = self.store.quarantine(queue_id)
        except OSError as error:
            _log.info(
                "id={queue_id} unreadable envelope could not be set aside: {error}",
                queue_id=queue_id,
                error=str(error),
            )
            return
        if reason is not None:
            _log.info(
                "id={queue_id} unreadable envelope ({reason}): moved to queue/corrupt/",
                queue_id=queue_id,
                reason=reason,
            )

    def _needs_delay_warning(self, message: QueuedMessage, now: float) -> bool:
        warning = self.policy.delay_warning
        return bool(warning) and not message.delay_warned and now - message.arrival >= warning

    def _warn_delay(self, message: QueuedMessage) -> None:
        def mark(current: QueuedMessage) -> None:
            current.delay_warned = True

        # Marked first: a warning is worth less than never sending two.
        d = defer.maybeDeferred(self._change, message.id, mark)
        d.addCallback(lambda _: self.report(message, message.pending(), "delayed"))
        d.addErrback(_logged, "id={queue_id} delay warning not sent", message.id)


def _gone_meanwhile(failure: Failure) -> None:
    """The message left the queue (``twisted-mta queue delete``)."""
    failure.trap(UnknownMessage)


def _applying(changes: Sequence[Change]) -> Change:
    def apply_all(message: QueuedMessage) -> None:
        for change in changes:
            change(message)

    return apply_all


def _logged(failure: Failure, text: str, queue_id: str) -> None:
    """A failure that is a bug, with its traceback, for one message."""
    _log.failure(text, failure, queue_id=queue_id)
