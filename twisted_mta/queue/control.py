"""What ``twisted-mta queue`` does to the queue, daemon running or not.

Every change goes through ``QueueStore.update``/``remove`` under the queue
lock.  The daemon learns of it through ``queue/.flush``: the command
rewrites that file, the daemon watches it (inotify) and schedules the
whole queue again; a stopped daemon does the same at its next start.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from twisted_mta.queue.store import CorruptMessage, QueueStore
from twisted_mta.storage.envelope import FAILED, QueuedMessage, UnknownMessage
from twisted_mta.storage.files import write_atomically

FLUSH_FILE = ".flush"
ADMIN_BOUNCE_STATUS = "5.0.0"


def request_rescan(queue_dir: Path) -> None:
    """Tell a running daemon to look at the queue again now."""
    write_atomically(queue_dir / FLUSH_FILE, f"{time.time()}\n".encode(), 0o644)


def flush(store: QueueStore) -> int:
    """Make every pending recipient due now; return how many messages."""
    now = time.time()

    def due_now(message: QueuedMessage) -> None:
        for recipient in message.pending():
            recipient.next_attempt = now

    count = 0
    for queue_id in store.ids():
        try:
            store.update(queue_id, due_now)
        except (UnknownMessage, CorruptMessage):
            continue
        count += 1
    request_rescan(store.directory)
    return count


def bounce(store: QueueStore, queue_id: str) -> None:
    """Fail every pending recipient; the sender gets a DSN."""

    def fail(message: QueuedMessage) -> None:
        for recipient in message.pending():
            recipient.state = FAILED
            recipient.status = ADMIN_BOUNCE_STATUS
            recipient.last_error = "bounced by the administrator"

    store.update(queue_id, fail)
    request_rescan(store.directory)


def delete(store: QueueStore, queue_id: str) -> None:
    store.remove(queue_id)
    request_rescan(store.directory)


def describe(message: QueuedMessage, now: float) -> str:
    """The ``queue list`` block of one message."""
    age = _age(now - message.arrival)
    lines = [f"{message.id}  {age:>6}  {message.size:>9}  <{message.sender}>"]
    for recipient in message.recipients:
        error = f"  ({recipient.last_error})" if recipient.last_error else ""
        tries = f" after {recipient.attempts} attempt(s)" if recipient.attempts else ""
        lines.append(f"    <{recipient.address}>  {recipient.state}{tries}{error}")
    return "\n".join(lines)


def unreadable(store: QueueStore) -> list[str]:
    """Ids whose envelope cannot be read (the daemon moves them to corrupt/)."""
    broken = []
    for queue_id in store.ids():
        try:
            store.load(queue_id)
        except CorruptMessage:
            broken.append(queue_id)
        except UnknownMessage:
            continue
    return broken


def as_json(messages: list[QueuedMessage]) -> str:
    return json.dumps([json.loads(m.to_json()) for m in messages], indent=1)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
