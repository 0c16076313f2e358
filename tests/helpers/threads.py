"""A stand-in reactor for code that reports back from a worker thread."""

from __future__ import annotations

import queue

from twisted.internet import defer

TIMEOUT = 10.0


class ThreadReactor:
    """Just enough of a reactor: the worker's reports run when a test waits."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()
        self.reports = 0

    def callFromThread(self, function, *args) -> None:
        self.calls.put((function, args))

    def results(self, *deferreds: defer.Deferred) -> list:
        """Run reports until every Deferred has fired; their results."""
        results: list = [None] * len(deferreds)
        fired: set[int] = set()
        for index, d in enumerate(deferreds):
            d.addBoth(lambda result, i=index: (results.__setitem__(i, result), fired.add(i)))
        while len(fired) < len(deferreds):
            function, args = self.calls.get(timeout=TIMEOUT)
            self.reports += 1
            function(*args)
        return results
