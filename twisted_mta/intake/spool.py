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

Once everything is on disk the server answers ``250`` and logs the
acceptance; then one line per delivery follows, Postfix-style.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageSMTP
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta import maillog
from twisted_mta.intake.refusal import Refusal
from twisted_mta.mail.mailbox import Mailbox
from twisted_mta.storage.committer import Committer, PendingFile, discard
from twisted_mta.storage.envelope import Envelope
from twisted_mta.storage.files import make_directories
from twisted_mta.storage.maildir import (
    CREATE_FLAGS,
    PRIVATE,
    STALE_AFTER,
    Sharing,
    TemporaryFile,
    delivery_headers,
    ensure_maildir,
    mailbox_path,
    open_temporary,
    prepare_mail_root,
    sweep_stale_temporaries,
)

# copy_file_range cannot cross file systems (Linux 5.19+) or may be missing.
_NO_COPY_FILE_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

_log = Logger()



class StorageError(Refusal):
    """The message could not be made durable; the client should retry."""

    def __init__(self, reason: str) -> None:
        super().__init__(452, "4.3.1", f"Insufficient system storage ({reason})")


def _storage_error(queue_id: str, error: OSError) -> StorageError:
    """Log what went wrong where, for the operator; tell the client less."""
    where = f" ({error.filename})" if error.filename else ""
    _log.info(
        "id={queue_id} not stored: {reason}{where}",
        queue_id=queue_id,
        reason=error.strerror or str(error),
        where=where,
    )
    return StorageError(error.strerror or "write failed")


@dataclass
class Spool:
    """Where accepted messages go: Maildirs under ``mail_root``, shared as
    ``sharing`` says, and the queue."""

    mail_root: Path
    queue_dir: Path
    committer: Committer
    # Told the id of each message that entered the queue (the scheduler).
    on_queued: Callable[[str], None] | None = None
    sharing: Sharing = PRIVATE

    def prepare(self) -> None:
        """Create the queue folder (and a shared mail root), and remove what
        a crash left behind: transactions never acknowledged, and our stale
        files in maildirs' ``tmp/``."""
        make_directories(self.queue_dir)
        if not prepare_mail_root(self.mail_root, self.sharing):
            _log.info(
                "delivery.group: {mail_root} and the maildirs in it predate the setting and are "
                "not shared: chgrp -R and chmod them (see the README)",
                mail_root=str(self.mail_root),
            )
        self._drop_unacknowledged()
        removed = sweep_stale_temporaries(self.mail_root)
        if removed:
            _log.info(
                "removed {removed} stale temporary file(s) from maildir tmp/ folders (older than "
                "{hours} hours)",
                removed=removed,
                hours=STALE_AFTER // 3600,
            )

    def _drop_unacknowledged(self) -> None:
        """Temporary files, and a ``.msg`` or ``.env`` without its partner
        (the pair is renamed into place before the ``250``, the ``.env``
        last)."""
        names = set(os.listdir(self.queue_dir))
        partner = {"msg": "env", "env": "msg"}
        for name in sorted(names):
            stem, _, suffix = name.rpartition(".")
            orphan = suffix == "tmp" or (
                suffix in partner and f"{stem}.{partner[suffix]}" not in names
            )
            if orphan:
                os.unlink(self.queue_dir / name)
                _log.info("removed {name} from the queue: never acknowledged", name=name)

    def queue_path(self, queue_id: str, suffix: str) -> str:
        return str(self.queue_dir / f"{queue_id}.{suffix}")

    def open_message(
        self,
        queue_id: str,
        mailboxes: Mapping[Mailbox, str],
        envelope: Envelope,
        received: bytes,
    ) -> IncomingMessage:
        """Start storing a message; raises StorageError if that fails."""
        return IncomingMessage(self, queue_id, dict(mailboxes), envelope, received)


@implementer(IMessageSMTP)
@dataclass
class IncomingMessage:
    """The files one message is being written to.

    ``mailboxes`` maps each local Maildir to its Delivered-To address.
    ``write`` takes body bytes already decoded (dot-unstuffed, LF endings);
    ``eomReceived`` makes everything durable; ``connectionLost`` discards.
    It is also a Twisted ``IMessage`` so that line-based code can feed it.

    ``review``, when set, is asked about the whole message before it is
    made durable: it fires with header lines to prepend to every copy, or
    fails with a ``Refusal``.  The file the body went into is then only the
    source of the copies, each of which gets the new lines.
    """

    spool: Spool
    queue_id: str
    mailboxes: dict[Mailbox, str]
    envelope: Envelope
    received: bytes
    size: int = 0
    _files: list[PendingFile] = field(default_factory=list)
    _primary_maildir: TemporaryFile | None = None
    _primary_header: int = 0
    _error: StorageError | None = None
    review: Callable[[IncomingMessage], defer.Deferred[bytes]] | None = None
    # Told once the message is durable (the policies' "delivered").
    after_storing: Callable[[IncomingMessage], None] | None = None
    _extra: bytes = b""
    # Postfix's delay counts from arrival; ours from DATA, when the first
    # byte of the message can be stored.
    _arrival: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        try:
            self._open_primary()
        except OSError as error:
            self._discard()
            raise _storage_error(self.queue_id, error) from error

    def _open_primary(self) -> None:
        """The file the body is streamed into: the first mailbox, else the queue."""
        if self.mailboxes:
            mailbox = min(self.mailboxes)
            self._primary_maildir, _ = self._open_in_maildir(mailbox)
            header = delivery_headers(self.envelope.sender, self.mailboxes[mailbox]) + self.received
        else:
            self._open_in_queue("msg")
            header = self.received
        self._primary_header = len(header)
        _write_all(self._files[0].fd, header)

    def _open_in_maildir(self, mailbox: Mailbox) -> tuple[TemporaryFile, PendingFile]:
        """A new file in ``mailbox``'s tmp/; its final name waits for its size."""
        maildir = mailbox_path(self.spool.mail_root, mailbox.domain, mailbox.local)
        ensure_maildir(maildir, self.spool.sharing)
        temporary = open_temporary(maildir, self.spool.sharing)
        pending = PendingFile(temporary.fd, temporary.path, "")
        self._files.append(pending)
        return temporary, pending

    def _open_in_queue(self, suffix: str, temporary_suffix: str = "tmp") -> PendingFile:
        final = self.spool.queue_path(self.queue_id, suffix)
        temporary = f"{final}.{temporary_suffix}"
        pending = PendingFile(os.open(temporary, CREATE_FLAGS, 0o600), temporary, final)
        self._files.append(pending)
        return pending

    def write(self, data: bytes) -> None:
        if self._error is not None or not self._files:
            return
        try:
            _write_all(self._files[0].fd, data)
        except OSError as error:
            self._error = _storage_error(self.queue_id, error)
        self.size += len(data)

    def lineReceived(self, line: bytes) -> None:
        self.write(line + b"\n")

    def open_stored(self) -> BinaryIO:
        """The message as written so far, from our Received header on."""
        stream = open(self._files[0].temporary, "rb")
        stream.seek(self._primary_header - len(self.received))
        return stream

    def eomReceived(self) -> defer.Deferred[str]:
        """Commit every file; fires with the queue id once all are durable."""
        if self._error is None and self.review is not None:
            d = defer.maybeDeferred(self.review, self)
            d.addErrback(self._review_refused)
            return d.addCallback(self._commit)
        return self._commit(b"")

    def _review_refused(self, failure: Failure) -> Failure:
        self._discard()
        return failure

    def _commit(self, extra: bytes) -> defer.Deferred[str]:
        self._extra = extra
        if not self._files and self._error is None:
            self._error = StorageError("discarded while under review")
        if self._error is None:
            try:
                self._complete_files()
            except OSError as error:
                self._error = _storage_error(self.queue_id, error)
        if self._error is not None:
            self._discard()
            return defer.fail(self._error)
        files, self._files = self._files, []  # the committer cleans up from here
        acknowledged: defer.Deferred[str] = defer.Deferred()
        stored = self.spool.committer.commit(files)
        stored.addCallbacks(
            self._stored,
            self._not_stored,
            callbackArgs=(acknowledged,),
            errbackArgs=(acknowledged,),
        )
        return acknowledged

    def connectionLost(self) -> None:
        self._discard()

    def _stored(self, _: None, acknowledged: defer.Deferred[str]) -> None:
        # Fired first so that the server's 250 and its acceptance line come
        # before the delivery lines, in the order of the message's life.
        acknowledged.callback(self.queue_id)
        self._log_deliveries()
        if self.after_storing is not None:
            self.after_storing(self)
        if self.envelope.remote and self.spool.on_queued is not None:
            self.spool.on_queued(self.queue_id)

    def _not_stored(self, failure: Failure, acknowledged: defer.Deferred[str]) -> None:
        if isinstance(failure.value, OSError):
            failure = Failure(_storage_error(self.queue_id, failure.value))
        acknowledged.errback(failure)

    def _log_deliveries(self) -> None:
        delay = time.monotonic() - self._arrival
        for _, delivered_to in sorted(self.mailboxes.items()):
            maillog.delivery(
                self.queue_id, delivered_to, "local", delay, "sent", "delivered to maildir"
            )
        for address in self.envelope.remote:
            maillog.queued_for_relay(self.queue_id, address, delay)

    def _complete_files(self) -> None:
        """Name the primary file and open every other one, in commit order.

        With header lines to add, the primary is only the source of copies.
        The ``.env`` comes last: its rename is what makes a queue entry real.
        """
        primary_kept = not self._extra
        if self._primary_maildir is not None and primary_kept:
            size = self._primary_header + self.size
            self._files[0].final = self._primary_maildir.final_path(size)
        self._files[0].keep = primary_kept
        first = min(self.mailboxes, default=None) if primary_kept else None
        for mailbox, delivered_to in sorted(self.mailboxes.items()):
            if mailbox != first:
                self._copy_to_mailbox(mailbox, delivered_to)
        if self.envelope.remote:
            if self.mailboxes or not primary_kept:
                self._copy_to_queue()
            self._write_envelope()

    def _copy_to_mailbox(self, mailbox: Mailbox, delivered_to: str) -> None:
        header = delivery_headers(self.envelope.sender, delivered_to) + self._extra
        temporary, pending = self._open_in_maildir(mailbox)
        pending.final = temporary.final_path(len(header) + self._shared_size())
        pending.prepare = self._copier(pending.fd, header)

    def _copy_to_queue(self) -> None:
        pending = self._open_in_queue("msg", "copy.tmp")
        pending.prepare = self._copier(pending.fd, self._extra)

    def _write_envelope(self) -> None:
        pending = self._open_in_queue("env")
        size = len(self._extra) + self.size
        _write_all(pending.fd, self.envelope.to_json(self.queue_id, size, time.time()))

    def _shared_size(self) -> int:
        """What every file holds after its own header: Received + body."""
        return len(self.received) + self.size

    def _copier(self, target: int, header: bytes) -> Callable[[], None]:
        """Fill ``target`` with ``header`` + the primary file's shared part."""
        source = self._files[0].fd
        offset = self._primary_header - len(self.received)
        count = self._shared_size()

        def copy() -> None:
            _write_all(target, header)
            _copy_range(source, target, offset, count)

        return copy

    def _discard(self) -> None:
        files, self._files = self._files, []
        for pending in files:
            discard(pending)


def _copy_range(source: int, target: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``source`` from ``offset`` to ``target``,
    in the kernel; with sendfile where copy_file_range is not possible."""
    copy = os.copy_file_range
    while count:
        try:
            copied = copy(source, target, count, offset)
        except OSError as error:
            if copy is _sendfile or error.errno not in _NO_COPY_FILE_RANGE:
                raise
            copy = _sendfile
            continue
        if copied == 0:
            raise OSError(errno.EIO, "short copy: the first file shrank")
        offset += copied
        count -= copied


def _sendfile(source: int, target: int, count: int, offset: int) -> int:
    return os.sendfile(target, source, offset, count)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
