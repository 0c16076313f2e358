"""The maildrop pickup: messages handed over by ``twisted-mta-sendmail``.

The command writes each message as a file into ``spool/maildrop/`` (the
format is :mod:`twisted_mta.storage.drop`). The daemon's
:class:`MaildropService` picks the files up at start, at once when one
arrives (inotify; without it, a poll each second), and retries failed
ones at a slow rescan. Each is injected like an SMTP message
(``inject``) and removed only once that is durable: a crash in between
delivers it again rather than never. A file that cannot be read as a
drop is moved to ``maildrop/bad/`` with a log line, for the operator.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mta.intake.acceptance import MailSystem
from twisted_mta.intake.inject import SENDMAIL, InjectionRefused, inject
from twisted_mta.mail.address import PathError
from twisted_mta.storage.drop import (
    BAD,
    MalformedDrop,
    is_drop_name,
    prepare_directory,
    read_drop,
)
from twisted_mta.watch import watch_directory

POLL_INTERVAL = 1.0  # without inotify: the contract's "within a second"
RESCAN_INTERVAL = 30.0  # with inotify: retries, and any event missed

_log = Logger()



class MaildropService(service.Service):
    """Inject every drop that appears in ``directory``, one at a time."""

    name = "maildrop"

    def __init__(self, directory: Path, system: MailSystem, reactor) -> None:
        self.directory = directory
        self.system = system
        self._reactor = reactor
        self._waiting: collections.deque[str] = collections.deque()
        self._known: set[str] = set()  # waiting or being injected
        self._retry_after: dict[str, float] = {}
        self._current: defer.Deferred[None] | None = None
        self._kicking = False
        self._notifier = None
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        try:
            prepare_directory(self.directory)
        except OSError as error:
            _log.info(
                "maildrop: cannot create {directory}: {reason}; not watched",
                directory=str(self.directory),
                reason=error.strerror,
            )
            return
        self._notifier = watch_directory(self._reactor, self.directory, self._notified)
        interval = RESCAN_INTERVAL if self._notifier is not None else POLL_INTERVAL
        how = "inotify" if self._notifier is not None else f"polling every {interval:g}s"
        _log.info("maildrop: watching {directory} ({how})", directory=str(self.directory), how=how)
        self._loop = task.LoopingCall(self.scan)
        self._loop.clock = self._reactor
        self._loop.start(interval, now=True)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        self._known.difference_update(self._waiting)
        self._waiting.clear()
        return self._current

    def _notified(self, name: str) -> None:
        self._add([name])

    def scan(self) -> None:
        """Queue every drop in the directory (at start, and as a fallback)."""
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as error:
            _log.info(
                "maildrop: cannot read {directory}: {reason}",
                directory=str(self.directory),
                reason=error.strerror,
            )
            return
        now = time.monotonic()
        self._add([n for n in names if self._retry_after.get(n, 0.0) <= now])

    def _add(self, names: Sequence[str]) -> None:
        for name in names:
            if is_drop_name(name) and name not in self._known:
                self._known.add(name)
                self._waiting.append(name)
        self._kick()

    def _kick(self) -> None:
        """Start the next drop unless one is in progress.

        Re-entrant calls (a drop finished synchronously) return at once;
        the loop below goes on, so the stack does not grow with the queue.
        """
        if self._kicking:
            return
        self._kicking = True
        try:
            while self._waiting and self._current is None and self.running:
                name = self._waiting.popleft()
                self._current = self.pickup(name)
                self._current.addBoth(self._finished, name)
        finally:
            self._kicking = False

    def _finished(self, _result: None, name: str) -> None:
        self._current = None
        self._known.discard(name)
        self._kick()

    def pickup(self, name: str) -> defer.Deferred[None]:
        """Inject one drop and remove it once stored; never fails."""
        try:
            stream, user, envelope = read_drop(self.directory / name)
        except FileNotFoundError:
            return defer.succeed(None)  # already handled
        except MalformedDrop as error:
            self._set_aside(name, str(error))
            return defer.succeed(None)
        except OSError as error:
            self._will_retry(name, error.strerror or str(error))
            return defer.succeed(None)
        if envelope.user != user:
            _log.info(
                "maildrop: {name} claims user {claimed!r}, owned by {owner}",
                name=name,
                claimed=envelope.user,
                owner=user,
            )
        d = inject(
            self.system, envelope.sender, envelope.recipients, stream, origin=SENDMAIL, user=user
        )
        d.addCallbacks(self._injected, self._not_injected, (name,), None, (name,))
        d.addBoth(_close, stream)
        return d

    def _injected(self, queue_id: str, name: str) -> None:
        self._remove(name)

    def _not_injected(self, failure: Failure, name: str) -> None:
        if failure.check(InjectionRefused):
            self._remove(name)  # the refusals were logged and bounced
        elif failure.check(PathError):
            self._set_aside(name, f"bad sender address: {failure.value}")
        else:
            self._will_retry(name, failure.getErrorMessage())

    def _will_retry(self, name: str, reason: str) -> None:
        """Leave the drop for a later scan, not the next poll."""
        self._retry_after[name] = time.monotonic() + RESCAN_INTERVAL
        _log.info("maildrop: {name} not injected, will retry: {reason}", name=name, reason=reason)

    def _remove(self, name: str) -> None:
        self._retry_after.pop(name, None)
        try:
            os.unlink(self.directory / name)
        except OSError as error:
            # Injected once more at the next scan: at least once, never lost.
            _log.info("maildrop: cannot remove {name}: {reason}", name=name, reason=error.strerror)

    def _set_aside(self, name: str, reason: str) -> None:
        self._retry_after.pop(name, None)
        bad = self.directory / BAD
        try:
            os.makedirs(bad, mode=0o700, exist_ok=True)
            os.rename(self.directory / name, bad / name)
        except OSError as error:
            self._will_retry(name, f"{reason}, and cannot be moved to {BAD}/: {error.strerror}")
            return
        _log.info(
            "maildrop: {name} moved to {folder}/: {reason}",
            name=name,
            folder=BAD,
            reason=reason,
        )


def _close(result, stream: BinaryIO):
    stream.close()
    return result
