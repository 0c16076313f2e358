"""The durable intake of an accepted message.

One SMTP transaction becomes, before its ``250``:

* a Maildir file in ``new/`` of every local mailbox it is addressed to,
  starting with ``Return-Path``, ``Delivered-To`` and our ``Received``;
* if any recipient is remote, one queue entry: ``queue/<id>.msg`` (our
  ``Received`` header and the message) and ``queue/<id>.env``, a versioned
  JSON envelope with per-recipient state, written last: a ``.msg`` without
  its ``.env`` is a transaction that was never acknowledged.

The body is streamed once, into the first file.  Every other file gets its
own header block and an in-kernel copy of the body (``copy_file_range``),
made by the committer thread, so no work grows with lines x recipients on
the reactor.  Files use LF line endings, as Maildir readers expect.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import defer
from twisted.mail.interfaces import IMessageSMTP
from twisted.mail.smtp import SMTPServerError
from zope.interface import implementer

from twisted_mta.delivery.directory import Mailbox
from twisted_mta.delivery.maildir import (
    TemporaryFile,
    ensure_maildir,
    mailbox_path,
    open_temporary,
)
from twisted_mta.queue.committer import Committer, PendingFile

ENVELOPE_VERSION = 1


def new_queue_id() -> str:
    """A sortable id unique across processes: microseconds + randomness."""
    return f"{time.time_ns() // 1000:013X}{secrets.randbelow(0x10000):04X}"


class StorageError(SMTPServerError):
    """The message could not be made durable; the client should retry."""

    def __init__(self, reason: str) -> None:
        super().__init__(452, f"4.3.1 Insufficient system storage ({reason})".encode())


@dataclass(frozen=True)
class Envelope:
    """What the queue needs to know about a message besides its bytes."""

    sender: str
    remote: Sequence[str]
    client: Mapping[str, str]
    body: str
    smtputf8: bool
    authenticated: str | None = None

    def to_json(self, queue_id: str, size: int, now: float) -> bytes:
        document = {
            "version": ENVELOPE_VERSION,
            "id": queue_id,
            "arrival": now,
            "size": size,
            "sender": self.sender,
            "client": dict(self.client),
            "authenticated": self.authenticated,
            "body": self.body,
            "smtputf8": self.smtputf8,
            "recipients": [
                {
                    "address": address,
                    "state": "queued",
                    "attempts": 0,
                    "next_attempt": now,
                    "last_error": None,
                }
                for address in self.remote
            ],
        }
        return json.dumps(document, indent=1).encode()


@dataclass
class Spool:
    """Where accepted messages go: Maildirs under ``mail_root``, the queue."""

    mail_root: Path
    queue_dir: Path
    committer: Committer

    def prepare(self) -> None:
        """Create the queue folder and drop transactions never acknowledged."""
        os.makedirs(self.queue_dir, 0o700, exist_ok=True)
        for name in os.listdir(self.queue_dir):
            stem, _, suffix = name.rpartition(".")
            path = self.queue_dir / name
            orphan = suffix == "tmp" or (
                suffix == "msg" and not (self.queue_dir / f"{stem}.env").exists()
            ) or (suffix == "env" and not (self.queue_dir / f"{stem}.msg").exists())
            if orphan:
                os.unlink(path)

    def open_message(
        self,
        queue_id: str,
        mailboxes: Mapping[Mailbox, str],
        envelope: Envelope,
        received: bytes,
    ) -> "IncomingMessage":
        """Start storing a message; raises StorageError if that fails."""
        return IncomingMessage(self, queue_id, dict(mailboxes), envelope, received)


@implementer(IMessageSMTP)
@dataclass
class IncomingMessage:
    """The files one message is being written to.

    ``write`` takes body bytes already decoded (dot-unstuffed, LF endings);
    ``eomReceived`` makes everything durable; ``connectionLost`` discards.
    It is also a Twisted ``IMessage`` so that line-based code can feed it.
    """

    spool: Spool
    queue_id: str
    mailboxes: dict[Mailbox, str]
    envelope: Envelope
    received: bytes
    size: int = 0
    _primary: TemporaryFile | None = None
    _primary_header: int = 0
    _error: StorageError | None = None
    _extra: list[PendingFile] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            self._open_primary()
        except OSError as error:
            self._discard()
            raise StorageError(error.strerror or "write failed") from error

    def _trace_headers(self, delivered_to: str) -> bytes:
        sender = self.envelope.sender
        return f"Return-Path: <{sender}>\nDelivered-To: {delivered_to}\n".encode()

    def _open_primary(self) -> None:
        if self.mailboxes:
            mailbox = min(self.mailboxes)
            maildir = mailbox_path(self.spool.mail_root, mailbox.domain, mailbox.local)
            ensure_maildir(maildir)
            self._primary = open_temporary(maildir)
            header = self._trace_headers(self.mailboxes[mailbox]) + self.received
        else:
            path = str(self.spool.queue_dir / f"{self.queue_id}.msg.tmp")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self._primary = TemporaryFile(
                os.open(path, flags, 0o600), path, self.spool.queue_dir, ""
            )
            header = self.received
        self._primary_header = len(header)
        _write_all(self._primary.fd, header)

    def write(self, data: bytes) -> None:
        if self._error is not None or self._primary is None:
            return
        try:
            _write_all(self._primary.fd, data)
        except OSError as error:
            self._error = StorageError(error.strerror or "write failed")
        self.size += len(data)

    def lineReceived(self, line: bytes) -> None:
        self.write(line + b"\n")

    def eomReceived(self) -> defer.Deferred[str]:
        if self._error is not None:
            self._discard()
            return defer.fail(self._error)
        try:
            pending = self._pending_files()
        except OSError as error:
            self._discard()
            return defer.fail(StorageError(error.strerror or "write failed"))
        d = self.spool.committer.commit(pending)
        d.addCallbacks(lambda _: self.queue_id, self._commit_failed)
        return d

    def connectionLost(self) -> None:
        self._discard()

    def _commit_failed(self, failure):
        error = failure.check(OSError) and failure.value
        if error:
            raise StorageError(error.strerror or "write failed")
        return failure

    def _pending_files(self) -> list[PendingFile]:
        primary = self._primary
        assert primary is not None
        body_size = self.size + len(self.received)
        if self.mailboxes:
            first = min(self.mailboxes)
            files = [PendingFile(primary.fd, primary.path, primary.final_path(
                self._primary_header + self.size))]
            for mailbox, delivered_to in sorted(self.mailboxes.items()):
                if mailbox != first:
                    files.append(self._copy_to_mailbox(mailbox, delivered_to, body_size))
        else:
            files = [PendingFile(primary.fd, primary.path,
                                 str(self.spool.queue_dir / f"{self.queue_id}.msg"))]
        if self.envelope.remote:
            if self.mailboxes:
                files.append(self._copy_to_queue())
            files.append(self._envelope_file())
        self._primary = None
        self._extra = []
        return files

    def _copy_source(self) -> tuple[int, int]:
        """(fd, offset) of our Received header in the primary file."""
        assert self._primary is not None
        return self._primary.fd, self._primary_header - len(self.received)

    def _copy_to_mailbox(self, mailbox: Mailbox, delivered_to: str, body_size: int):
        maildir = mailbox_path(self.spool.mail_root, mailbox.domain, mailbox.local)
        ensure_maildir(maildir)
        target = open_temporary(maildir)
        header = self._trace_headers(delivered_to)
        pending = PendingFile(
            target.fd,
            target.path,
            target.final_path(len(header) + body_size),
            _copier(target.fd, header, *self._copy_source(), body_size),
        )
        self._extra.append(pending)
        return pending

    def _copy_to_queue(self) -> PendingFile:
        path = str(self.spool.queue_dir / f"{self.queue_id}.msg.tmp")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        body_size = self.size + len(self.received)
        pending = PendingFile(
            fd,
            path,
            str(self.spool.queue_dir / f"{self.queue_id}.msg"),
            _copier(fd, b"", *self._copy_source(), body_size),
        )
        self._extra.append(pending)
        return pending

    def _envelope_file(self) -> PendingFile:
        path = str(self.spool.queue_dir / f"{self.queue_id}.env.tmp")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        pending = PendingFile(fd, path, str(self.spool.queue_dir / f"{self.queue_id}.env"))
        self._extra.append(pending)
        _write_all(fd, self.envelope.to_json(self.queue_id, self.size, time.time()))
        return pending

    def _discard(self) -> None:
        leftovers = list(self._extra)
        if self._primary is not None:
            leftovers.append(PendingFile(self._primary.fd, self._primary.path, ""))
        for pending in leftovers:
            if pending.fd >= 0:
                os.close(pending.fd)
                pending.fd = -1
            try:
                os.unlink(pending.temporary)
            except FileNotFoundError:
                pass
        self._primary = None
        self._extra = []


def _copier(target: int, header: bytes, source: int, offset: int, count: int):
    def copy() -> None:
        _write_all(target, header)
        position, remaining = offset, count
        while remaining:
            copied = os.copy_file_range(source, target, remaining, position)
            if copied == 0:
                raise OSError(errno.EIO, "short copy")
            position += copied
            remaining -= copied

    return copy


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
