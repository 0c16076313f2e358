"""What ``twisted-mta queue`` does to the queue, daemon running or not.

Every change goes through ``QueueStore.update_if``/``remove_if`` under the
queue lock, which check the selection again on the envelope as it is then.
The daemon learns of it through ``queue/control/flush``: the command
rewrites that file, the daemon watches its folder (inotify: a folder of
its own, so that the queue's own files raise no events) and schedules the
whole queue again; a stopped daemon does the same at its next start.  Hold and release work
the same way: ``held`` is in the envelope, the rescan leaves a held message
unscheduled, and a released one is made due now before the rescan.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from twisted_mta.queue.store import CorruptMessage, QueueStore
from twisted_mta.storage.envelope import FAILED, QueuedMessage, RecipientState, UnknownMessage
from twisted_mta.storage.files import write_atomically

CONTROL_DIR = "control"
FLUSH_FILE = "flush"
ADMIN_BOUNCE_STATUS = "5.0.0"


def control_dir(queue_dir: Path) -> Path:
    """Where the daemon listens for ``request_rescan``; made by the daemon
    at its start, as its run user."""
    return queue_dir / CONTROL_DIR


def request_rescan(queue_dir: Path) -> None:
    """Tell a running daemon to look at the queue again now.  Without the
    folder no daemon has started on this queue: its first start reads it
    whole anyway."""
    folder = control_dir(queue_dir)
    if folder.is_dir():
        write_atomically(folder / FLUSH_FILE, f"{time.time()}\n".encode(), 0o644)


@dataclass(frozen=True)
class Selection:
    """Which messages a command acts on: the named ids, if any, that match
    every pattern given; ``everything`` selects all when nothing else does."""

    ids: tuple[str, ...] = ()
    sender: str | None = None
    recipient: str | None = None
    everything: bool = False

    def is_empty(self) -> bool:
        patterns = self.sender is not None or self.recipient is not None
        return not (self.ids or self.everything or patterns)

    def matches(self, message: QueuedMessage) -> bool:
        if self.sender is not None and not wildcard_match(message.sender, self.sender):
            return False
        if self.recipient is None:
            return True
        return any(wildcard_match(r.address, self.recipient) for r in message.pending())


def wildcard_match(value: str, pattern: str) -> bool:
    """A shell-style pattern (``*``, ``?``, ``[...]``) matched against the
    whole of ``value``, ignoring case as mail systems do for domains and
    in practice for local parts."""
    return fnmatch.fnmatchcase(value.casefold(), pattern.casefold())


@dataclass
class Results:
    """What a command did: the messages changed, and the named ids it could
    not act on (not queued, or their envelope unreadable)."""

    done: list[QueuedMessage] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)


Act = Callable[[str], QueuedMessage | None]
Wanted = Callable[[QueuedMessage], bool]
Change = Callable[[QueuedMessage], None]


def flush(store: QueueStore) -> Results:
    """Make every pending recipient of the messages not on hold due now."""
    return _update(store, Selection(everything=True), lambda m: not m.held, _make_due(time.time()))


def hold(store: QueueStore, selection: Selection) -> Results:
    """Put the selected messages not yet on hold on hold."""

    def put_on_hold(message: QueuedMessage) -> None:
        message.held = True

    return _update(store, selection, lambda m: not m.held, put_on_hold)


def release(store: QueueStore, selection: Selection) -> Results:
    """Take the selected held messages off hold, due at once."""
    make_due = _make_due(time.time())

    def let_go(message: QueuedMessage) -> None:
        message.held = False
        make_due(message)

    return _update(store, selection, lambda m: m.held, let_go)


def bounce(store: QueueStore, selection: Selection) -> Results:
    """Fail every pending recipient of the selected messages; the daemon
    then returns them to their senders in one DSN each, as it does its own
    bounces (none for the null sender)."""

    def fail(message: QueuedMessage) -> None:
        for recipient in message.pending():
            recipient.state = FAILED
            recipient.status = ADMIN_BOUNCE_STATUS
            recipient.last_error = "bounced by the administrator"

    return _update(store, selection, lambda m: bool(m.pending()), fail)


def delete(store: QueueStore, selection: Selection) -> Results:
    """Remove the selected messages, telling nobody."""
    return _act(store, selection, lambda queue_id: store.remove_if(queue_id, selection.matches))


def _make_due(now: float) -> Change:
    def make_due(message: QueuedMessage) -> None:
        for recipient in message.pending():
            recipient.next_attempt = now

    return make_due


def _update(store: QueueStore, selection: Selection, also: Wanted, change: Change) -> Results:
    """``change`` each selected message for which ``also`` holds."""

    def wanted(message: QueuedMessage) -> bool:
        return selection.matches(message) and also(message)

    return _act(store, selection, lambda queue_id: store.update_if(queue_id, wanted, change))


def _act(store: QueueStore, selection: Selection, act: Act) -> Results:
    """Apply ``act`` to the selected ids (all, if none is named), then have a
    running daemon look at the queue.  ``act`` checks the selection under
    the queue lock, on the envelope as it is then: the daemon may be
    changing it."""
    results = Results()
    named = bool(selection.ids)
    for queue_id in selection.ids or store.ids():
        try:
            message = act(queue_id)
        except UnknownMessage:
            if named:
                results.missing.append(queue_id)
            continue
        except CorruptMessage as error:
            if named:
                results.unreadable[queue_id] = str(error).partition(": ")[2]
            continue
        if message is not None:
            results.done.append(message)
    if results.done:
        request_rescan(store.directory)
    return results


def describe(message: QueuedMessage, now: float) -> str:
    """The ``queue list`` block of one message."""
    age = _age(now - message.arrival)
    held = "  (on hold)" if message.held else ""
    lines = [f"{message.id}  {age:>6}  {message.size:>9}  <{message.sender}>{held}"]
    for recipient in message.recipients:
        error = f"  ({recipient.last_error})" if recipient.last_error else ""
        tries = f" after {recipient.attempts} attempt(s)" if recipient.attempts else ""
        lines.append(f"    <{recipient.address}>  {recipient.state}{tries}{error}")
    return "\n".join(lines)


def envelope_text(message: QueuedMessage, now: float) -> str:
    """The ``queue show`` text before the message: its envelope."""
    client = message.client
    lines = [
        f"id: {message.id}",
        f"arrival: {_when(message.arrival)} ({_age(now - message.arrival)} ago)",
        f"size: {message.size}",
        f"sender: <{message.sender}>",
        f"client: {client.get('ip', '-')}",
        f"listener: {client.get('listener', '-')}",
        f"authenticated: {message.authenticated or '-'}",
        f"body: {message.body}{' SMTPUTF8' if message.smtputf8 else ''}",
        f"held: {'yes' if message.held else 'no'}",
    ]
    for recipient in message.recipients:
        lines.extend(_recipient_lines(recipient, message.held))
    return "\n".join(lines) + "\n"


def _recipient_lines(recipient: RecipientState, held: bool) -> list[str]:
    lines = [
        f"recipient: <{recipient.address}>  {recipient.state}",
        f"    attempts: {recipient.attempts}",
    ]
    if recipient.pending:
        lines.append(f"    next try: {'on release' if held else _when(recipient.next_attempt)}")
    if recipient.last_error:
        status = f"{recipient.status} " if recipient.status else ""
        lines.append(f"    last error: {status}{recipient.last_error}")
    return lines


def read_message(store: QueueStore, queue_id: str) -> bytes:
    """The queued message's bytes as stored (LF line endings)."""
    try:
        return store.data_path(queue_id).read_bytes()
    except FileNotFoundError:
        raise UnknownMessage(queue_id) from None


def show_json(message: QueuedMessage, data: bytes) -> str:
    """The envelope as ``list --json`` gives it, and ``message``: the bytes
    as UTF-8, undecodable bytes replaced (U+FFFD) so that any JSON reader
    takes it; the exact bytes are in the text form."""
    document = _document(message)
    document["message"] = data.decode("utf-8", errors="replace")
    return json.dumps(document, indent=1)


def results_json(results: Results, action: str) -> str:
    """What ``hold``, ``release``, ``delete``, ``bounce`` and ``flush`` did:
    one object per message changed."""
    done = [{"id": m.id, "action": action, "sender": m.sender} for m in results.done]
    return json.dumps(done, indent=1)


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
    return json.dumps([_document(m) for m in messages], indent=1)


def _document(message: QueuedMessage) -> dict:
    return json.loads(message.to_json())


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(stamp))


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
