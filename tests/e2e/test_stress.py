"""Attacks on the real daemon that must not desynchronise or exhaust it,
and what a crash leaves behind."""

from __future__ import annotations

import os
import selectors
import smtplib
import socket
import threading
import time

from tests.helpers.daemon import make_daemon
from tests.helpers.raw import connect
from tests.helpers.silent_client import SilentTLSClient
from twisted_mta.smtp.input import MAX_AUTH_LINE

# Every slot of a scaled-down server taken by slow chatter from five
# addresses, as 1,000 connections from 50 addresses took a default one.
MAX_CONNECTIONS = 50
ATTACKERS = [f"127.0.0.{n}" for n in range(2, 7)]
PER_ATTACKER = MAX_CONNECTIONS // len(ATTACKERS)
LIMITS = f"""
[limits]
max_connections = {MAX_CONNECTIONS}
max_connections_per_ip = {PER_ATTACKER}
"""
CHATTER = b"NOOP\r\n"
PACE = 1.0  # seconds between two bytes of one connection
SERVED_WITHIN = 30.0
MESSAGE = b"Subject: through the slowloris\r\n\r\nhello\r\n"


def test_an_over_long_auth_line_ends_the_exchange_and_quit_is_a_command(mta):
    with SilentTLSClient(mta.ports["submissions"]) as client:
        assert client.banner.startswith(b"220 ")
        assert client.command(b"EHLO client.example.org").startswith(b"250")
        assert client.command(b"AUTH LOGIN").startswith(b"334 ")
        client.send(b"A" * (MAX_AUTH_LINE + 100) + b"\r\n")
        refusal = client.read_reply()
        assert refusal.startswith(b"501 5.5.2 Error: line too long"), refusal
        assert client.command(b"QUIT").startswith(b"221 ")
        assert client.wait_for_close() < 5


def test_bidi_and_line_separators_stay_out_of_addresses_and_logs(mta):
    with connect(mta) as raw:
        raw.expect("EHLO client\u2028\u202e.example.org".encode(), 250)
        raw.expect("MAIL FROM:<boss\u202egro.elpmaxe@example.org> SMTPUTF8".encode(), 553, b"5.1.7")
        raw.expect("MAIL FROM:<a@example.org> SMTPUTF8".encode(), 250)
        raw.expect("RCPT TO:<info\u2029x@example.test>".encode(), 553, b"5.1.3")
        raw.expect(b"RCPT TO:<nobody@example.test>", 550, b"5.1.1")
    line = mta.wait_for_log(r"reject: RCPT .* to=<nobody@example.test>")
    assert "helo=<client\\u2028\\u202e.example.org>" in line
    assert not [entry for entry in mta.log if "\u2028" in entry or "\u202e" in entry]


class SlowChatter:
    """Connections that send NOOP one byte a second, read what comes, and
    never reconnect; one thread drives them all."""

    def __init__(self, port: int, addresses: list[str], per_address: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.total = len(addresses) * per_address
        self.greeted: set[socket.socket] = set()
        self.closed = 0
        self.changed = threading.Condition()
        self._stop = threading.Event()
        for address in addresses:
            for _ in range(per_address):
                sock = socket.create_connection(("127.0.0.1", port), source_address=(address, 0))
                sock.setblocking(False)
                self.selector.register(sock, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def wait(self, condition, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(condition, timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()

    def _run(self) -> None:
        sent, next_byte = 0, time.monotonic()
        while not self._stop.is_set() and self.selector.get_map():
            if time.monotonic() >= next_byte:
                self._send_to_all(CHATTER[sent % len(CHATTER) : sent % len(CHATTER) + 1])
                sent, next_byte = sent + 1, next_byte + PACE
            timeout = max(0.0, min(next_byte - time.monotonic(), 0.2))
            for key, _ in self.selector.select(timeout):
                self._read(key.fileobj)

    def _send_to_all(self, byte: bytes) -> None:
        for key in list(self.selector.get_map().values()):
            try:
                key.fileobj.send(byte)
            except OSError:
                pass  # closed by the server: the read side notices

    def _read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        with self.changed:
            if not data:
                self.selector.unregister(sock)
                sock.close()
                self.closed += 1
            elif data.startswith(b"220 "):
                self.greeted.add(sock)
            self.changed.notify_all()


def send_when_served(port: int, attack: SlowChatter, deadline: float) -> list[int]:
    """Try to send a message; after each 421 at connect, try again once a
    slow connection is gone.  The codes of the refused tries."""
    refusals = []
    while time.monotonic() < deadline:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=SERVED_WITHIN) as client:
                assert client.sendmail("sender@example.org", ["postmaster@example.test"], MESSAGE) == {}
                return refusals
        except smtplib.SMTPConnectError as error:
            refusals.append(error.smtp_code)
        closed = attack.closed
        attack.wait(lambda: attack.closed > closed, deadline - time.monotonic())
    raise AssertionError(f"not served within {SERVED_WITHIN:g} s; refused {refusals}")


def test_slow_chatter_on_every_slot_gives_way_to_a_client_with_mail(start_mta):
    daemon = start_mta(extra=LIMITS)
    port = daemon.ports["smtp"]
    attack = SlowChatter(port, ATTACKERS, PER_ATTACKER)
    try:
        assert attack.wait(lambda: len(attack.greeted) == attack.total, 30)
        started = time.monotonic()
        refusals = send_when_served(port, attack, started + SERVED_WITHIN)
        served_after = time.monotonic() - started
        cut = attack.closed
    finally:
        attack.stop()
    print(
        f"\nslowloris: {attack.total} connections sending {CHATTER!r} a byte per {PACE:g} s;"
        f" a client with mail was served after {served_after:.1f} s"
        f" ({len(refusals)} tries refused, {cut} slow connections cut by then)"
    )
    assert refusals and set(refusals) == {421}  # every slot was taken
    assert served_after < SERVED_WITHIN
    assert [m for m in daemon.messages("example.test", "postmaster") if b"slowloris" in m]
    daemon.wait_for_log(f"stress mode on: {int(0.8 * MAX_CONNECTIONS) + 1} of {MAX_CONNECTIONS}")


def test_a_start_sweeps_what_a_crash_left_in_maildir_tmp(tmp_path):
    daemon = make_daemon(tmp_path / "mta")
    tmp = daemon.spool / "mail" / "example.test" / "postmaster" / "tmp"
    tmp.mkdir(parents=True)
    two_days_ago = time.time() - 48 * 3600
    for n in range(2):
        left = tmp / f"{int(two_days_ago)}.M{n}P4242Q{n}.crashed-host"
        left.write_bytes(b"Subject: half written")
        os.utime(left, (two_days_ago, two_days_ago))
    recent = tmp / f"{int(time.time())}.M0P4242Q9.crashed-host"
    recent.write_bytes(b"being written")
    daemon.start()
    try:
        daemon.wait_for_log(r"removed 2 stale temporary file\(s\) from maildir tmp/")
        assert list(tmp.iterdir()) == [recent]
    finally:
        daemon.stop()
