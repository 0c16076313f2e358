"""The milter plugin in the real daemon with a real milter: Debian's
OpenDKIM signs mail from its domain, and the signature it added verifies
against the key it signed with.  Also: a milter that cannot be reached."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import Daemon, make_daemon

OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
GENKEY = shutil.which("opendkim-genkey") or "/usr/sbin/opendkim-genkey"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "opendkim exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"opendkim is not listening on {port}")


class OpenDKIM:
    def __init__(self, folder: Path, canonicalization: str) -> None:
        self.folder = folder
        self.canonicalization = canonicalization
        self.port = free_port()

    @property
    def socket(self) -> str:
        return f"inet:{self.port}@127.0.0.1"

    def public_key_record(self) -> bytes:
        """The TXT record opendkim-genkey wrote, its strings joined."""
        text = (self.folder / "test.txt").read_text()
        return "".join(re.findall(r'"([^"]*)"', text)).encode()


# Simple canonicalization signs headers byte for byte, folds included.
@pytest.fixture(params=["relaxed/simple", "simple/simple"])
def opendkim(request, tmp_path) -> Iterator[OpenDKIM]:
    """OpenDKIM in the foreground, signing for example.test with a fresh
    key, on a free loopback port; 127.0.0.1 is one of its internal hosts."""
    milter = OpenDKIM(tmp_path / "dkim", request.param)
    milter.folder.mkdir()
    subprocess.run(
        [GENKEY, "-D", str(milter.folder), "-d", "example.test", "-s", "test"],
        check=True, timeout=60,
    )
    config = milter.folder / "opendkim.conf"
    config.write_text(
        f"""Domain example.test
Selector test
KeyFile {milter.folder / "test.private"}
Socket {milter.socket}
Mode sv
Canonicalization {milter.canonicalization}
# The key sits under pytest's tmp folder, below a world-writable /tmp.
RequireSafeKeys false
Syslog false
"""
    )
    process = subprocess.Popen(
        [OPENDKIM, "-f", "-x", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_listening(milter.port, process)
        yield milter
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def daemon_with_milter(tmp_path: Path, socket_name: str, extra: str = "") -> Daemon:
    plugins = f"""
[plugins]
enabled = ["milter"]
timeout = "20s"
[plugins.milter]
socket = "{socket_name}"
timeout = "5s"
{extra}
"""
    return make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES, extra=plugins)


MESSAGE = (
    b"From: Friend <friend@example.test>\r\n"
    b"To: Alice <alice@example.test>\r\n"
    b"Subject: signed by a real milter,\r\n\twith a folded subject\r\n"
    b"Message-ID: <milter-1@example.test>\r\n"
    b"Date: Sat, 05 Dec 2026 10:00:00 +0000\r\n"
    b"\r\n"
    b"Hello Alice,\r\n\r\nthis line, and the next, are signed.\r\n"
    # Several body packets' worth.
    + b"".join(b"Line %d of a long body.\r\n" % n for n in range(6000))
)


def test_opendkim_signs_mail_from_its_domain_and_the_signature_verifies(tmp_path, opendkim):
    daemon = daemon_with_milter(tmp_path, opendkim.socket).start()
    try:
        with daemon.smtp() as client:
            client.ehlo("client.example.org")
            assert client.mail("friend@example.test")[0] == 250
            assert client.rcpt("alice@example.test")[0] == 250
            assert client.data(MESSAGE)[0] == 250
            # Mail from another domain passes unsigned.
            assert client.mail("someone@elsewhere.example")[0] == 250
            assert client.rcpt("alice@example.test")[0] == 250
            foreign = MESSAGE.replace(b"friend@example.test", b"x@elsewhere.example")
            assert client.data(foreign)[0] == 250
        assert daemon.wait_for(lambda: len(daemon.messages("example.test", "alice")) == 2)
    finally:
        daemon.stop()
    signed, unsigned = sorted(
        daemon.messages("example.test", "alice"), key=lambda m: b"DKIM-Signature:" not in m
    )
    head = signed.split(b"\n\n", 1)[0]
    canonicalization = opendkim.canonicalization.encode()
    signature = rb"\nDKIM-Signature: v=1; a=rsa-sha256; c=%s;\s+d=example.test;" % canonicalization
    assert re.search(signature, head)
    # Prepended above our own Received header, as Postfix does.
    assert head.index(b"DKIM-Signature:") < head.index(b"Received: from client.example.org")
    assert b"DKIM-Signature:" not in unsigned

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return opendkim.public_key_record() if name == b"test._domainkey.example.test." else None

    wire = signed.replace(b"\n", b"\r\n")
    assert dkim.verify(wire, dnsfunc=dns)
    # The signature covers the body: a changed body fails it.
    assert not dkim.verify(wire.replace(b"Hello Alice", b"Hello Mallory"), dnsfunc=dns)


def test_a_milter_that_cannot_be_reached_is_a_451_or_passed_over(tmp_path):
    closed = f"inet:{free_port()}@127.0.0.1"
    daemon = daemon_with_milter(tmp_path, closed).start()
    try:
        with daemon.smtp() as client:
            client.ehlo("client.example.org")
            code, text = client.mail("friend@example.test")
            assert (code, text) == (451, b"4.3.0 Temporary policy failure, try again later")
        daemon.wait_for_log(r"plugin milter: mail_from failed: MilterError: cannot connect")
    finally:
        daemon.stop()

    daemon = daemon_with_milter(tmp_path / "again", closed, 'default_action = "accept"').start()
    try:
        with daemon.smtp() as client:
            client.ehlo("client.example.org")
            assert client.mail("friend@example.test")[0] == 250
            assert client.rcpt("alice@example.test")[0] == 250
            assert client.data(MESSAGE)[0] == 250
        daemon.wait_for_log(r"milter: mail_from: cannot connect.*passed over")
        assert daemon.wait_for(lambda: daemon.messages("example.test", "alice"))
    finally:
        daemon.stop()
