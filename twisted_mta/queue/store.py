"""The queue on disk: read, change and remove queued messages safely.

A queued message is ``queue/<id>.msg`` (its bytes, LF line endings) and
``queue/<id>.env`` (the JSON envelope written at intake, see ``spool``).
The envelope is changed only by writing a new one beside it, fsyncing it
and renaming it over the old one, so a crash leaves either version.  The
daemon and the ``twisted-mta queue`` command both change envelopes; each
read-change-write holds ``queue/.lock`` (an flock, a few microseconds), so
neither overwrites the other's change.  A message is removed envelope
first: a ``.msg`` left without its ``.env`` is cleaned up at the next start.
The daemon's changes leave the directory fsync to the committer thread,
which does it once for a batch of them (see ``queue.writer``).

An envelope that cannot be read (damaged by hand, or written by another
version) is :class:`CorruptMessage`; the daemon moves it with its ``.msg``
into ``queue/corrupt/`` for the administrator, like Postfix's corrupt
queue, so that one bad file stops nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from twisted_mta.storage.envelope import (
    SENT,
    QueuedMessage,
    UnknownMessage,
    checked_id,
    is_queue_id,
)
from twisted_mta.storage.files import fsync_directory, write_atomically

CORRUPT_DIR = "corrupt"


class CorruptMessage(ValueError):
    """The message's envelope cannot be read."""


def delivered(message: QueuedMessage) -> bool:
    """Every recipient sent: the store removes such a message rather than
    write its envelope."""
    return all(r.state == SENT for r in message.recipients)


@dataclass(frozen=True)
class QueueStore:
    directory: Path

    def ids(self) -> list[str]:
        """Ids of complete queued messages, oldest first."""
        names = set(os.listdir(self.directory))
        return sorted(
            name[:-4]
            for name in names
            if name.endswith(".env") and is_queue_id(name[:-4]) and f"{name[:-4]}.msg" in names
        )

    def data_path(self, queue_id: str) -> Path:
        return self.directory / f"{checked_id(queue_id)}.msg"

    def load(self, queue_id: str) -> QueuedMessage:
        path = self.directory / f"{checked_id(queue_id)}.env"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UnknownMessage(queue_id) from None
        try:
            return QueuedMessage.from_json(data)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise CorruptMessage(f"{queue_id}: {error}") from None

    def messages(self) -> Iterator[QueuedMessage]:
        """The readable queued messages, oldest first."""
        for queue_id in self.ids():
            try:
                yield self.load(queue_id)
            except (UnknownMessage, CorruptMessage):
                continue

    def quarantine(self, queue_id: str) -> str | None:
        """Move a message whose envelope cannot be read into ``corrupt/``;
        the reason, or None if it turned out readable or gone."""
        with self._locked():
            try:
                self.load(queue_id)
                return None
            except UnknownMessage:
                return None
            except CorruptMessage as error:
                reason = str(error).partition(": ")[2]
            corrupt = self.directory / CORRUPT_DIR
            corrupt.mkdir(mode=0o700, exist_ok=True)
            for suffix in ("msg", "env"):  # the envelope last, as at intake
                name = f"{queue_id}.{suffix}"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.directory / name, corrupt / name)
            fsync_directory(str(corrupt))
            fsync_directory(str(self.directory))
            return reason

    def update(
        self,
        queue_id: str,
        change: Callable[[QueuedMessage], None],
        sync_directory: bool = True,
    ) -> QueuedMessage:
        """Apply ``change`` to the current envelope and store it durably
        (a message left with every recipient sent is removed instead).

        Without ``sync_directory`` the caller fsyncs the queue directory
        before anything relies on the change.
        """
        with self._locked():
            message = self.load(queue_id)
            change(message)
            self._save(message)
        if sync_directory:
            fsync_directory(str(self.directory))
        return message

    def update_if(
        self,
        queue_id: str,
        wanted: Callable[[QueuedMessage], bool],
        change: Callable[[QueuedMessage], None],
    ) -> QueuedMessage | None:
        """``update`` if the envelope, as it is under the lock, is ``wanted``;
        the changed message, or None (then nothing is written)."""
        with self._locked():
            message = self.load(queue_id)
            if not wanted(message):
                return None
            change(message)
            self._save(message)
        fsync_directory(str(self.directory))
        return message

    def remove(self, queue_id: str, sync_directory: bool = True) -> None:
        """Take a message out of the queue (envelope first); without
        ``sync_directory`` the caller fsyncs the queue directory."""
        with self._locked():
            self._remove(queue_id)
        if sync_directory:
            fsync_directory(str(self.directory))

    def remove_if(
        self, queue_id: str, wanted: Callable[[QueuedMessage], bool]
    ) -> QueuedMessage | None:
        """``remove`` if the envelope, as it is under the lock, is ``wanted``;
        the removed message, or None."""
        with self._locked():
            message = self.load(queue_id)
            if not wanted(message):
                return None
            self._remove(queue_id)
        fsync_directory(str(self.directory))
        return message

    def _save(self, message: QueuedMessage) -> None:
        # A message with every recipient sent is removed: its removal is the
        # durable record that nothing is left to do.
        if delivered(message):
            self._remove(message.id)
        else:
            self._write(message)

    def _remove(self, queue_id: str) -> None:
        envelope = self.directory / f"{checked_id(queue_id)}.env"
        try:
            os.unlink(envelope)
        except FileNotFoundError:
            raise UnknownMessage(queue_id) from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.data_path(queue_id))

    def _write(self, message: QueuedMessage) -> None:
        # The directory is fsynced by the caller, after the lock is let go.
        path = self.directory / f"{message.id}.env"
        write_atomically(path, message.to_json(), sync_directory=False)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
