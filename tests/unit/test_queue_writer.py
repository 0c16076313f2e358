"""The queue writer: envelope reads and changes in the committer's batches."""

from __future__ import annotations

import errno
import os
import threading

import pytest
from twisted.python.failure import Failure

from tests.helpers.threads import TIMEOUT, ThreadReactor
from twisted_mta.queue import store as store_module
from twisted_mta.queue.store import QueueStore
from twisted_mta.queue.writer import QueueWriter
from twisted_mta.storage import committer as committer_module
from twisted_mta.storage.committer import Committer, PendingFile
from twisted_mta.storage.envelope import SENT, Envelope, UnknownMessage

IDS = [f"000000000000{n}AAAA" for n in range(4)]


@pytest.fixture
def reactor():
    return ThreadReactor()


@pytest.fixture
def committer(reactor):
    worker = Committer(reactor)
    yield worker
    worker.stop()


@pytest.fixture
def writer(tmp_path, committer):
    for queue_id in IDS:
        envelope = Envelope("s@example.org", ("a@one.test", "b@one.test"), {}, "7BIT", False)
        (tmp_path / f"{queue_id}.msg").write_bytes(b"Subject: x\n\nbody\n")
        (tmp_path / f"{queue_id}.env").write_bytes(envelope.to_json(queue_id, 17, 0.0))
    return QueueWriter(QueueStore(tmp_path), committer)


@pytest.fixture
def fsyncs(monkeypatch) -> list[int]:
    """Every fsync, of files and directories alike."""
    calls: list[int] = []
    real = os.fsync

    def record(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def busy(tmp_path, committer) -> tuple[threading.Event, object]:
    """Hold the worker in a commit until the Event is set, so that what
    comes next piles up into one batch; the commit's Deferred."""
    started, release = threading.Event(), threading.Event()
    (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "elsewhere" / "blocker"
    fd = os.open(f"{path}.tmp", os.O_RDWR | os.O_CREAT, 0o600)
    blocker = PendingFile(fd, f"{path}.tmp", str(path))
    blocker.prepare = lambda: (started.set(), release.wait(TIMEOUT))
    d = committer.commit([blocker])
    assert started.wait(TIMEOUT)
    return release, d


def mark_first_sent(message) -> None:
    message.recipients[0].state = SENT


def test_updates_that_wait_share_one_directory_fsync(
    tmp_path, reactor, committer, writer, fsyncs, monkeypatch
):
    release, blocked = busy(tmp_path, committer)
    synced: list[str] = []
    real = committer_module.fsync_directory
    monkeypatch.setattr(committer_module, "fsync_directory", lambda p: (synced.append(p), real(p)))
    updates = [writer.update(queue_id, mark_first_sent) for queue_id in IDS]
    release.set()
    results = reactor.results(blocked, *updates)
    assert [m.recipients[0].state for m in results[1:]] == [SENT] * 4
    assert synced.count(str(tmp_path)) == 1
    # The blocker, each envelope, then two directories (the blocker's, the queue).
    assert len(fsyncs) == 1 + len(IDS) + 2
    assert all(writer.store.load(q).recipients[0].state == SENT for q in IDS)


def test_the_last_delivery_removes_without_writing_and_fires_once_durable(
    tmp_path, reactor, writer, monkeypatch
):
    events: list[str] = []
    real = committer_module.fsync_directory
    monkeypatch.setattr(
        committer_module, "fsync_directory", lambda p: (events.append("directory"), real(p))
    )
    monkeypatch.setattr(store_module, "write_atomically", lambda *a, **k: events.append("write"))

    def all_sent(message) -> None:
        for recipient in message.recipients:
            recipient.state = SENT

    d = writer.update(IDS[0], all_sent)
    d.addCallback(lambda _: events.append("reported"))
    reactor.results(d)
    assert events == ["directory", "reported"]
    assert not (tmp_path / f"{IDS[0]}.env").exists() and not (tmp_path / f"{IDS[0]}.msg").exists()


def test_a_full_disk_fails_that_update_alone_and_leaves_the_envelope(
    tmp_path, reactor, writer, monkeypatch
):
    before = (tmp_path / f"{IDS[0]}.env").read_bytes()
    real = store_module.write_atomically

    def full_for_the_first(path, data, *args, **options):
        if path.name.startswith(IDS[0]):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, *args, **options)

    monkeypatch.setattr(store_module, "write_atomically", full_for_the_first)
    failed, updated = reactor.results(
        writer.update(IDS[0], mark_first_sent), writer.update(IDS[1], mark_first_sent)
    )
    assert isinstance(failed, Failure) and failed.value.errno == errno.ENOSPC
    assert updated.recipients[0].state == SENT
    assert (tmp_path / f"{IDS[0]}.env").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_load_and_remove(tmp_path, reactor, writer):
    message, removed = reactor.results(writer.load(IDS[0]), writer.remove(IDS[0]))
    assert (message.id, removed) == (IDS[0], None)
    [gone] = reactor.results(writer.load(IDS[0]))
    assert gone.check(UnknownMessage)


def test_scan_reads_the_whole_queue_in_the_worker(tmp_path, reactor, writer):
    (tmp_path / f"{IDS[1]}.env").write_bytes(b"{damaged")
    [found] = reactor.results(writer.scan())
    assert [queue_id for queue_id, _ in found] == IDS
    assert [message is None for _, message in found] == [False, True, False, False]
