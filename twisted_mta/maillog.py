"""The log line of a refused command, as Postfix's smtpd writes it.

``NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 550 5.1.1 <r@d>: Recipient
address rejected: User unknown; from=<s> to=<r> proto=ESMTP helo=<h>``

Written this way, fail2ban's ``postfix`` filter and the greps operators
already know work unchanged.  The host is always ``unknown``: the server
does no reverse DNS.  Each line is a ``twisted.logger`` event that carries
its parts as fields (``client_ip``, ``stage``, ``code``, ``enhanced``,
``text``, ``sender``, ``recipient``, ``helo``, ``proto``, ``queue_id``), so
structured observers, such as ``twistd --logger`` with a JSON observer, get
them without parsing the text.  Client-given text is escaped (see
:mod:`twisted_mta.mail.text`), in the fields as in the line.
"""

from __future__ import annotations

from typing import Literal

from twisted.logger import Logger

from twisted_mta.intake.acceptance import Session
from twisted_mta.mail.text import escape

Stage = Literal["CONNECT", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE"]

NO_QUEUE = "NOQUEUE"
_FORMAT = (
    "{queue_id}: reject: {stage} from unknown[{client_ip}]: {code} {enhanced} {text};{details}"
)
_log = Logger()


def log_reject(
    session: Session,
    stage: Stage,
    code: int,
    enhanced: str,
    text: str,
    *,
    sender: str | None = None,
    recipient: str | None = None,
    queue_id: str | None = None,
) -> None:
    """Log one refusal; ``sender`` and ``recipient`` as far as they are known.

    ``queue_id`` is given once the message has a queue file, as Postfix
    names it instead of ``NOQUEUE``.
    """
    helo = escape(session.helo.decode("utf-8", "replace")) if session.helo else None
    sender, recipient = _escaped(sender), _escaped(recipient)
    proto = "ESMTP" if session.esmtp else "SMTP"
    _log.info(
        _FORMAT,
        queue_id=queue_id or NO_QUEUE,
        stage=stage,
        client_ip=session.client_ip,
        code=code,
        enhanced=enhanced,
        text=escape(" ".join(text.splitlines())),
        sender=sender,
        recipient=recipient,
        helo=helo,
        proto=proto,
        details=_details(sender, recipient, proto, helo),
    )


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
