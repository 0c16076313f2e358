"""The scheduler's reports: delay warnings and non-delivery notices.

A queued message whose recipients failed, or are late, is reported to its
sender in one DSN (RFC 3464), injected from ``<>`` like any local mail.
A bounce of ours that cannot be delivered goes once to the postmaster;
a failure of that is only logged.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import defer

from twisted_mta.intake.acceptance import MailSystem
from twisted_mta.intake.inject import BOUNCE, DOUBLE_BOUNCE, send_dsn
from twisted_mta.mail.dsn import (
    DELAYED,
    FAILED,
    RecipientFailure,
    read_original_headers,
    should_bounce,
)
from twisted_mta.queue.scheduler import Report
from twisted_mta.queue.store import QueueStore
from twisted_mta.storage.envelope import QueuedMessage, RecipientState


def dsn_reporter(system: MailSystem, store: QueueStore, lifetime: float) -> Report:
    """The scheduler's ``report``: one DSN to the sender of a queued message
    about ``recipients`` (``failed``, or ``delayed`` for a warning)."""

    def report(
        message: QueuedMessage, recipients: Sequence[RecipientState], action: str
    ) -> defer.Deferred[None]:
        until = message.arrival + lifetime if action == DELAYED else None
        failures = [_queued_failure(r, action, until) for r in recipients]
        headers = read_original_headers(store.data_path(message.id))
        to, origin = message.sender, BOUNCE
        if _is_failed_notification(message, action):
            # The postmaster hears of it, once: a failure of that report
            # comes back here from the null sender and is only logged.
            domain = system.directory.postmaster_domain(system.hostname)
            to, origin = f"postmaster@{domain}", DOUBLE_BOUNCE
        d = send_dsn(system, message.id, message.arrival, to, failures, headers, origin)
        return d.addCallback(lambda _: None)

    return report


def _is_failed_notification(message: QueuedMessage, action: str) -> bool:
    """A bounce of ours that could not be delivered."""
    return (
        action == FAILED
        and not should_bounce(message.sender)
        and message.client.get("listener") == BOUNCE
    )


def _queued_failure(
    recipient: RecipientState, action: str, until: float | None
) -> RecipientFailure:
    return RecipientFailure(
        address=recipient.address,
        status=recipient.status or ("4.0.0" if action == DELAYED else "5.0.0"),
        action=action,
        diagnostic=recipient.last_error,
        # The log's "host[ip]:port" form names the host; DSNs want the name.
        remote_mta=recipient.remote.split("[")[0] if recipient.remote else None,
        last_attempt=recipient.last_attempt,
        will_retry_until=until,
    )
