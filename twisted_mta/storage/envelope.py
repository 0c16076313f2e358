"""The queue envelope: ``queue/<id>.env``, its sole reader and writer.

A versioned JSON document beside each queued message (``<id>.msg``): who
sent it, from where, how, and the state of each remote recipient (queued,
sent or failed, attempts, the next attempt, the last error).  The intake
writes it first (:meth:`Envelope.to_json`), the queue reads and rewrites
it (:class:`QueuedMessage`); both go through the one dumper and loader
here.  Queue ids also name the files, so they are made and checked here.

The version changes only when a reader of the old one would misread a new
file.  A field added with a default that means what its absence always
meant (``held``: not held) keeps it: older files load with the default,
and fields unknown to a loader are ignored.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

ENVELOPE_VERSION = 1
QUEUED, SENT, FAILED = "queued", "sent", "failed"
_ID = re.compile(r"[0-9A-F]{8,32}")


class UnknownMessage(KeyError):
    """No message with that id is in the queue."""


_last_stamp = 0


def new_queue_id() -> str:
    """A sortable id: microseconds, never the same twice in this process
    (the queue files are named after it), then randomness for the case of
    a clock set back across a restart."""
    global _last_stamp
    _last_stamp = max(time.time_ns() // 1000, _last_stamp + 1)
    return f"{_last_stamp:013X}{secrets.randbelow(0x10000):04X}"


def is_queue_id(name: str) -> bool:
    return _ID.fullmatch(name) is not None


def checked_id(queue_id: str) -> str:
    """Refuse ids that are not ours, so no path can be built from them."""
    if not _ID.fullmatch(queue_id):
        raise UnknownMessage(queue_id)
    return queue_id


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
        """The envelope as the queue first stores it."""
        recipients = [RecipientState(address, next_attempt=now) for address in self.remote]
        return QueuedMessage(
            id=queue_id,
            arrival=now,
            size=size,
            sender=self.sender,
            recipients=recipients,
            client=dict(self.client),
            authenticated=self.authenticated,
            body=self.body,
            smtputf8=self.smtputf8,
        ).to_json()


@dataclass
class RecipientState:
    address: str
    state: str = QUEUED
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    status: str | None = None
    remote: str | None = None
    last_attempt: float | None = None

    @property
    def pending(self) -> bool:
        return self.state == QUEUED


@dataclass
class QueuedMessage:
    id: str
    arrival: float
    size: int
    sender: str
    recipients: list[RecipientState]
    client: dict = field(default_factory=dict)
    authenticated: str | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    delay_warned: bool = False
    # Put on hold by the administrator: never tried until released.
    held: bool = False
    version: int = ENVELOPE_VERSION

    @classmethod
    def from_json(cls, data: bytes) -> QueuedMessage:
        """Parse a stored envelope; ValueError, TypeError, KeyError or
        AttributeError if it is not one this version wrote."""
        document = json.loads(data)
        if document.get("version") != ENVELOPE_VERSION:
            raise ValueError(f"unsupported envelope version {document.get('version')!r}")
        known = set(cls.__dataclass_fields__)
        fields = {k: v for k, v in document.items() if k in known}
        fields["recipients"] = [RecipientState(**r) for r in document["recipients"]]
        return cls(**fields)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.pending]

    def next_due(self) -> float | None:
        due = [r.next_attempt for r in self.recipients if r.pending]
        return min(due) if due else None
