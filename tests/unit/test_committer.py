"""The committer: batched fsync + rename + directory fsync in one thread."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from twisted.python.failure import Failure

from tests.helpers.threads import TIMEOUT, ThreadReactor
from twisted_mta.storage import committer as committer_module
from twisted_mta.storage.committer import Committer, PendingFile


@pytest.fixture
def reactor():
    return ThreadReactor()


@pytest.fixture
def committer(reactor):
    worker = Committer(reactor)
    yield worker
    worker.stop()


def written(folder: Path, name: str, content: bytes) -> PendingFile:
    """A file with ``content`` in ``folder/tmp``, headed for ``folder/new``."""
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    (folder / "new").mkdir(exist_ok=True)
    temporary = folder / "tmp" / name
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content)
    return PendingFile(fd, str(temporary), str(folder / "new" / name))


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def directory_syncs(monkeypatch) -> list[str]:
    """The directories the committer fsyncs, in order."""
    synced: list[str] = []
    real = committer_module.fsync_directory

    def record(path: str) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(committer_module, "fsync_directory", record)
    return synced


def test_commit_renames_into_place(tmp_path, reactor, committer, directory_syncs):
    pending = written(tmp_path, "one", b"hello")
    [result] = reactor.results(committer.commit([pending]))
    assert result is None
    assert files_in(tmp_path) == ["new/one"]
    assert (tmp_path / "new" / "one").read_bytes() == b"hello"
    assert pending.fd == -1
    assert directory_syncs == [str(tmp_path / "new")]


def test_commits_that_wait_are_flushed_as_one_batch(
    tmp_path, reactor, committer, directory_syncs
):
    """While the worker is busy, commits pile up; then each directory is
    fsynced once for all of them, and the reactor hears back once."""
    busy, release = threading.Event(), threading.Event()
    first = written(tmp_path / "a", "first", b"1")
    first.prepare = lambda: (busy.set(), release.wait(TIMEOUT))
    blocked = committer.commit([first])
    assert busy.wait(TIMEOUT)
    waiting = [
        committer.commit([written(tmp_path / folder, f"m{n}", b"m") for folder in "ab"])
        for n in range(5)
    ]
    release.set()
    results = reactor.results(blocked, *waiting)
    assert results == [None] * 6
    assert reactor.reports == 2
    a, b = str(tmp_path / "a" / "new"), str(tmp_path / "b" / "new")
    assert directory_syncs[0] == a and sorted(directory_syncs[1:]) == [a, b]
    assert len(files_in(tmp_path)) == 11


def test_prepare_fills_a_copy_before_the_fsync(tmp_path, reactor, committer):
    source = written(tmp_path, "source", b"shared body")
    copy = written(tmp_path, "copy", b"header\n")
    copy.prepare = lambda: os.copy_file_range(source.fd, copy.fd, 11, 0)
    reactor.results(committer.commit([source, copy]))
    assert (tmp_path / "new" / "copy").read_bytes() == b"header\nshared body"


def test_failed_prepare_fails_that_commit_only_and_leaves_nothing(tmp_path, reactor, committer):
    def disk_full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    good = written(tmp_path / "good", "g", b"g")
    doomed = [written(tmp_path / "bad", "one", b"1"), written(tmp_path / "bad", "two", b"2")]
    doomed[1].prepare = disk_full
    ok, failed = reactor.results(committer.commit([good]), committer.commit(doomed))
    assert ok is None
    assert isinstance(failed, Failure) and failed.value.errno == errno.ENOSPC
    assert files_in(tmp_path / "bad") == []
    assert files_in(tmp_path / "good") == ["new/g"]
    assert all(pending.fd == -1 for pending in doomed)


def test_failed_file_fsync_fails_the_commit_and_leaves_nothing(
    tmp_path, reactor, committer, monkeypatch
):
    doomed = [written(tmp_path, "one", b"1"), written(tmp_path, "two", b"2")]
    fsync, broken = os.fsync, doomed[1].fd

    def failing_fsync(fd: int) -> None:
        if fd == broken:
            raise OSError(errno.EIO, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    [failure] = reactor.results(committer.commit(doomed))
    assert failure.value.errno == errno.EIO
    assert files_in(tmp_path) == []


def test_failed_rename_takes_back_the_files_already_renamed(tmp_path, reactor, committer):
    first = written(tmp_path / "a", "first", b"1")
    second = written(tmp_path / "b", "second", b"2")
    second.final = str(tmp_path / "missing" / "second")
    [failure] = reactor.results(committer.commit([first, second]))
    assert failure.value.errno == errno.ENOENT
    assert files_in(tmp_path) == []


def test_failed_directory_fsync_takes_back_that_commit(tmp_path, reactor, committer, monkeypatch):
    real = committer_module.fsync_directory
    broken = str(tmp_path / "b" / "new")

    def fsync(path: str) -> None:
        if path == broken:
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(committer_module, "fsync_directory", fsync)
    busy, release = threading.Event(), threading.Event()
    blocker = written(tmp_path / "c", "blocker", b"")
    blocker.prepare = lambda: (busy.set(), release.wait(TIMEOUT))
    first = committer.commit([blocker])
    assert busy.wait(TIMEOUT)
    spanning = committer.commit([written(tmp_path / folder, "x", b"x") for folder in "ab"])
    elsewhere = committer.commit([written(tmp_path / "a", "y", b"y")])
    release.set()
    _, failed, ok = reactor.results(first, spanning, elsewhere)
    assert failed.value.errno == errno.EIO
    assert ok is None
    assert files_in(tmp_path) == ["a/new/y", "c/new/blocker"]


def test_worker_starts_again_after_stop(tmp_path, reactor, committer):
    reactor.results(committer.commit([written(tmp_path, "before", b"")]))
    committer.stop()
    reactor.results(committer.commit([written(tmp_path, "after", b"")]))
    assert files_in(tmp_path) == ["new/after", "new/before"]


def test_calls_share_the_batch_and_its_directory_fsyncs(
    tmp_path, reactor, committer, directory_syncs
):
    """Jobs that wait behind a busy worker run as one batch with the commits
    that waited too; a directory several of them changed is fsynced once,
    before any of them is reported."""
    busy, release = threading.Event(), threading.Event()
    blocker = written(tmp_path / "c", "blocker", b"")
    blocker.prepare = lambda: (busy.set(), release.wait(TIMEOUT))
    first = committer.commit([blocker])
    assert busy.wait(TIMEOUT)
    changed = str(tmp_path / "a" / "new")
    jobs = [committer.call(lambda n=n: (n, [changed])) for n in range(3)]
    reader = committer.call(lambda: ("read", ()))
    arriving = committer.commit([written(tmp_path / "a", "m", b"m")])
    synced_when_reported: list[list[str]] = []
    jobs[0].addCallback(lambda n: synced_when_reported.append(list(directory_syncs)) or n)
    release.set()
    assert reactor.results(first, *jobs, reader, arriving) == [None, 0, 1, 2, "read", None]
    assert reactor.reports == 2  # the blocker, then all that waited
    assert sorted(directory_syncs) == sorted([str(tmp_path / "c" / "new"), changed])
    assert synced_when_reported == [directory_syncs]


def test_failing_call_fails_alone(tmp_path, reactor, committer):
    def disk_full() -> tuple[None, list[str]]:
        raise OSError(errno.ENOSPC, "No space left on device")

    failed, ok = reactor.results(committer.call(disk_full), committer.call(lambda: (1, ())))
    assert failed.value.errno == errno.ENOSPC and ok == 1


def test_failed_directory_fsync_fails_the_calls_that_changed_it(
    tmp_path, reactor, committer, monkeypatch
):
    broken = str(tmp_path / "broken")

    def fsync(path: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(committer_module, "fsync_directory", fsync)
    failed, untouched = reactor.results(
        committer.call(lambda: (1, [broken])), committer.call(lambda: (2, ()))
    )
    assert failed.value.errno == errno.EIO and untouched == 2
