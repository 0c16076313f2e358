"""The daemon's reads and changes of queued envelopes, off the reactor thread.

Each runs in the committer's thread, in the batches it makes of the
intake's new messages: a change takes the queue lock, reads the envelope,
writes and fsyncs its new version and renames it into place (or removes
the message), as :class:`~twisted_mta.queue.store.QueueStore` does for the
``twisted-mta queue`` command; the queue directory is then fsynced once
for the whole batch.  Only after that does the reactor hear of it, so
nothing is built on a change (a removal, a bounce) before it is durable.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol, TypeVar

from twisted.internet import defer

from twisted_mta.queue.store import CorruptMessage, QueueStore
from twisted_mta.storage.envelope import QueuedMessage, UnknownMessage

T = TypeVar("T")


class Worker(Protocol):
    """What runs the jobs: :class:`~twisted_mta.storage.committer.Committer`."""

    def call(self, work: Callable[[], tuple[T, Collection[str]]]) -> defer.Deferred[T]: ...


@dataclass(frozen=True)
class QueueWriter:
    """``store``'s daemon-side operations, each a job of ``worker``."""

    store: QueueStore
    worker: Worker

    def load(self, queue_id: str) -> defer.Deferred[QueuedMessage]:
        """The envelope as it is on disk (UnknownMessage, CorruptMessage)."""
        return self.worker.call(lambda: (self.store.load(queue_id), ()))

    def scan(self) -> defer.Deferred[list[tuple[str, QueuedMessage | None]]]:
        """Every queued message, oldest first, with its envelope, or None
        where it could not be read (gone meanwhile, or damaged)."""

        def work() -> tuple[list[tuple[str, QueuedMessage | None]], Collection[str]]:
            return [(queue_id, self._readable(queue_id)) for queue_id in self.store.ids()], ()

        return self.worker.call(work)

    def _readable(self, queue_id: str) -> QueuedMessage | None:
        try:
            return self.store.load(queue_id)
        except (UnknownMessage, CorruptMessage):
            return None

    def update(
        self, queue_id: str, change: Callable[[QueuedMessage], None]
    ) -> defer.Deferred[QueuedMessage]:
        """``QueueStore.update``: fires with the changed message once it is
        durable (removed, if every recipient is sent).  ``change`` runs in
        the worker thread: it must only change the message it is given."""

        def work() -> tuple[QueuedMessage, Collection[str]]:
            message = self.store.update(queue_id, change, sync_directory=False)
            return message, self._directory()

        return self.worker.call(work)

    def remove(self, queue_id: str) -> defer.Deferred[None]:
        """``QueueStore.remove``: fires once the removal is durable."""

        def work() -> tuple[None, Collection[str]]:
            self.store.remove(queue_id, sync_directory=False)
            return None, self._directory()

        return self.worker.call(work)

    def _directory(self) -> Collection[str]:
        return (str(self.store.directory),)
