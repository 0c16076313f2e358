"""The mail log: one function per event in a message's life, and per
refused login.

Each line is written as Postfix writes it, so that fail2ban's ``postfix``
filter and the greps operators already know work unchanged::

    NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 550 5.1.1 <r@d>: Recipient
        address rejected: User unknown; from=<s> to=<r> proto=ESMTP helo=<h>
    id=Q from=<s> size=1234 nrcpt=2 client=unknown[192.0.2.7] listener=smtp
    id=Q to=<r@d> relay=local delay=0.01 status=sent (delivered to maildir)

The host is always ``unknown``: the server does no reverse DNS.  Each
line is a ``twisted.logger`` event that carries its parts as fields
(``queue_id``, ``client_ip``, ``recipient``, ``status`` ...), so structured
observers, such as ``twistd --logger`` with a JSON observer, get them
without parsing the text; ``mail_event`` names the event (``accepted``,
``reject``, ``delivery``, ``auth_failed`` ...) after the function that made
it.  The text itself is made here, once, as the event's ``line``:
formatting it from the fields at every observer would cost a third more on
the path of every message.  Client-given text is escaped (see
:mod:`twisted_mta.mail.text`), in the fields as in the line.
"""

from __future__ import annotations

from typing import Literal, Protocol

from twisted.logger import Logger

from twisted_mta.mail.text import escape

Stage = Literal["CONNECT", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE"]

NO_QUEUE = "NOQUEUE"
_log = Logger()


class Client(Protocol):
    """What a log line tells of the client."""

    client_ip: str
    helo: bytes | None
    esmtp: bool


def reject(
    client: Client,
    stage: Stage,
    code: int,
    enhanced: str,
    text: str,
    *,
    sender: str | None = None,
    recipient: str | None = None,
    queue_id: str | None = None,
) -> None:
    """A refused connection, command or message; ``sender`` and
    ``recipient`` as far as they are known.

    ``queue_id`` is given once the message has a queue file, as Postfix
    names it instead of ``NOQUEUE``.
    """
    helo = escape(client.helo.decode("utf-8", "replace")) if client.helo else None
    sender, recipient = _escaped(sender), _escaped(recipient)
    proto = "ESMTP" if client.esmtp else "SMTP"
    queue_id = queue_id or NO_QUEUE
    text = escape(" ".join(text.splitlines()))
    _emit(
        "reject",
        f"{queue_id}: reject: {stage} from unknown[{client.client_ip}]: {code} {enhanced} {text};"
        + _details(sender, recipient, proto, helo),
        queue_id=queue_id,
        stage=stage,
        client_ip=client.client_ip,
        code=code,
        enhanced=enhanced,
        text=text,
        sender=sender,
        recipient=recipient,
        helo=helo,
        proto=proto,
    )


def accepted(
    queue_id: str,
    sender: str,
    size: int,
    nrcpt: int,
    *,
    client_ip: str,
    listener: str,
    local: bool = False,
    tls: str | None = None,
    sasl_username: str | None = None,
    user: str | None = None,
) -> None:
    """A message stored, logged after its ``250``; a ``local`` one (the
    maildrop, a bounce) comes from ``localhost``, ``user`` its login."""
    host = "localhost" if local else "unknown"
    sender = escape(sender)
    sasl_username = _escaped(sasl_username)
    extras = [
        f" tls={tls.split()[0]}" if tls else "",
        f" sasl_username={sasl_username}" if sasl_username else "",
        f" user={user}" if user else "",
    ]
    _emit(
        "accepted",
        f"id={queue_id} from=<{sender}> size={size} nrcpt={nrcpt} client={host}[{client_ip}]"
        f" listener={listener}" + "".join(extras),
        queue_id=queue_id,
        sender=sender,
        size=size,
        nrcpt=nrcpt,
        client_ip=client_ip,
        listener=listener,
        tls=tls,
        sasl_username=sasl_username,
        user=user,
    )


def lost_after_data(queue_id: str | None, client_ip: str) -> None:
    """A client that went away in the middle of its message."""
    queue_id = queue_id or "-"
    _emit(
        "lost",
        f"id={queue_id} lost connection after DATA from unknown[{client_ip}]; message discarded",
        queue_id=queue_id,
        client_ip=client_ip,
    )


def delivery(
    queue_id: str, recipient: str, relay: str, delay: float, status: str, detail: str
) -> None:
    """What became of one recipient: ``status`` is ``sent``, ``deferred`` or
    ``bounced``; ``relay`` is ``local``, ``none`` or ``host[ip]:port``."""
    _emit(
        "delivery",
        f"id={queue_id} to=<{recipient}> relay={relay} delay={delay:.2f} status={status}"
        f" ({detail})",
        queue_id=queue_id,
        recipient=recipient,
        relay=relay,
        delay=delay,
        status=status,
        detail=detail,
    )


def queued_for_relay(queue_id: str, recipient: str, delay: float) -> None:
    """A recipient the queue will relay to, at intake: no attempt yet."""
    _emit(
        "queued",
        f"id={queue_id} to=<{recipient}> relay=none delay={delay:.2f} status=deferred"
        " (queued for relay)",
        queue_id=queue_id,
        recipient=recipient,
        relay="none",
        delay=delay,
        status="deferred",
        detail="queued for relay",
    )


def converted(queue_id: str, relay: str) -> None:
    """An 8-bit message goes quoted-printable to a host without 8BITMIME."""
    _emit(
        "converted",
        f"id={queue_id} converted to quoted-printable for {relay}",
        queue_id=queue_id,
        relay=relay,
    )


def no_notification(queue_id: str) -> None:
    """A failure that cannot be reported: the sender is null."""
    _emit(
        "no_notification", f"id={queue_id} no notification: the sender is null", queue_id=queue_id
    )


def notification_refused(queue_id: str, replies: str) -> None:
    _emit(
        "notification_refused",
        f"id={queue_id} sender notification refused: {replies}",
        queue_id=queue_id,
        replies=replies,
    )


def notification_sent(queue_id: str, kind: str, notification_id: str) -> None:
    """A delay warning or a non-delivery report, queued as ``notification_id``."""
    _emit(
        "notification_sent",
        f"id={queue_id} sender {kind} notification: {notification_id}",
        queue_id=queue_id,
        kind=kind,
        notification_id=notification_id,
    )


def auth_failed(client_ip: str, mechanism: str, user: str) -> None:
    """A wrong password, on the line fail2ban's twisted-mta filter reads;
    ``user`` is already made printable."""
    _emit(
        "auth_failed",
        f"auth failed: client=[{client_ip}] mechanism={mechanism} user={user}",
        client_ip=client_ip,
        mechanism=mechanism,
        user=user,
    )


def auth_blocked(client_ip: str, mechanism: str, reason: str) -> None:
    """An address refused AUTH without a check, said once per block."""
    _emit(
        "auth_blocked",
        f"auth refused: client=[{client_ip}] mechanism={mechanism}: {reason};"
        " AUTH refused without a check until they are 15 minutes old",
        client_ip=client_ip,
        mechanism=mechanism,
        reason=reason,
    )


def _emit(name: str, line: str, **fields: object) -> None:
    _log.info("{line}", mail_event=name, line=line, **fields)


def _escaped(text: str | None) -> str | None:
    return None if text is None else escape(text)


def _details(sender: str | None, recipient: str | None, proto: str, helo: str | None) -> str:
    """What follows the reply: each part only if known, like Postfix."""
    parts = [
        f"from=<{sender}>" if sender is not None else None,
        f"to=<{recipient}>" if recipient is not None else None,
        f"proto={proto}",
        f"helo=<{helo}>" if helo is not None else None,
    ]
    return "".join(f" {part}" for part in parts if part is not None)
