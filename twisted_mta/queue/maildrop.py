"""The maildrop: messages handed over by ``twisted-mta-sendmail``.

The command cannot talk to the daemon (it may be down) and must not lose a
message, so it writes each one as a file into ``spool/maildrop/``: a JSON
envelope on the first line, then the message.  The file is written under a
hidden temporary name, fsynced, renamed into place and the directory
fsynced, so a visible name is always a complete file.

The daemon's :class:`MaildropService` picks the files up at start, at once
when one arrives (inotify; without it, a poll each second), and retries
failed ones at a slow rescan.  Each is injected like an SMTP message
(``inject``) and removed only once that is durable: a crash in between
delivers it again rather than never.  A file that cannot be read as a drop
is moved to ``maildrop/bad/`` with a log line, for the operator.

The directory is made mode 1733 when the daemon creates it (like /tmp but
not listable), so that any local user can drop mail but not see or remove
another's; drops are mode 0644 so that an unprivileged daemon reads them.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import pwd
import secrets
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from twisted.application import service
from twisted.internet import defer, task
from twisted.python import log
from twisted.python.failure import Failure

from twisted_mta.files import fsync_directory
from twisted_mta.queue.inject import SENDMAIL, InjectionRefused, inject
from twisted_mta.smtp.address import PathError
from twisted_mta.smtp.policy import MailSystem
from twisted_mta.watch import watch_directory

DROP_VERSION = 1
MAX_ENVELOPE = 1024 * 1024  # the JSON line; room for thousands of recipients
DIRECTORY_MODE = 0o1733
FILE_MODE = 0o644
BAD = "bad"
POLL_INTERVAL = 1.0  # without inotify: the contract's "within a second"
RESCAN_INTERVAL = 30.0  # with inotify: retries, and any event missed
# A symbolic link (O_NOFOLLOW), or a file the daemon may not read.
_NEVER_READABLE = frozenset({errno.ELOOP, errno.EACCES, errno.EPERM})


class MalformedDrop(ValueError):
    """A maildrop file that is not one this module wrote."""


@dataclass(frozen=True)
class DropEnvelope:
    """Who a dropped message is from and for, and who dropped it when."""

    sender: str
    recipients: tuple[str, ...]
    user: str
    time: float

    def to_line(self) -> bytes:
        document = {
            "version": DROP_VERSION,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "user": self.user,
            "time": self.time,
        }
        return json.dumps(document, ensure_ascii=False).encode("utf-8") + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> DropEnvelope:
        """Parse the first line of a drop; raises MalformedDrop."""
        if not line.endswith(b"\n"):
            raise MalformedDrop("no complete envelope line")
        try:
            document = json.loads(line)
        except ValueError as error:
            raise MalformedDrop(f"envelope is not JSON: {error}") from None
        if not isinstance(document, dict) or document.get("version") != DROP_VERSION:
            raise MalformedDrop("unknown envelope version")
        return cls(
            sender=_field(document, "sender", str),
            recipients=tuple(_recipients(document)),
            user=_field(document, "user", str),
            time=float(_field(document, "time", (int, float))),
        )


def _field(document: dict, key: str, kind: type | tuple[type, ...]):
    value = document.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MalformedDrop(f"envelope field {key!r} missing or of the wrong type")
    return value


def _recipients(document: dict) -> list[str]:
    recipients = _field(document, "recipients", list)
    if not recipients or not all(isinstance(r, str) for r in recipients):
        raise MalformedDrop("envelope field 'recipients' must be a list of addresses")
    return recipients


def write_drop(directory: Path, envelope: DropEnvelope, message: bytes) -> Path:
    """Write one drop durably; its final path.  Raises OSError.

    Temporary name, fsync, rename, fsync of the directory: once this
    returns, the message survives a crash, and the daemon never sees half
    a file (it ignores hidden names).
    """
    name = f"{time.time_ns():020d}.{os.getpid()}.{secrets.token_hex(8)}"
    final = directory / name
    temporary = directory / f".{name}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with os.fdopen(os.open(temporary, flags, FILE_MODE), "wb") as stream:
            stream.write(envelope.to_line())
            stream.write(message)
            stream.flush()
            os.fchmod(stream.fileno(), FILE_MODE)  # whatever the umask
            os.fsync(stream.fileno())
        os.rename(temporary, final)
    except BaseException:
        _remove_quietly(temporary)
        raise
    fsync_directory(str(directory))
    return final


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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
            log.msg(f"maildrop: cannot create {self.directory}: {error.strerror}; not watched")
            return
        self._notifier = watch_directory(self._reactor, self.directory, self._notified)
        interval = RESCAN_INTERVAL if self._notifier is not None else POLL_INTERVAL
        how = "inotify" if self._notifier is not None else f"polling every {interval:g}s"
        log.msg(f"maildrop: watching {self.directory} ({how})")
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
            log.msg(f"maildrop: cannot read {self.directory}: {error.strerror}")
            return
        now = time.monotonic()
        self._add([n for n in names if self._retry_after.get(n, 0.0) <= now])

    def _add(self, names: Sequence[str]) -> None:
        for name in names:
            if _is_drop_name(name) and name not in self._known:
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
            stream, user, envelope = _read_drop(self.directory / name)
        except FileNotFoundError:
            return defer.succeed(None)  # already handled
        except MalformedDrop as error:
            self._set_aside(name, str(error))
            return defer.succeed(None)
        except OSError as error:
            self._will_retry(name, error.strerror or str(error))
            return defer.succeed(None)
        if envelope.user != user:
            log.msg(f"maildrop: {name} claims user {envelope.user!r}, owned by {user}")
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
        log.msg(f"maildrop: {name} not injected, will retry: {reason}")

    def _remove(self, name: str) -> None:
        self._retry_after.pop(name, None)
        try:
            os.unlink(self.directory / name)
        except OSError as error:
            # Injected once more at the next scan: at least once, never lost.
            log.msg(f"maildrop: cannot remove {name}: {error.strerror}")

    def _set_aside(self, name: str, reason: str) -> None:
        self._retry_after.pop(name, None)
        bad = self.directory / BAD
        try:
            os.makedirs(bad, mode=0o700, exist_ok=True)
            os.rename(self.directory / name, bad / name)
        except OSError as error:
            self._will_retry(name, f"{reason}, and cannot be moved to {BAD}/: {error.strerror}")
            return
        log.msg(f"maildrop: {name} moved to {BAD}/: {reason}")


def prepare_directory(directory: Path) -> None:
    """Create the maildrop (mode 1733) if it is missing."""
    try:
        os.mkdir(directory, DIRECTORY_MODE)
    except FileExistsError:
        return
    os.chmod(directory, DIRECTORY_MODE)  # the umask took bits away
    fsync_directory(str(directory.parent))


def _is_drop_name(name: str) -> bool:
    """Hidden names are files being written; ``bad`` is the set-aside folder."""
    return not name.startswith(".") and name != BAD


def _read_drop(path: Path) -> tuple[BinaryIO, str, DropEnvelope]:
    """Open a drop and read its envelope: the stream, at the message; the
    login name of the file's owner (who really dropped it); the envelope.

    Links are not followed and a FIFO does not block.  Raises
    MalformedDrop for what will never be a drop, OSError otherwise.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in _NEVER_READABLE:
            raise MalformedDrop(f"cannot be opened: {error.strerror}") from None
        raise
    stream = os.fdopen(fd, "rb")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MalformedDrop("not a regular file")
        if info.st_nlink != 1:
            # A hard link to a file its maker could not otherwise send.
            raise MalformedDrop("has other hard links")
        envelope = DropEnvelope.from_line(stream.readline(MAX_ENVELOPE + 1))
    except BaseException:
        stream.close()
        raise
    return stream, _login_name(info.st_uid), envelope


def _login_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _close(result, stream: BinaryIO):
    stream.close()
    return result
