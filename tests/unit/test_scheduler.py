"""The queue scheduler with a fake clock and fake deliveries."""

import errno
import json
import threading

from twisted.internet import defer, task

from tests.helpers.queue_worker import BatchingWorker
from tests.helpers.threads import TIMEOUT, ThreadReactor
from twisted_mta.queue import store as store_module
from twisted_mta.queue.outcomes import Outcome, Policy
from twisted_mta.queue.scheduler import Scheduler
from twisted_mta.queue.store import QueueStore
from twisted_mta.queue.writer import QueueWriter
from twisted_mta.storage.committer import Committer
from twisted_mta.storage.envelope import FAILED, SENT, Envelope


def queue(tmp_path, queue_id, recipients, now=0.0, sender="s@example.org"):
    envelope = Envelope(sender, tuple(recipients), {"ip": "127.0.0.1"}, "7BIT", False)
    (tmp_path / f"{queue_id}.msg").write_bytes(b"Subject: x\n\nbody\n")
    (tmp_path / f"{queue_id}.env").write_bytes(envelope.to_json(queue_id, 17, now))


class Harness:
    def __init__(self, tmp_path, policy=None, worker=None):
        self.clock = task.Clock()
        self.store = QueueStore(tmp_path)
        self.worker = worker or BatchingWorker()
        self.calls = []
        self.reports = []
        self.answers = {}
        self.pending = []
        self.scheduler = Scheduler(
            store=self.store,
            deliver=self.deliver,
            report=self.report,
            destination=lambda address: address.rpartition("@")[2],
            policy=policy or Policy(retry_min=300, retry_max=3600, lifetime=5 * 86400),
            clock=self.clock,
            writer=QueueWriter(self.store, self.worker),
        )

    def start(self):
        self.scheduler.startService()
        if self.worker.waiting:
            self.worker.flush()  # the scan of the queue
        self.clock.advance(0)

    def deliver(self, message, recipients):
        self.calls.append((self.clock.seconds(), message.id, [r.address for r in recipients]))
        answer = self.answers.get("hold")
        if answer:
            d = defer.Deferred()
            self.pending.append((d, recipients))
            return d
        return [self._outcome(r.address) for r in recipients]

    def _outcome(self, address):
        code = self.answers.get(address, "250")
        return Outcome(address, code == "250", code.startswith("5"),
                       {"250": "2.0.0", "451": "4.0.0", "550": "5.1.1"}[code], f"{code} reply", "mx.test[192.0.2.1]:25")

    def report(self, message, recipients, action):
        self.reports.append((message.id, action, [r.address for r in recipients]))
        return defer.succeed(None)


def test_new_message_is_tried_at_once_and_removed_when_sent(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["a@one.test", "b@two.test", "c@one.test"])
    h = Harness(tmp_path)
    h.start()
    assert sorted(map(tuple, (c[2] for c in h.calls))) == [("a@one.test", "c@one.test"), ("b@two.test",)]
    assert h.store.ids() == []
    assert h.reports == []


def test_temporary_failures_back_off_exponentially_then_succeed(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["a@one.test"])
    h = Harness(tmp_path)
    h.answers["a@one.test"] = "451"
    h.start()
    for expected_gap in (300, 600, 1200, 2400, 3600, 3600):
        h.clock.advance(expected_gap - 1)
        count = len(h.calls)
        h.clock.advance(1)
        assert len(h.calls) == count + 1
    state = h.store.load("0000000000001AAAA").recipients[0]
    assert (state.attempts, state.last_error) == (7, "451 reply")
    h.answers["a@one.test"] = "250"
    h.clock.advance(3600)
    assert h.store.ids() == []


def test_permanent_failure_bounces_once_and_keeps_the_others(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["bad@one.test", "good@one.test"])
    h = Harness(tmp_path)
    h.answers["bad@one.test"] = "550"
    h.start()
    assert h.reports == [("0000000000001AAAA", "failed", ["bad@one.test"])]
    assert h.store.ids() == []


def test_lifetime_expiry_fails_with_4_4_7(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["a@one.test"])
    h = Harness(tmp_path, Policy(retry_min=60, retry_max=60, lifetime=200))
    h.answers["a@one.test"] = "451"
    reports_seen = []
    h.report = lambda m, r, a: (reports_seen.append([(x.state, x.status) for x in r]), defer.succeed(None))[1]
    h.scheduler.report = h.report
    h.start()
    h.clock.advance(60)
    h.clock.advance(120)
    h.clock.advance(60)
    assert reports_seen == [[(FAILED, "4.4.7")]]


def test_sleeps_until_the_next_due_time_without_polling(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["a@one.test"])
    h = Harness(tmp_path)
    h.answers["a@one.test"] = "451"
    h.start()
    assert [c.getTime() for c in h.clock.getDelayedCalls()] == [300.0]


def test_restart_keeps_states_and_never_resends_to_sent_recipients(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["ok@one.test", "later@two.test"])
    h = Harness(tmp_path)
    h.answers["later@two.test"] = "451"
    h.start()
    h.scheduler.stopService()
    again = Harness(tmp_path)
    again.answers["later@two.test"] = "451"
    again.clock.advance(300)
    again.start()
    assert [c[2] for c in again.calls] == [["later@two.test"]]
    states = {r.address: r.state for r in again.store.load("0000000000001AAAA").recipients}
    assert states == {"ok@one.test": SENT, "later@two.test": "queued"}


def test_concurrency_limits(tmp_path):
    for n in range(6):
        queue(tmp_path, f"000000000000{n}AAAA", [f"x{n}@one.test"])
    h = Harness(tmp_path, Policy(retry_min=300, retry_max=3600, lifetime=86400, max_concurrent=4, per_destination=2))
    h.answers["hold"] = True
    h.start()
    assert len(h.pending) == 2
    for d, recipients in list(h.pending):
        d.callback([h._outcome(r.address) for r in recipients])
    h.clock.advance(1)
    assert len(h.pending) == 4


def test_concurrency_follows_a_reloaded_policy(tmp_path):
    for n in range(6):
        queue(tmp_path, f"000000000000{n}AAAA", [f"x{n}@one.test"])
    h = Harness(tmp_path)
    h.scheduler.policy = Policy(
        retry_min=300, retry_max=3600, lifetime=86400, max_concurrent=4, per_destination=1
    )
    h.answers["hold"] = True
    h.start()
    assert len(h.pending) == 1


def test_delay_warning_sent_once(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["a@one.test"])
    h = Harness(tmp_path, Policy(retry_min=100, retry_max=100, lifetime=10000, delay_warning=250))
    h.answers["a@one.test"] = "451"
    h.start()
    h.clock.pump([100] * 6)
    assert [r[1] for r in h.reports] == ["delayed"]
    assert h.store.load("0000000000001AAAA").delay_warned


def test_envelope_stays_valid_json_with_version(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["a@one.test"])
    h = Harness(tmp_path)
    h.answers["a@one.test"] = "451"
    h.start()
    document = json.loads((tmp_path / "0000000000001AAAA.env").read_text())
    assert document["version"] == 1
    assert document["recipients"][0]["last_error"] == "451 reply"


def test_results_that_cannot_be_written_keep_their_backoff_in_memory(tmp_path, monkeypatch):
    queue(tmp_path, "0000000000001AAAA", ["a@one.test"])
    h = Harness(tmp_path)
    h.answers["a@one.test"] = "451"

    def disk_full(path, data, *args, **options):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "write_atomically", disk_full)
    h.start()
    for expected_gap in (300, 600, 1200):
        h.clock.advance(expected_gap - 1)
        count = len(h.calls)
        h.clock.advance(1)
        assert len(h.calls) == count + 1
    assert h.store.load("0000000000001AAAA").recipients[0].attempts == 0  # nothing on disk
    monkeypatch.undo()  # room again: the next attempt writes them all
    h.clock.advance(2400)
    state = h.store.load("0000000000001AAAA").recipients[0]
    assert (state.attempts, state.last_error) == (5, "451 reply")


def set_held(store, queue_id, held):
    def change(message):
        message.held = held

    store.update(queue_id, change)


def test_held_message_is_never_tried_warned_about_or_expired(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["a@one.test"])
    set_held(QueueStore(tmp_path), "0000000000001AAAA", True)
    h = Harness(tmp_path, Policy(retry_min=60, retry_max=60, lifetime=200, delay_warning=100))
    h.answers["a@one.test"] = "451"
    h.start()
    h.clock.pump([60] * 10)
    h.scheduler.rescan()
    h.clock.advance(0)
    assert (h.calls, h.reports) == ([], [])
    assert h.clock.getDelayedCalls() == []
    assert h.store.ids() == ["0000000000001AAAA"]


def test_released_message_is_tried_at_once_and_expires_by_its_arrival(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["a@one.test"])
    set_held(QueueStore(tmp_path), "0000000000001AAAA", True)
    h = Harness(tmp_path, Policy(retry_min=60, retry_max=60, lifetime=200))
    h.answers["a@one.test"] = "451"
    h.start()
    h.clock.advance(1000)
    set_held(h.store, "0000000000001AAAA", False)
    h.scheduler.rescan()
    h.clock.advance(0)
    assert [c[0] for c in h.calls] == [1000]
    assert h.reports == [("0000000000001AAAA", "failed", ["a@one.test"])]
    assert h.store.ids() == []


def test_attempt_under_way_when_held_is_recorded_and_not_retried(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["a@one.test"])
    h = Harness(tmp_path)
    h.answers["hold"] = True
    h.start()
    [(d, recipients)] = h.pending
    set_held(h.store, "0000000000001AAAA", True)
    h.scheduler.rescan()
    d.callback([Outcome("a@one.test", False, False, "4.0.0", "451 reply")])
    h.clock.advance(3600)
    message = h.store.load("0000000000001AAAA")
    assert (message.held, message.recipients[0].attempts, len(h.calls)) == (True, 1, 1)


def test_held_message_bounced_by_the_administrator_is_reported(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["a@one.test"])

    def held_and_failed(message):
        message.held = True
        message.recipients[0].state = FAILED

    QueueStore(tmp_path).update("0000000000001AAAA", held_and_failed)
    h = Harness(tmp_path)
    h.start()
    assert (h.calls, h.reports) == ([], [("0000000000001AAAA", "failed", ["a@one.test"])])
    assert h.store.ids() == []


# -- the envelope's reads, writes and removals, through the committer's batches


def count_calls(monkeypatch, owner, name):
    """Record the first argument of each call to ``owner.name``."""
    calls = []
    real = getattr(owner, name)

    def recording(first, *args, **options):
        calls.append(first)
        return real(first, *args, **options)

    monkeypatch.setattr(owner, name, recording)
    return calls


def test_results_are_durable_before_the_bounce_and_the_removal(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["bad@one.test", "good@one.test"])
    worker = BatchingWorker(automatic=False)
    h = Harness(tmp_path, worker=worker)
    h.answers["bad@one.test"] = "550"
    h.start()
    assert h.calls == []  # the read waits for the worker
    worker.flush()
    assert len(h.calls) == 1 and worker.waiting  # tried; its results wait
    assert h.reports == []
    worker.flush()
    assert worker.synced == [str(tmp_path)]
    states = {r.address: r.state for r in h.store.load("0000000000001AAAA").recipients}
    assert states == {"bad@one.test": FAILED, "good@one.test": SENT}
    assert h.reports == [("0000000000001AAAA", "failed", ["bad@one.test"])]
    assert h.store.ids() == ["0000000000001AAAA"]  # the removal waits in turn
    worker.flush()
    assert h.store.ids() == [] and worker.synced == [str(tmp_path)] * 2


def test_delivered_message_is_read_once_and_removed_without_a_rewrite(tmp_path, monkeypatch):
    h = Harness(tmp_path)
    h.start()
    queue(tmp_path, "0000000000001AAAA", ["a@one.test", "b@one.test"])
    loads = count_calls(monkeypatch, QueueStore, "load")
    writes = count_calls(monkeypatch, store_module, "write_atomically")
    unlinked = count_calls(monkeypatch, store_module.os, "unlink")
    h.scheduler.enqueue("0000000000001AAAA")  # as the intake does
    h.clock.advance(0)
    # One read for the attempt, one under the lock to record its results.
    assert len(loads) == 2
    assert writes == []
    assert unlinked == [tmp_path / f"0000000000001AAAA.{suffix}" for suffix in ("env", "msg")]
    assert h.worker.synced == [str(tmp_path)]
    assert h.store.ids() == [] and h.reports == []


def test_results_of_attempts_ending_together_share_one_directory_fsync(tmp_path, monkeypatch):
    ids = [f"000000000000{n}AAAA" for n in range(5)]
    for n, queue_id in enumerate(ids):
        queue(tmp_path, queue_id, [f"x@d{n}.test"])
    worker = BatchingWorker(automatic=False)
    h = Harness(tmp_path, worker=worker)
    for n in range(5):
        h.answers[f"x@d{n}.test"] = "451"
    h.start()
    worker.flush()
    assert len(h.calls) == 5 and len(worker.waiting) == 5
    fsyncs = count_calls(monkeypatch, store_module.os, "fsync")
    worker.flush()
    assert worker.batches[-1] == 5
    assert len(fsyncs) == 5 + 1  # each envelope, then the directory once
    assert worker.synced == [str(tmp_path)]
    assert all(h.store.load(queue_id).recipients[0].attempts == 1 for queue_id in ids)


def test_message_finished_while_it_was_read_is_reported_once(tmp_path):
    queue(tmp_path, "0000000000001AAAA", ["a@one.test", "b@two.test"])
    worker = BatchingWorker(automatic=False)
    h = Harness(tmp_path, worker=worker)
    h.answers["hold"] = True
    h.start()
    worker.flush()
    h.answers["b@two.test"] = "550"
    for d, recipients in h.pending:
        d.callback([h._outcome(r.address) for r in recipients])
    h.scheduler.enqueue("0000000000001AAAA")  # due again meanwhile
    h.clock.advance(0)
    assert len(worker.waiting) == 3  # both results, then the read
    worker.flush()
    worker.flush()
    assert len(h.calls) == 2
    assert h.reports == [("0000000000001AAAA", "failed", ["b@two.test"])]
    assert h.store.ids() == []


def test_results_not_written_beside_others_that_were_are_not_lost(tmp_path, monkeypatch):
    queue(tmp_path, "0000000000001AAAA", ["a@one.test", "b@two.test"])
    worker = BatchingWorker(automatic=False)
    h = Harness(tmp_path, worker=worker)
    h.answers["hold"] = True
    h.start()
    worker.flush()
    real, failures = store_module.write_atomically, [OSError(errno.ENOSPC, "No space left")]

    def full_once(path, data, *args, **options):
        if failures:
            raise failures.pop()
        real(path, data, *args, **options)

    monkeypatch.setattr(store_module, "write_atomically", full_once)
    for d, recipients in h.pending:  # both delivered; the first record fails
        d.callback([h._outcome(r.address) for r in recipients])
    while worker.waiting:
        worker.flush()
    assert len(h.calls) == 2 and h.reports == []
    assert h.store.ids() == []


def test_results_whose_write_was_reported_failed_but_landed_count_once(tmp_path, monkeypatch):
    """A failed directory fsync fails the write, which may be on disk all
    the same: laid over the envelope again, the results count once."""
    queue(tmp_path, "0000000000001AAAA", ["a@one.test"])
    h = Harness(tmp_path)
    h.answers["a@one.test"] = "451"
    h.start()
    real_update = QueueWriter.update

    def landed_but_failed(writer, queue_id, change):
        monkeypatch.setattr(QueueWriter, "update", real_update)  # once
        d = real_update(writer, queue_id, change)
        return d.addCallback(lambda _: defer.fail(OSError(errno.EIO, "Input/output error")))

    monkeypatch.setattr(QueueWriter, "update", landed_but_failed)
    h.clock.advance(300)
    assert h.store.load("0000000000001AAAA").recipients[0].attempts == 2
    h.clock.advance(600)  # the backoff of two attempts, not of three
    assert len(h.calls) == 3
    assert h.store.load("0000000000001AAAA").recipients[0].attempts == 3


def test_envelopes_are_read_written_and_removed_only_in_the_committer_thread(
    tmp_path, monkeypatch
):
    threads = set()
    for name in ("ids", "load", "update", "remove"):
        real = getattr(QueueStore, name)

        def on_thread(store, *args, real=real, **options):
            threads.add(threading.current_thread().name)
            return real(store, *args, **options)

        monkeypatch.setattr(QueueStore, name, on_thread)
    reactor = ThreadReactor()
    committer = Committer(reactor)
    try:
        queue(tmp_path, "0000000000001AAAA", ["bad@one.test", "good@two.test"])
        h = Harness(tmp_path, worker=committer)
        h.answers["bad@one.test"] = "550"
        h.scheduler.startService()
        while not h.reports or (tmp_path / "0000000000001AAAA.env").exists():
            function, args = reactor.calls.get(timeout=TIMEOUT)
            function(*args)
            h.clock.advance(0)
    finally:
        committer.stop()
    assert h.reports == [("0000000000001AAAA", "failed", ["bad@one.test"])]
    assert threads == {"twisted-mta-committer"}


def test_messages_waiting_for_a_slot_are_read_once_more_each(tmp_path, monkeypatch):
    """A backlog to one destination: when an attempt ends, one waiting
    message is read again for its slot, not every one of them."""
    h = Harness(tmp_path)
    h.answers["hold"] = True
    h.start()
    ids = [f"{n:013X}AAAA" for n in range(30)]
    loads = count_calls(monkeypatch, QueueStore, "load")
    for queue_id in ids:
        queue(tmp_path, queue_id, [f"{queue_id}@one.test"])
        h.scheduler.enqueue(queue_id)
    h.clock.advance(0)
    assert len(h.pending) == 5
    while h.pending:
        d, recipients = h.pending.pop(0)
        d.callback([h._outcome(r.address) for r in recipients])
        h.clock.advance(0)
    assert h.store.ids() == [] and len(h.calls) == 30
    # Read to plan, read again when released (all but the first five), and
    # read under the lock to record.
    assert len(loads) == 30 + 25 + 30
    assert [c[1] for c in h.calls] == ids  # the longest waiting first


def test_a_released_message_that_needs_no_slot_passes_it_on(tmp_path):
    ids = [f"{n:013X}AAAA" for n in range(7)]
    for queue_id in ids:
        queue(tmp_path, queue_id, [f"{queue_id}@one.test"])
    h = Harness(tmp_path)
    h.answers["hold"] = True
    h.start()
    assert len(h.pending) == 5
    h.store.remove(ids[5])  # ``twisted-mta queue delete`` while it waits
    d, recipients = h.pending.pop(0)
    d.callback([h._outcome(r.address) for r in recipients])
    assert [c[1] for c in h.calls][5:] == [ids[6]]
    assert len(h.pending) == 5


def test_a_backlog_through_the_committer_thread_is_tried_once_each_within_limits(tmp_path):
    ids = [f"{n:013X}AAAA" for n in range(40)]
    for queue_id in ids:
        queue(tmp_path, queue_id, [f"{queue_id}@one.test"])
    reactor = ThreadReactor()
    committer = Committer(reactor)
    h = Harness(tmp_path, worker=committer)
    h.answers["hold"] = True
    most = 0
    try:
        h.scheduler.startService()
        while h.store.ids() or h.pending:
            most = max(most, len(h.pending))
            if h.pending:  # answer one attempt at a time, as they come
                d, recipients = h.pending.pop(0)
                d.callback([h._outcome(r.address) for r in recipients])
            else:
                function, args = reactor.calls.get(timeout=TIMEOUT)
                function(*args)
            h.clock.advance(0)
    finally:
        committer.stop()
    assert sorted(c[1] for c in h.calls) == ids
    assert most == 5
