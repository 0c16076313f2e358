"""The durability promise: a crash after the 250 loses nothing.

Ten clients send continuously, each message with its own marker and size;
the daemon is SIGKILLed once enough messages were acknowledged while others
are still being transferred or committed.  After a restart on the same
folder every acknowledged message must be stored exactly once and byte for
byte, and nothing half-written may be visible: not in a Maildir's new/, not
in the queue (a ``.msg`` without its ``.env``, temporary files).  Under the
same load, SIGHUPs and a drained SIGTERM keep exactly the acknowledged
messages.
"""

from __future__ import annotations

import json
import random
import re
import signal
import smtplib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.daemon import Daemon, queue_id

CLIENTS = 10
KILL_AFTER = 40  # acknowledgements
KILL_WHILE_IN_FLIGHT = 5  # transactions between MAIL and the reply to the dot
WAIT = 30.0
USERS = "".join(f"user{i}@example.test:{{PLAIN}}pw\n" for i in range(CLIENTS))
SENDER = "load@example.org"
MARKER = re.compile(rb"^Message-ID: <([\w.]+)@crash\.test>$", re.MULTILINE)
NAME_SIZE = re.compile(r",S=(\d+)$")
RECEIVED = rb"Received: from client\.example\.org \(\[127\.0\.0\.1\]\)\n(?:\t.*\n)+"


@dataclass
class Ledger:
    """What the clients sent and which messages got their 250."""

    sent: dict[str, bytes] = field(default_factory=dict)
    acknowledged: dict[str, str] = field(default_factory=dict)  # marker -> queue id
    in_flight: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def start(self, marker: str, body: bytes) -> None:
        with self.changed:
            self.sent[marker] = body
            self.in_flight += 1

    def finish(self, marker: str, reply: tuple[int, bytes] | None) -> None:
        with self.changed:
            self.in_flight -= 1
            if reply is not None and reply[0] == 250:
                self.acknowledged[marker] = queue_id(reply[1])
            self.changed.notify_all()

    def wait_for_crash_moment(self) -> None:
        with self.changed:
            moment = self.changed.wait_for(
                lambda: len(self.acknowledged) >= KILL_AFTER
                and self.in_flight >= KILL_WHILE_IN_FLIGHT,
                WAIT,
            )
        assert moment, f"only {len(self.acknowledged)} messages acknowledged"


def body_for(marker: str, rng: random.Random) -> bytes:
    """A message from 1 to 200 KiB, so that the kill finds some mid-DATA."""
    lines = rng.randint(10, 2600)
    filler = b"".join(
        f"{marker} line {n:05d} ".encode().ljust(76, b"z") + b"\r\n" for n in range(lines)
    )
    return f"Message-ID: <{marker}@crash.test>\r\nSubject: {marker}\r\n\r\n".encode() + filler


def client(port: int, number: int, recipient: str, ledger: Ledger) -> None:
    """Send until the daemon dies; record each 250 only once it is read."""
    rng = random.Random(number)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as smtp:
            smtp.ehlo("client.example.org")
            for sequence in range(1_000_000):
                marker = f"c{number}.{sequence}"
                body = body_for(marker, rng)
                ledger.start(marker, body)
                reply = None
                try:
                    smtp.mail(SENDER)
                    smtp.rcpt(recipient)
                    reply = smtp.data(body)
                finally:
                    ledger.finish(marker, reply)
    except (smtplib.SMTPException, OSError):
        return  # the daemon was killed


def start_load(daemon: Daemon, recipient: Callable[[int], str]) -> tuple[Ledger, list]:
    """Ten clients sending to the daemon until it goes away."""
    ledger = Ledger()
    port = daemon.ports["smtp"]
    threads = [
        threading.Thread(target=client, args=(port, n, recipient(n), ledger), daemon=True)
        for n in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    return ledger, threads


def crash_under_load(daemon: Daemon, recipient: Callable[[int], str]) -> Ledger:
    """Load the daemon, SIGKILL it at the crash moment, restart it."""
    ledger, threads = start_load(daemon, recipient)
    try:
        ledger.wait_for_crash_moment()
    finally:
        daemon.kill()
    for thread in threads:
        thread.join(WAIT)
    daemon.start()
    return ledger


def split_stored(data: bytes, ledger: Ledger, trace: bytes) -> str:
    """Check ``data`` is ``trace`` headers + a sent message, exactly; its marker."""
    [marker] = MARKER.findall(data)
    marker = marker.decode()
    expected = ledger.sent[marker].replace(b"\r\n", b"\n")
    assert data.endswith(expected), f"{marker} is not complete"
    assert re.fullmatch(trace, data[: -len(expected)]), data[:400]
    return marker


def test_sigkill_loses_no_acknowledged_maildir_message(start_mta):
    daemon = start_mta(users=USERS)
    ledger = crash_under_load(daemon, lambda n: f"user{n}@example.test")
    stored = stored_in_maildirs(daemon, ledger)
    assert set(ledger.acknowledged) <= set(stored), "acknowledged messages were lost"
    assert set(stored.values()) == {1}, "a message was stored twice"


def test_sighup_and_sigterm_under_load_lose_nothing_and_store_nothing_unacknowledged(start_mta):
    daemon = start_mta(users=USERS)
    ledger, threads = start_load(daemon, lambda n: f"user{n}@example.test")
    try:
        ledger.wait_for_crash_moment()
        for reloads in range(1, 4):
            daemon.process.send_signal(signal.SIGHUP)
            assert daemon.wait_for(lambda: reloaded(daemon) == reloads, WAIT)
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(WAIT) == 0
    finally:
        daemon.kill()
    for thread in threads:
        thread.join(WAIT)
    stored = stored_in_maildirs(daemon, ledger)
    assert set(stored) == set(ledger.acknowledged), "lost, or stored without a 250"
    assert set(stored.values()) == {1}, "a message was stored twice"


def reloaded(daemon: Daemon) -> int:
    return sum("reload: config" in line and "re-read" in line for line in daemon.log)


def stored_in_maildirs(daemon: Daemon, ledger: Ledger) -> dict[str, int]:
    """How many times each message is in the users' Maildirs."""
    stored: dict[str, int] = {}
    for n in range(CLIENTS):
        new = daemon.maildir("example.test", f"user{n}") / "new"
        trace = (
            rf"Return-Path: <{SENDER}>\nDelivered-To: user{n}@example\.test\n".encode()
            + RECEIVED
        )
        for path in new.iterdir():
            data = path.read_bytes()
            assert int(NAME_SIZE.search(path.name).group(1)) == len(data)
            marker = split_stored(data, ledger, trace)
            stored[marker] = stored.get(marker, 0) + 1
    return stored


def test_sigkill_loses_no_acknowledged_queued_message(start_mta):
    # A smart host that refuses connections keeps the messages queued
    # whatever the relay does at start.
    extra = '[relay]\nsmarthost = "127.0.0.1:1"\nsmarthost_tls = "none"\n'
    daemon = start_mta(users=USERS, extra=extra)
    ledger = crash_under_load(daemon, lambda n: f"user{n}@remote.example")
    queue = daemon.spool / "queue"
    names = {p.name for p in queue.iterdir() if p.is_file() and not p.name.startswith(".")}
    stems = {name.rsplit(".", 1)[0] for name in names}
    assert names == {f"{s}.msg" for s in stems} | {f"{s}.env" for s in stems}, "orphans left"
    assert {qid for qid in ledger.acknowledged.values()} <= stems, "acknowledged messages lost"
    for stem in stems:
        marker = split_stored((queue / f"{stem}.msg").read_bytes(), ledger, RECEIVED)
        envelope = json.loads((queue / f"{stem}.env").read_text())
        assert envelope["version"] == 1 and envelope["sender"] == SENDER
        number = marker[1:].split(".")[0]
        assert [r["address"] for r in envelope["recipients"]] == [f"user{number}@remote.example"]
        if marker in ledger.acknowledged:
            assert ledger.acknowledged[marker] == stem
    assert_maildirs_empty(daemon.spool / "mail")


def assert_maildirs_empty(mail: Path) -> None:
    assert not mail.exists() or not [p for p in mail.rglob("*") if p.is_file()]
