"""Delivery status notifications: RFC 3464 reports in RFC 6522 envelopes.

Twisted's ``bounce.generateBounce`` writes no ``Reporting-MTA``, ``Action``,
``Status`` or ``Diagnostic-Code``, has no closing MIME boundary, returns the
whole original message, bounces the null sender and crashes on non-UTF-8
input (audit 5.4).  A notification built here is a ``multipart/report``:

1. ``text/plain``: what happened, for a person;
2. ``message/delivery-status``: the per-message and per-recipient fields a
   program reads (``message/global-delivery-status`` when an address needs
   SMTPUTF8, RFC 6533);
3. ``text/rfc822-headers``: the original headers only, byte for byte, never
   the body (it may be large, and it is the sender's own anyway).

The caller sends it from the null sender ``<>`` and never reports on a
message whose own sender is null (:func:`should_bounce`), so two MTAs
cannot bounce bounces at each other.
"""

from __future__ import annotations

import email.policy
import email.utils
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.headerregistry import Address
from email.message import EmailMessage, Message
from pathlib import Path

FAILED = "failed"
DELAYED = "delayed"
# Like Postfix's header_size_limit: enough for any honest header block.
HEADERS_LIMIT = 100 * 1024
MAX_DIAGNOSTIC = 900  # characters; a field line must stay under 998

# LF endings (the queue's convention); UTF-8 headers are written as they are
# (they only occur with SMTPUTF8 addresses); no folding below RFC 5322's limit.
_POLICY = email.policy.default.clone(linesep="\n", utf8=True, max_line_length=998)
_SMTP_REPLY = re.compile(r"[245][0-9][0-9](?:[ -]|$)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class RecipientFailure:
    """One recipient to report on.

    ``diagnostic`` is the remote server's reply (``"550 5.1.1 ..."``) or our
    own reason; ``remote_mta`` the host that gave it, when there was one.
    ``will_retry_until`` is for ``delayed`` reports.
    """

    address: str
    status: str
    action: str = FAILED
    diagnostic: str | None = None
    remote_mta: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None


def should_bounce(sender: str) -> bool:
    """Whether a message's failures may be reported to its sender.

    Never to the null sender (RFC 5321 4.5.5): that is a bounce already.
    """
    return sender != ""


def build_dsn(
    hostname: str,
    queue_id: str,
    arrival: float,
    sender: str,
    failures: Sequence[RecipientFailure],
    original_headers: bytes,
    now: float,
) -> bytes:
    """The notification to ``sender`` about ``failures``, LF line endings.

    ``original_headers`` is the header block of the message (see
    :func:`read_original_headers`); any bytes are accepted.
    """
    if not failures:
        raise ValueError("a delivery status notification needs a recipient")
    report = _envelope_headers(hostname, sender, failures, now)
    report.set_content(_human_text(hostname, failures, arrival, now))
    report.make_mixed()
    report.set_type("multipart/report")
    report.set_param("report-type", "delivery-status")
    report.attach(_status_part(hostname, queue_id, arrival, failures))
    report.attach(_headers_part(original_headers))
    output = io.BytesIO()
    _Generator(output, policy=_POLICY).flatten(report)
    return output.getvalue()


class _Generator(BytesGenerator):
    """Writes the delivery-status part as the text it is.

    The email package would want ``message/delivery-status`` as a list of
    header-only messages, refolded, and cannot write the RFC 6533 global
    type (8-bit ``message/*``) at all.
    """

    _handle_message_delivery_status = BytesGenerator._handle_text
    _handle_message_global_delivery_status = BytesGenerator._handle_text


def read_original_headers(path: str | Path, limit: int = HEADERS_LIMIT) -> bytes:
    """The header block of a queued message file (LF endings), see
    :func:`header_block`; only the first ``limit`` bytes are read."""
    with open(path, "rb") as stream:
        return header_block(stream.read(limit + 1), limit)


def header_block(head: bytes, limit: int = HEADERS_LIMIT) -> bytes:
    """The headers at the start of ``head`` (LF endings) without the empty
    line that ends them; at most ``limit`` bytes, cut at a line end."""
    if head.startswith(b"\n"):
        return b""
    end = head.find(b"\n\n")
    if 0 <= end < limit:
        return head[: end + 1]
    if len(head) <= limit:
        return head if head.endswith(b"\n") or not head else head + b"\n"
    return head[: head.rfind(b"\n", 0, limit) + 1]


def _envelope_headers(
    hostname: str, sender: str, failures: Sequence[RecipientFailure], now: float
) -> EmailMessage:
    report = EmailMessage(policy=_POLICY)
    report["From"] = Address("Mail Delivery System", "MAILER-DAEMON", hostname)
    report["To"] = header_address(sender)
    report["Subject"] = (
        "Undelivered Mail Returned to Sender"
        if _any_failed(failures)
        else "Delayed Mail (still being retried)"
    )
    report["Date"] = _date(now)
    report["Message-ID"] = email.utils.make_msgid(domain=hostname)
    report["Auto-Submitted"] = "auto-replied"
    return report


def header_address(address: str, display_name: str = "") -> Address:
    """A header's address for an SMTP path (``local@domain``, the local part
    quoted if need be); unlike ``Address(addr_spec=...)`` it takes UTF-8."""
    local, _, domain = address.rpartition("@")
    if len(local) > 1 and local.startswith('"') and local.endswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return Address(display_name=display_name, username=local, domain=domain)


def _any_failed(failures: Sequence[RecipientFailure]) -> bool:
    return any(failure.action == FAILED for failure in failures)


def _human_text(
    hostname: str, failures: Sequence[RecipientFailure], arrival: float, now: float
) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if _any_failed(failures):
        lines += [
            "Your message could not be delivered to one or more recipients.",
            "Its headers are attached below.",
        ]
    else:
        lines += [
            "####### THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #######",
            "",
            f"Your message could not be delivered for {_age(now - arrival)}.",
            "The mail system will keep trying to deliver it.",
        ]
    lines.append("")
    lines += [_human_line(failure) for failure in failures]
    return "\n".join(lines) + "\n"


def _age(seconds: float) -> str:
    hours = seconds / 3600
    if hours >= 1:
        return f"{hours:.1f} hours"
    return f"{max(seconds / 60, 0):.0f} minutes"


def _human_line(failure: RecipientFailure) -> str:
    reason = _clean(failure.diagnostic) if failure.diagnostic else f"status {failure.status}"
    until = ""
    if failure.will_retry_until is not None:
        until = f" (retried until {_date(failure.will_retry_until)})"
    address = _address_text(failure.address)
    if failure.remote_mta:
        return f"<{address}>: host {_clean(failure.remote_mta)} said: {reason}{until}"
    return f"<{address}>: {reason}{until}"


def _status_part(
    hostname: str, queue_id: str, arrival: float, failures: Sequence[RecipientFailure]
) -> Message:
    per_message = [
        ("Reporting-MTA", f"dns; {hostname}"),
        ("X-Twisted-MTA-Queue-ID", queue_id),
        ("Arrival-Date", _date(arrival)),
    ]
    blocks = [per_message] + [_recipient_fields(failure) for failure in failures]
    utf8 = not all(failure.address.isascii() for failure in failures)
    return _status_text_part(blocks, utf8)


def _recipient_fields(failure: RecipientFailure) -> list[tuple[str, str]]:
    kind = "rfc822" if failure.address.isascii() else "utf-8"
    fields = [
        ("Final-Recipient", f"{kind}; {_address_text(failure.address)}"),
        ("Action", failure.action),
        ("Status", failure.status),
    ]
    if failure.remote_mta:
        fields.append(("Remote-MTA", f"dns; {_clean(failure.remote_mta)}"))
    if failure.diagnostic:
        fields.append(("Diagnostic-Code", _diagnostic_code(failure.diagnostic)))
    if failure.last_attempt is not None:
        fields.append(("Last-Attempt-Date", _date(failure.last_attempt)))
    if failure.action == DELAYED and failure.will_retry_until is not None:
        fields.append(("Will-Retry-Until", _date(failure.will_retry_until)))
    return fields


def _diagnostic_code(diagnostic: str) -> str:
    """``smtp;`` for an SMTP reply (RFC 3464 2.3.6), our own type otherwise."""
    text = _clean(diagnostic)
    kind = "smtp" if _SMTP_REPLY.match(text) else "X-Twisted-MTA"
    return f"{kind}; {text}"


def _date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, localtime=True)


def _address_text(address: str) -> str:
    """An address on one line; UTF-8 is kept (RFC 6533)."""
    return _CONTROL.sub("?", address)


def _clean(text: str) -> str:
    """One line of printable ASCII: remote replies are untrusted input, and
    a line break in one would forge fields of the report."""
    return _UNPRINTABLE.sub(" ", text).strip()[:MAX_DIAGNOSTIC]


def _status_text_part(blocks: list[list[tuple[str, str]]], utf8: bool) -> Message:
    """The machine-readable part; RFC 6533's global type when it holds UTF-8."""
    text = "\n".join("".join(f"{name}: {value}\n" for name, value in fields) for fields in blocks)
    part = EmailMessage(policy=_POLICY)
    kind = "global-delivery-status" if utf8 else "delivery-status"
    part["Content-Type"] = f"message/{kind}"
    part["Content-Transfer-Encoding"] = "8bit" if utf8 else "7bit"
    part.set_payload(_raw(text.encode("utf-8")))
    return part


def _headers_part(original_headers: bytes) -> Message:
    """The original header block as it was, whatever its bytes."""
    part = EmailMessage(policy=_POLICY)
    part["Content-Type"] = "text/rfc822-headers"
    part["Content-Transfer-Encoding"] = "7bit" if original_headers.isascii() else "8bit"
    part.set_payload(_raw(original_headers))
    return part


def _raw(data: bytes) -> str:
    """Bytes the generator writes back unchanged (it encodes with
    ``surrogateescape``), valid UTF-8 or not."""
    return data.decode("ascii", "surrogateescape")
