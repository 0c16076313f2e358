"""Signals: SIGHUP reloads, certificates follow their files, SIGTERM drains."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.helpers.certificates import make_certificate, peer_certificate
from tests.helpers.daemon import Daemon, queue_id

USERS = "alice@example.test:{PLAIN}alice-secret\n"
MESSAGE = b"Subject: drain\r\n\r\nbody line\r\n"


def tls_section(directory) -> str:
    return f'[tls]\ncertificate = "{directory}/cert.pem"\nprivate_key = "{directory}/key.pem"\n'


def served_certificate(daemon):
    with daemon.smtp("submissions") as client:
        return peer_certificate(client)


def hup(daemon) -> str:
    """Send SIGHUP and wait for the reload's log line."""
    seen = len(daemon.log)
    daemon.process.send_signal(signal.SIGHUP)
    assert daemon.wait_for(lambda: any("reload:" in line for line in daemon.log[seen:]))
    return next(line for line in daemon.log[seen:] if "reload:" in line)


def rcpt(daemon, recipient: str) -> int:
    with daemon.smtp() as client:
        client.ehlo("client.example.org")
        client.mail("sender@example.org")
        return client.rcpt(recipient)[0]


def test_sighup_rereads_the_config(start_mta):
    daemon = start_mta(users=USERS)
    assert rcpt(daemon, "nobody@new.example") == 250  # relayed: 127.0.0.1 may relay
    text = daemon.config.read_text()
    daemon.config.write_text(text.replace('local = ["example.test"', 'local = ["new.example", "example.test"'))
    assert "re-read" in hup(daemon)
    assert rcpt(daemon, "nobody@new.example") == 550  # now a local domain
    assert daemon.process.poll() is None


def test_sighup_with_a_broken_config_keeps_the_running_one(start_mta):
    daemon = start_mta(users=USERS)
    text = daemon.config.read_text()
    daemon.config.write_text(text + "\n[limits]\nmax_recipients = -1\n")
    line = hup(daemon)
    assert "max_recipients" in line and "keeping the running config" in line
    assert len([entry for entry in daemon.log if "reload:" in entry]) == 1  # one line
    assert rcpt(daemon, "alice@example.test") == 250
    daemon.config.write_text(text.replace('local = ["example.test"', 'local = ["new.example", "example.test"'))
    assert "re-read" in hup(daemon)
    assert rcpt(daemon, "nobody@new.example") == 550


def test_sighup_says_which_changes_need_a_restart(start_mta):
    daemon = start_mta(users=USERS)
    daemon.config.write_text(daemon.config.read_text().replace('spool = "var"', 'spool = "other"'))
    assert "spool: at the next restart" in hup(daemon)
    assert rcpt(daemon, "alice@example.test") == 250


def test_sighup_reloads_the_certificate(start_mta, tmp_path):
    (tmp_path / "tls").mkdir()
    first = make_certificate(tmp_path / "tls", "old.example.test")
    daemon = start_mta(users=USERS, extra=tls_section(tmp_path / "tls"))
    assert served_certificate(daemon) == first
    second = make_certificate(tmp_path / "tls", "new.example.test")
    hup(daemon)
    assert served_certificate(daemon) == second


@dataclass
class Renewal:
    """A daemon serving ``first`` from ``live``; ``second`` waits in ``staging``."""

    daemon: Daemon
    live: Path
    staging: Path
    first: object
    second: object

    def move(self, name: str) -> None:
        os.rename(self.staging / name, self.live / name)


@pytest.fixture
def renewal(start_mta, tmp_path) -> Renewal:
    live, staging = tmp_path / "tls", tmp_path / "staging"
    live.mkdir()
    staging.mkdir()
    first = make_certificate(live, "old.example.test")
    daemon = start_mta(users=USERS, extra=tls_section(live))
    assert served_certificate(daemon) == first
    second = make_certificate(staging, "new.example.test")
    return Renewal(daemon, live, staging, first, second)


def test_a_renewed_certificate_is_served_without_a_signal(renewal):
    renewal.move("key.pem")
    renewal.move("cert.pem")
    renewal.daemon.wait_for_log(r"tls: certificate reloaded from .*cert\.pem", timeout=10)
    assert served_certificate(renewal.daemon) == renewal.second


def test_a_renewal_half_done_keeps_the_old_certificate_until_the_pair_matches(renewal):
    daemon = renewal.daemon
    renewal.move("cert.pem")  # the key comes later
    daemon.wait_for_log(r"tls: .*key\.pem is not the private key of the certificate", timeout=10)
    assert served_certificate(daemon) == renewal.first
    renewal.move("key.pem")
    daemon.wait_for_log(r"tls: certificate reloaded from .*cert\.pem", timeout=10)
    assert served_certificate(daemon) == renewal.second
    assert len([line for line in daemon.log if "is not the private key" in line]) == 1


# -- SIGTERM -------------------------------------------------------------------


@dataclass
class RawSession:
    sock: socket.socket
    reader: BinaryIO

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)


def open_data(daemon) -> RawSession:
    """A raw session left in the middle of DATA."""
    sock = socket.create_connection(("127.0.0.1", daemon.ports["smtp"]), timeout=30)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220")
    sock.sendall(b"EHLO client.example.org\r\n")
    while not reader.readline().startswith(b"250 "):
        pass
    for line in (b"MAIL FROM:<sender@example.org>", b"RCPT TO:<alice@example.test>", b"DATA"):
        sock.sendall(line + b"\r\n")
        assert reader.readline()[:3] in (b"250", b"354")
    sock.sendall(MESSAGE[:10])
    return RawSession(sock, reader)


def idle_session(daemon) -> smtplib.SMTP:
    client = daemon.smtp()
    client.ehlo("client.example.org")
    return client


def test_sigterm_lets_data_finish_and_tells_the_others_421(start_mta):
    daemon = start_mta(users=USERS)
    in_data = open_data(daemon)
    idle = idle_session(daemon)
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for_log("SIGTERM: shutting down")
    # The idle session hears 421 at once, unasked.
    assert idle.getreply() == (421, b"4.3.2 mx.example.test Service shutting down, closing connection")
    # New connections are no longer taken.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", daemon.ports["smtp"]), timeout=5)
    in_data.sendall(MESSAGE[10:] + b".\r\n")
    reply = in_data.reader.readline()
    assert reply.startswith(b"250 2.0.0 Ok: queued as ")
    assert in_data.reader.readline().startswith(b"421 4.3.2")
    assert daemon.process.wait(timeout=20) == 0
    [stored] = daemon.messages("example.test", "alice")
    assert stored.endswith(MESSAGE.replace(b"\r\n", b"\n"))
    assert daemon.wait_for(lambda: f"id={queue_id(reply)}" in "\n".join(daemon.log))


def test_sigterm_cuts_a_transfer_that_does_not_finish_in_time(start_mta):
    daemon = start_mta(users=USERS, extra='[limits]\nshutdown_timeout = "1s"\n')
    stalled = open_data(daemon)
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for_log(r"shutdown: 1 session\(s\) did not finish in time, cut")
    assert daemon.process.wait(timeout=20) == 0
    with pytest.raises(ConnectionResetError):  # cut, no reply: nothing acknowledged
        stalled.reader.read()
    assert daemon.messages("example.test", "alice") == []
    restarted = daemon.start()
    assert restarted.messages("example.test", "alice") == []


def test_sigterm_with_no_session_exits_zero_at_once(start_mta):
    daemon = start_mta(users=USERS)
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=20) == 0


def test_the_daemon_starts_again_after_a_drained_stop(start_mta):
    daemon = start_mta(users=USERS)
    daemon.process.send_signal(signal.SIGTERM)
    daemon.process.wait(timeout=20)
    daemon.start()
    assert rcpt(daemon, "alice@example.test") == 250


def test_sighup_changes_the_trusted_proxies(start_mta):
    extra = '[proxy]\nlisteners = ["smtp"]\ntrusted = ["127.0.0.2/32"]\n'
    daemon = start_mta(users=USERS, extra=extra)
    header = b"PROXY TCP4 203.0.113.9 127.0.0.1 5000 25\r\n"

    def banner() -> bytes:
        """The first line, or b"" if the connection is closed (or reset:
        the header may arrive after the close)."""
        with socket.create_connection(("127.0.0.1", daemon.ports["smtp"]), timeout=10) as sock:
            try:
                sock.sendall(header)
                return sock.makefile("rb").readline()
            except ConnectionResetError:
                return b""

    assert banner() == b""  # 127.0.0.1 is not a trusted proxy: closed without a word
    daemon.config.write_text(daemon.config.read_text().replace("127.0.0.2/32", "127.0.0.1/32"))
    hup(daemon)
    assert banner().startswith(b"220 mx.example.test ESMTP")
