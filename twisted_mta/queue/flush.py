"""The queue in the running daemon: the scheduler and its wake-up calls.

``twisted-mta queue`` changes envelopes itself and then rewrites
``queue/control/flush``; this service hears that (inotify on that folder,
else a poll of the file's time every few seconds) and has the scheduler
look at the whole queue again.
"""

from __future__ import annotations

from pathlib import Path

from twisted.application import service
from twisted.internet import task

from twisted_mta.queue.control import FLUSH_FILE, control_dir
from twisted_mta.queue.scheduler import Scheduler
from twisted_mta.watch import watch_directory

POLL_INTERVAL = 5.0


class FlushListener(service.Service):
    def __init__(self, queue_dir: Path, scheduler: Scheduler, reactor) -> None:
        self.directory = control_dir(queue_dir)
        self.scheduler = scheduler
        self.reactor = reactor
        self._notifier = None
        self._poll: task.LoopingCall | None = None
        self._stamp = self._flush_time()

    def startService(self) -> None:
        super().startService()
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self._notifier = watch_directory(self.reactor, self.directory, self._arrived)
        if self._notifier is None:
            self._poll = task.LoopingCall(self._check)
            self._poll.clock = self.reactor
            self._poll.start(POLL_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        if self._poll is not None and self._poll.running:
            self._poll.stop()

    def _arrived(self, name: str) -> None:
        if name == FLUSH_FILE:
            self.scheduler.rescan()

    def _check(self) -> None:
        stamp = self._flush_time()
        if stamp != self._stamp:
            self._stamp = stamp
            self.scheduler.rescan()

    def _flush_time(self) -> int | None:
        try:
            return (self.directory / FLUSH_FILE).stat().st_mtime_ns
        except OSError:
            return None
