"""Make written files durable in batches, off the reactor thread.

A message is acknowledged only once its files are fsynced, renamed into
place and the directories holding them are fsynced.  Doing that on the
reactor thread serialises every session behind one disk flush; handing
each file to Twisted's thread pool costs a thread hand-off per message.
Instead one worker thread takes every commit that piled up while it was
busy and flushes them together: files are fsynced one after another (the
GIL is released meanwhile), and each directory is fsynced once per batch
however many messages went into it.  The reactor hears back once per batch.

The queue's reads and changes of envelopes run in the same thread and the
same batches (:meth:`Committer.call`): each change fsyncs its own file,
and the queue directory is fsynced once for every change and every new
message of the batch before any of them is reported.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads
from twisted.python.failure import Failure

from twisted_mta.storage.files import fsync_directory

T = TypeVar("T")


@dataclass
class PendingFile:
    """A written file in a temporary place, to be made durable at ``final``.

    ``prepare`` runs in the worker before the fsync; it is where extra
    copies are filled from another file, so that the reactor never copies.
    A file not to ``keep`` is only the source of such copies: it is
    removed once they are made.
    """

    fd: int
    temporary: str
    final: str
    prepare: Callable[[], None] | None = None
    keep: bool = True


@dataclass
class _Commit:
    files: Sequence[PendingFile]
    deferred: defer.Deferred[None]
    error: BaseException | None = None
    result: None = None

    def run(self) -> None:
        _make_durable(self.files)

    def directories(self) -> set[str]:
        return {os.path.dirname(f.final) for f in self.files if f.keep}

    def take_back(self) -> None:
        # The client will be told to retry, so a copy left in place would
        # be delivered twice.
        for pending in self.files:
            if pending.keep:
                _unlink_quietly(pending.final)


@dataclass
class _Call:
    work: Callable[[], tuple[Any, Collection[str]]]
    deferred: defer.Deferred[Any]
    error: BaseException | None = None
    result: Any = None
    changed: Collection[str] = ()

    def run(self) -> None:
        self.result, self.changed = self.work()

    def directories(self) -> set[str]:
        return set(self.changed)

    def take_back(self) -> None:
        """Nothing to undo: the caller hears that the change may be lost."""


_Item = _Commit | _Call


@dataclass
class Committer:
    """Run batched fsync + rename + directory fsync in one worker thread."""

    reactor: IReactorThreads
    _pending: list[_Item] = field(default_factory=list)
    _wakeup: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None
    _stopping: bool = False

    def commit(self, files: Sequence[PendingFile]) -> defer.Deferred[None]:
        """Fsync, rename and fsync the parent directories of ``files``.

        The Deferred fires once all of it is on disk, or fails with the first
        OSError (then no file of this commit was left at its final name).
        """
        d: defer.Deferred[None] = defer.Deferred()
        self._add(_Commit(files, d))
        return d

    def call(self, work: Callable[[], tuple[T, Collection[str]]]) -> defer.Deferred[T]:
        """Run ``work`` in the worker thread with the next batch.

        ``work`` returns its result and the directories whose entries it
        changed (renames, removals, with its files already fsynced).  The
        Deferred fires with the result once those directories are fsynced,
        or fails with what ``work`` raised or with the directory's fsync
        error (then the change may or may not be on disk).
        """
        d: defer.Deferred[T] = defer.Deferred()
        self._add(_Call(work, d))
        return d

    def _add(self, item: _Item) -> None:
        with self._wakeup:
            self._pending.append(item)
            self._wakeup.notify()
        self._ensure_thread()

    def stop(self) -> None:
        """Let the worker finish what it holds and exit."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, name="twisted-mta-committer", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._pending and not self._stopping:
                    self._wakeup.wait()
                batch, self._pending = self._pending, []
                if not batch and self._stopping:
                    return
            _flush_batch(batch)
            self.reactor.callFromThread(_report, batch)


def _flush_batch(batch: list[_Item]) -> None:
    for item in batch:
        try:
            item.run()
        except BaseException as error:  # reported to the Deferred, not lost
            item.error = error
    done = [item for item in batch if item.error is None]
    directories = set().union(*(item.directories() for item in done))
    for directory in sorted(directories):
        try:
            fsync_directory(directory)
        except OSError as error:
            _fail_items_in(directory, done, error)


def _fail_items_in(directory: str, batch: list[_Item], error: OSError) -> None:
    """Fail and take back every item whose ``directory`` may be lost."""
    for item in batch:
        if item.error is None and directory in item.directories():
            item.error = error
            item.take_back()


def _make_durable(files: Sequence[PendingFile]) -> None:
    """Fill, fsync, close and rename ``files``; all of them or none."""
    renamed: list[PendingFile] = []
    try:
        for pending in files:
            if pending.prepare is not None:
                pending.prepare()
            if pending.keep:
                os.fsync(pending.fd)
        # Closed only now: the copies are taken from the first file's fd.
        for pending in files:
            _close(pending)
        for pending in files:
            if pending.keep:
                os.rename(pending.temporary, pending.final)
                renamed.append(pending)
            else:
                _unlink_quietly(pending.temporary)
    except BaseException:
        for pending in files:
            discard(pending)
        for pending in renamed:
            _unlink_quietly(pending.final)
        raise


def _report(batch: list[_Item]) -> None:
    for item in batch:
        if item.error is None:
            item.deferred.callback(item.result)
        else:
            item.deferred.errback(Failure(item.error))


def discard(pending: PendingFile) -> None:
    """Close ``pending`` if still open and remove its temporary file."""
    _close(pending)
    _unlink_quietly(pending.temporary)


def _close(pending: PendingFile) -> None:
    # Marked closed first: a failing close() still releases the fd on Linux,
    # and retrying it could close a descriptor another thread just opened.
    fd, pending.fd = pending.fd, -1
    if fd >= 0:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    # Cleanup after a failure: its own error must not hide the first one.
    try:
        os.unlink(path)
    except OSError:
        pass
