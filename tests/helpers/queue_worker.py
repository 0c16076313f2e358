"""The committer's contract for queue jobs, without its thread."""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

from twisted_mta.storage.files import fsync_directory


class BatchingWorker:
    """Jobs wait until :meth:`flush` runs them as one batch: each job, then
    one fsync per directory they changed, then their Deferreds in order.
    ``automatic`` flushes at each call, as an idle committer would."""

    def __init__(self, automatic: bool = True) -> None:
        self.automatic = automatic
        self.waiting: list = []
        self.batches: list[int] = []
        self.synced: list[str] = []

    def call(self, work) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((work, d))
        if self.automatic:
            self.flush()
        return d

    def flush(self) -> None:
        batch, self.waiting = self.waiting, []
        done = []
        for work, d in batch:
            try:
                result, changed = work()
            except Exception:
                done.append((d, Failure(), ()))
            else:
                done.append((d, result, changed))
        for directory in sorted({name for *_, changed in done for name in changed}):
            fsync_directory(directory)
            self.synced.append(directory)
        self.batches.append(len(batch))
        for d, result, _ in done:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
