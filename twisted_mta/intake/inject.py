"""Submit a message that did not come over SMTP: the maildrop, bounces.

Such a message takes the way an SMTP one takes, so that nothing about
delivery differs: an intake ``Transaction`` on a local ``Session``
(listener ``sendmail`` or ``bounce``, client ``127.0.0.1``) decides on each
recipient as RCPT would (local domains through the directory, other
domains to the queue, unknown local recipients refused), and the spool's
``IncomingMessage`` makes it durable before the returned Deferred fires.
Local submission may relay, like Postfix's pickup: the local user could
as well connect to 127.0.0.1.

The message is stored with LF line endings: CRLF and lone CR become LF (the
input is a local file, not an SMTP stream, so a bare CR or LF is not an
attempt at smuggling), and a missing final newline is added.

Nobody is at the other end to read a refusal, so refused recipients are
reported to the sender in a bounce (never to the null sender), and the
message still goes to the recipients that were accepted.  If none was,
:func:`inject` fails with :class:`InjectionRefused` once that bounce is
stored: the submission is finished, there is nothing to retry.

Bounces are injected the same way, from ``<>`` (:func:`send_dsn`); the
queue scheduler's reports go through :func:`dsn_reporter`.
"""

from __future__ import annotations

import email.utils
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import BinaryIO

from twisted.internet import defer

from twisted_mta import maillog
from twisted_mta.intake.acceptance import MailSystem, Session, Transaction
from twisted_mta.intake.policies import NO_POLICIES
from twisted_mta.intake.refusal import Refusal
from twisted_mta.intake.spool import IncomingMessage
from twisted_mta.mail.address import (
    Address,
    NullAddress,
    PathError,
    parse_mail,
    parse_rcpt,
)
from twisted_mta.mail.dsn import (
    FAILED,
    HEADERS_LIMIT,
    RecipientFailure,
    build_dsn,
    header_block,
    should_bounce,
)
from twisted_mta.mail.lines import LineEndings, normalise_line_endings
from twisted_mta.mail.received import count_received

SENDMAIL = "sendmail"
BOUNCE = "bounce"
DOUBLE_BOUNCE = "double-bounce"
LOCAL_IP = "127.0.0.1"
CHUNK = 64 * 1024

_SAFE_USER = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

MessageSource = bytes | BinaryIO


@dataclass(frozen=True)
class Refused:
    """A recipient the intake refused, with the reply SMTP would have sent."""

    recipient: str
    refusal: Refusal

    @property
    def reply(self) -> str:
        return self.refusal.reply


class InjectionRefused(Exception):
    """No recipient was accepted; ``bounce_id`` is the bounce, if one was sent."""

    def __init__(self, queue_id: str, refused: Sequence[Refused], bounce_id: str | None) -> None:
        replies = "; ".join(r.reply for r in refused) or "no recipients"
        super().__init__(f"id={queue_id}: every recipient refused ({replies})")
        self.queue_id = queue_id
        self.refused = tuple(refused)
        self.bounce_id = bounce_id


def inject(
    system: MailSystem,
    sender: str,
    recipients: Sequence[str],
    message: MessageSource,
    *,
    origin: str,
    user: str | None = None,
) -> defer.Deferred[str]:
    """Store ``message`` for ``recipients``; fires with its queue id once durable.

    ``message`` is bytes or a binary file read from its current position
    (it must stay open until the Deferred fires).  ``origin`` names the way
    in (:data:`SENDMAIL`, :data:`BOUNCE`); ``user`` is the local login that
    submitted it, for the Received header and the log.  Fails with
    ``PathError`` if ``sender`` is not an address, with
    :class:`InjectionRefused` if no recipient was accepted, with the
    ``Refusal`` of a temporary failure (a directory that cannot be read, or
    the spool's ``StorageError`` if the message could not be stored).
    """
    return defer.ensureDeferred(
        _inject(system, sender, recipients, message, origin, _safe_user(user))
    )


def send_dsn(
    system: MailSystem,
    queue_id: str,
    arrival: float,
    sender: str,
    failures: Sequence[RecipientFailure],
    original_headers: bytes,
    origin: str = BOUNCE,
) -> defer.Deferred[str | None]:
    """Report ``failures`` of message ``queue_id`` to ``sender``.

    Fires with the notification's queue id; with None when the sender is
    null or refuses it (both logged: a bounce cannot bounce).  ``origin``
    is :data:`DOUBLE_BOUNCE` for the postmaster's copy of a bounce that
    could not be delivered.
    """
    return defer.ensureDeferred(
        _send_dsn(system, queue_id, arrival, sender, failures, original_headers, origin)
    )


async def _inject(
    system: MailSystem,
    sender: str,
    recipients: Sequence[str],
    message: MessageSource,
    origin: str,
    user: str | None,
) -> str:
    arrival, started = time.time(), time.monotonic()
    start = 0 if isinstance(message, bytes) else message.tell()
    transaction = Transaction(system, Session(origin, LOCAL_IP, user=user, local=True))
    sender_address = _sender(sender)
    refused = await _offer(transaction, sender_address, recipients, _loops(system, message, start))
    addresses = [*transaction.recipients, *transaction.remote]
    transaction.utf8 = sender_address.needs_utf8 or not all(a.isascii() for a in addresses)
    accepted = list(transaction.recipients)
    if accepted:
        try:
            size = await _store(transaction, message, user)
        except Refusal as refusal:
            if refusal.code < 500:
                raise  # temporary: the whole message is tried again later
            refused += [Refused(r, refusal) for r in accepted]
            accepted = []
        else:
            _log_accepted(transaction, size, user)
    bounce_id = None
    if refused:
        _log_refused(transaction.queue_id, refused, started)
        headers = header_block(normalise_line_endings(_head(message, start)))
        failures = [_failure(r, time.time()) for r in refused]
        bounce_id = await _send_dsn(
            system, transaction.queue_id, arrival, str(sender_address), failures, headers
        )
    if not accepted:
        raise InjectionRefused(transaction.queue_id, refused, bounce_id)
    return transaction.queue_id


async def _offer(
    transaction: Transaction,
    sender: Address | NullAddress,
    recipients: Sequence[str],
    loops: bool,
) -> list[Refused]:
    """Offer the sender, then each recipient, as MAIL and RCPT would; the
    recipients refused, with why.  A temporary refusal is raised."""
    try:
        await transaction.accept_sender(sender)
    except Refusal as refusal:
        if refusal.code < 500:
            raise
        return [Refused(r, refusal) for r in recipients]
    if loops:
        loop = Refusal(554, "5.4.6", "too many hops (mail loop?)")
        return [Refused(r, loop) for r in recipients]
    return [r for r in [await _add_recipient(transaction, a) for a in recipients] if r]


async def _send_dsn(
    system: MailSystem,
    queue_id: str,
    arrival: float,
    sender: str,
    failures: Sequence[RecipientFailure],
    original_headers: bytes,
    origin: str = BOUNCE,
) -> str | None:
    if not should_bounce(sender):
        maillog.no_notification(queue_id)
        return None
    notification = build_dsn(
        system.hostname, queue_id, arrival, sender, failures, original_headers, time.time()
    )
    # Our own reports are not for the policies: they refuse nothing of ours.
    unpoliced = replace(system, policies=NO_POLICIES)
    try:
        bounce_id = await _inject(unpoliced, "", [sender], notification, origin, None)
    except InjectionRefused as refusal:
        maillog.notification_refused(queue_id, "; ".join(r.reply for r in refusal.refused))
        return None
    kind = "non-delivery" if any(f.action == FAILED for f in failures) else "delay"
    maillog.notification_sent(queue_id, kind, bounce_id)
    return bounce_id


def _sender(sender: str) -> Address | NullAddress:
    command = parse_mail(f"FROM:<{sender}> SMTPUTF8".encode(), max_size=sys.maxsize)
    return command.sender


async def _add_recipient(transaction: Transaction, recipient: str) -> Refused | None:
    """Offer one recipient as RCPT would; the refusal, if any."""
    try:
        command = parse_rcpt(f"TO:<{recipient}>".encode(), smtputf8=True)
        await transaction.accept_recipient(command.recipient)
    except PathError as error:
        # Not an address: shown in the log and the bounce, so made harmless.
        shown = _CONTROL.sub("?", recipient)
        return Refused(shown, Refusal(error.code, error.enhanced, error.text))
    except Refusal as refusal:
        if refusal.code < 500:
            raise  # temporary: the whole message is tried again later, not bounced
        return Refused(recipient, refusal)
    return None


async def _store(transaction: Transaction, message: MessageSource, user: str | None) -> int:
    """Write the message into the spool; its size once durable."""
    transaction.body = "8BITMIME" if _is_8bit(message) else "7BIT"
    received = _received(transaction, user)
    incoming = transaction.open(received)
    try:
        _write_normalised(incoming, message)
    except BaseException:
        incoming.connectionLost()
        raise
    await incoming.eomReceived()
    return incoming.size


def _received(transaction: Transaction, user: str | None) -> bytes:
    """``Received: by HOST (twisted-mta, via ORIGIN ...) with local id ID``."""
    via = f"via {transaction.session.listener}" + (f" from user {user}" if user else "")
    lines = [
        f"Received: by {transaction.system.hostname} (twisted-mta, {via})",
        f"\twith local id {transaction.queue_id}",
    ]
    date = email.utils.formatdate(localtime=True)
    if len(transaction.recipients) == 1:
        lines.append(f"\tfor <{transaction.recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def _loops(system: MailSystem, message: MessageSource, start: int) -> bool:
    """More Received headers than ``max_hops``, as at DATA (RFC 5321 6.3)."""
    if not system.max_hops:
        return False
    header = header_block(normalise_line_endings(_head(message, start)))
    if not isinstance(message, bytes):
        message.seek(start)
    return count_received(header) > system.max_hops


def _safe_user(user: str | None) -> str | None:
    """A login name fit for a header and a log line, else none at all."""
    return user if user is not None and _SAFE_USER.fullmatch(user) else None


def _chunks(message: MessageSource) -> Iterator[bytes]:
    if isinstance(message, bytes):
        yield message
        return
    yield from iter(lambda: message.read(CHUNK), b"")


def _is_8bit(message: MessageSource) -> bool:
    """Whether the body needs 8BITMIME; a file is read and rewound."""
    if isinstance(message, bytes):
        return not message.isascii()
    start = message.tell()
    try:
        return not all(chunk.isascii() for chunk in _chunks(message))
    finally:
        message.seek(start)


def _head(message: MessageSource, start: int) -> bytes:
    """The first bytes of the message, enough for its header block."""
    if isinstance(message, bytes):
        return message[: HEADERS_LIMIT + 1]
    message.seek(start)
    return message.read(HEADERS_LIMIT + 1)


def _write_normalised(incoming: IncomingMessage, message: MessageSource) -> None:
    endings = LineEndings()
    last = b"\n"
    for chunk in _chunks(message):
        data = endings.feed(chunk)
        if data:
            incoming.write(data)
            last = data[-1:]
    tail = endings.finish()
    if tail:
        incoming.write(tail)
        last = tail
    if last != b"\n":
        incoming.write(b"\n")


def _log_accepted(transaction: Transaction, size: int, user: str | None) -> None:
    """The line the SMTP server logs after its ``250``."""
    maillog.accepted(
        transaction.queue_id,
        transaction.sender,
        size,
        len(transaction.recipients),
        client_ip=LOCAL_IP,
        listener=transaction.session.listener,
        local=True,
        user=user,
    )


def _log_refused(queue_id: str, refused: Sequence[Refused], started: float) -> None:
    delay = time.monotonic() - started
    for each in refused:
        maillog.delivery(queue_id, each.recipient, "none", delay, "bounced", each.reply)


def _failure(refused: Refused, now: float) -> RecipientFailure:
    return RecipientFailure(
        address=refused.recipient,
        status=refused.refusal.enhanced,
        diagnostic=refused.reply,
        last_attempt=now,
    )
