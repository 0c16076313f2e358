"""What one delivery attempt's result means for a recipient.

Delivered is ``sent``; a permanent failure is ``failed``; a temporary one
waits ``retry_min * 2**(attempts-1)``, at most ``retry_max``, unless the
message is past its lifetime: then it fails too (4.4.7).  Each result is
logged, Postfix-style, with the remote's reply.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted_mta import maillog
from twisted_mta.interfaces import EnvelopeInfo
from twisted_mta.storage.envelope import FAILED, SENT, QueuedMessage, RecipientState

EXPIRED_STATUS = "4.4.7"


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt for one recipient."""

    address: str
    delivered: bool
    permanent: bool
    status: str
    text: str
    remote: str | None = None


@dataclass(frozen=True)
class Policy:
    retry_min: float
    retry_max: float
    lifetime: float
    delay_warning: float = 0.0
    max_concurrent: int = 20
    per_destination: int = 5

    def backoff(self, attempts: int) -> float:
        return min(self.retry_min * 2 ** max(attempts - 1, 0), self.retry_max)


def apply_outcome(
    state: RecipientState, outcome: Outcome, now: float, expired: bool, policy: Policy
) -> None:
    """What ``outcome`` makes of ``state``: sent, failed, expired (past
    the lifetime: ``expired``), or due again after the backoff."""
    state.attempts += 1
    state.last_attempt = now
    state.remote = outcome.remote
    state.status = outcome.status
    state.last_error = None if outcome.delivered else outcome.text
    if outcome.delivered:
        state.state = SENT
    elif outcome.permanent:
        state.state = FAILED
    elif expired:
        state.state = FAILED
        state.status = EXPIRED_STATUS
        state.last_error = f"message expired after too many attempts; last error: {outcome.text}"
    else:
        state.next_attempt = now + policy.backoff(state.attempts)


def envelope_info(message: QueuedMessage) -> EnvelopeInfo:
    """A queued message's envelope, as the policies see it."""
    return EnvelopeInfo(
        message.id,
        message.sender,
        tuple(r.address for r in message.recipients),
        message.client.get("ip"),
        message.client.get("listener"),
        message.authenticated,
    )


def log_attempt(
    message: QueuedMessage, state: RecipientState, outcome: Outcome, now: float
) -> None:
    status = {SENT: "sent", FAILED: "bounced"}.get(state.state, "deferred")
    # Like Postfix, a delivery shows the remote's reply (its queue id).
    detail = f"{state.status} {state.last_error or outcome.text or 'delivered'}"
    maillog.delivery(
        message.id, state.address, state.remote or "none", now - message.arrival, status, detail
    )
