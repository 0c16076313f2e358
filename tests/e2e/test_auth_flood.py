"""A password guesser that hangs up, against the real daemon.

One address floods AUTH PLAIN guesses over parallel implicit-TLS
connections, each hung up as soon as it is answered or 0.8 s after its
guess, whichever comes first (a failure used to be answered late and a
success at once, so the hang-up told "wrong").  The daemon must check at
most 10 of its guesses a minute, and a client at another address must log
in within 2 s meanwhile.  The figures are printed (``pytest -s``).
"""

import base64
import math
import os
import re
import socket
import ssl
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers.daemon import fresh_client_address, insecure_context, make_daemon
from twisted_mta.auth.passwords import hash_password

FLOOD_SECONDS = 12.0
CONNECTIONS = 10
HANG_UP_AFTER = 0.8
CHECKS_PER_MINUTE = 10
# The daemon's default [limits] workers: each worker process runs its own
# checks until the failures found by the others reach it, so a flood from
# one address may get this bound once per worker (README, "Processes").
WORKERS = os.cpu_count() or 1
LOGIN_WITHIN = 2.0


@pytest.fixture
def mta(tmp_path):
    users = "".join(
        f"{address}:{hash_password(scheme, password)}\n"
        for address, scheme, password in (
            ("alice@example.test", "argon2id", "alice-pw"),
            ("bob@example.test", "blf-crypt", "bob-pw"),
        )
    )
    daemon = make_daemon(tmp_path / "mta", users=users)
    daemon.start()
    yield daemon
    daemon.stop()


def _guess(number: int) -> bytes:
    credentials = f"\0alice@example.test\0guess-{number}".encode()
    return b"AUTH PLAIN " + base64.b64encode(credentials) + b"\r\n"


class Guesser:
    """Guess over ``CONNECTIONS`` connections from ``source`` until ``deadline``."""

    def __init__(self, port: int, source: str, deadline: float) -> None:
        self.port = port
        self.source = source
        self.deadline = deadline
        self.sent = 0
        self.answers: Counter[str] = Counter()
        self._lock = threading.Lock()

    def run(self) -> None:
        threads = [threading.Thread(target=self._connection_loop) for _ in range(CONNECTIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _connection_loop(self) -> None:
        context = insecure_context()
        while time.monotonic() < self.deadline:
            try:
                self._one_guess(context)
            except OSError:
                self._count("connection refused or reset")

    def _one_guess(self, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), 5, (self.source, 0))
        with context.wrap_socket(raw) as connection:
            reader = connection.makefile("rb")
            if not reader.readline().startswith(b"220"):
                self._count("no banner")
                return
            connection.sendall(b"EHLO guesser.example.org\r\n")
            while reader.readline()[3:4] == b"-":
                pass
            with self._lock:
                self.sent += 1
                number = self.sent
            connection.sendall(_guess(number))
            connection.settimeout(HANG_UP_AFTER)
            try:
                self._count(reader.readline()[:3].decode() or "closed")
            except TimeoutError:
                self._count("hung up")

    def _count(self, what: str) -> None:
        with self._lock:
            self.answers[what] += 1


def _login_seconds(port: int, source: str) -> float:
    """Connect, TLS, EHLO and AUTH PLAIN as alice: seconds until the 235."""
    started = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", port), 10, (source, 0))
    with insecure_context().wrap_socket(raw) as connection:
        reader = connection.makefile("rb")
        reader.readline()
        connection.sendall(b"EHLO client.example.org\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        connection.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0alice-pw") + b"\r\n")
        reply = reader.readline()
    assert reply.startswith(b"235 "), reply
    return time.monotonic() - started


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def test_hang_up_flood_gets_few_checks_and_others_log_in(mta):
    port = mta.ports["submissions"]
    rss_before = _rss_mib(mta.process.pid)
    attacker, user = fresh_client_address(), fresh_client_address()
    started = time.monotonic()
    guesser = Guesser(port, attacker, started + FLOOD_SECONDS)
    flood = threading.Thread(target=guesser.run)
    flood.start()
    logins = []
    while time.monotonic() < started + FLOOD_SECONDS - LOGIN_WITHIN:
        logins.append(_login_seconds(port, user))
    flood.join()
    flood_seconds = time.monotonic() - started
    rss_after = _rss_mib(mta.process.pid)
    checked = [line for line in mta.log if re.search(rf"auth failed: client=\[{re.escape(attacker)}\]", line)]
    allowed = CHECKS_PER_MINUTE * math.ceil(flood_seconds / 60) * WORKERS
    print(
        f"\nflood from {attacker}: {flood_seconds:.1f} s, {CONNECTIONS} connections,"
        f" {guesser.sent} guesses sent, answers {dict(guesser.answers)};"
        f" {len(checked)} passwords checked (at most {allowed} allowed),"
        f" {guesser.answers['454']} AUTH refused without a check;"
        f" logins from {user}: {len(logins)}, slowest {max(logins):.2f} s;"
        f" daemon RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after"
    )
    assert guesser.sent > 5 * len(checked), "the flood did flood"
    assert 1 <= len(checked) <= allowed
    assert max(logins) < LOGIN_WITHIN
    assert "235" not in guesser.answers
