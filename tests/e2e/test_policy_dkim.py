"""The dkim plugin in the real daemon: keys made with ``twisted-mta dkim
keygen``, mail submitted by an authenticated user and relayed to a
capture smart host arrives signed, and the signature verifies with dkimpy
and with OpenDKIM (``opendkim -t`` reading the key from
``TestPublicKeys``: ``opendkim-testmsg`` can only ask DNS for it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import dkim
import pytest

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.capture import Behaviour, CaptureServer
from tests.helpers.daemon import Daemon, make_daemon
from tests.helpers.relay_fixtures import (
    CLI,
    relay_config,
    single_dsn,
    submit,
    wait_attempt,
    wait_notification,
)

ALICE = ("alice@example.test", "alice-secret")
SELECTOR = {"rsa": "mta", "ed25519": "ed"}
OPENDKIM = shutil.which("opendkim")  # Debian's opendkim, installed by .ci/run


def keygen(daemon: Daemon, kind: str) -> str:
    """Make a key with the command, into the configured folder; the
    ``name text`` of its TXT record."""
    selector = SELECTOR[kind]
    command = [CLI, "dkim", "keygen", "example.test", "--type", kind, "--config"]
    command += [str(daemon.config), "--selector", selector]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    name, _, strings = result.stdout.splitlines()[-1].partition(" IN TXT ")
    text = "".join(re.findall(r'"([^"]*)"', strings))
    return f"{name.rstrip('.')} {text}"


def daemon_for(tmp_path: Path, server: CaptureServer, selector: str) -> Daemon:
    extra = relay_config(smarthost=f"{server.host}:{server.port}", smarthost_tls="none")
    extra += f'[plugins]\nenabled = ["dkim"]\n[plugins.dkim]\nselector = "{selector}"\n'
    daemon = make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES, extra=extra)
    (daemon.spool / "dkim").mkdir(parents=True)
    return daemon


def relayed(daemon: Daemon, server: CaptureServer, login=ALICE) -> bytes:
    """Submit one message to a remote recipient; what the smart host got,
    CRLF line ends."""
    sent = (
        b"From: Alice <alice@example.test>\r\nTo: far@remote.example\r\n"
        b"Subject: signed\r\nMessage-ID: <dkim@example.test>\r\n\r\nHello,\r\n.dot\r\n"
    )
    queue_id = submit(daemon, "alice@example.test", ["far@remote.example"], sent, login=login)
    wait_attempt(daemon, queue_id, "far@remote.example", "sent")
    transaction = server.transactions[-1]
    return transaction.message.replace(b"\n", b"\r\n")


def dnsfunc_for(record: str):
    name, _, text = record.partition(" ")

    def dnsfunc(asked: bytes, timeout: int = 5) -> bytes:
        return text.encode() if asked.decode().rstrip(".") == name else b""

    return dnsfunc


def opendkim_verdict(tmp_path: Path, record: str, message: bytes) -> str:
    (tmp_path / "keys.txt").write_text(record + "\n")
    (tmp_path / "opendkim.conf").write_text(
        f"TestPublicKeys {tmp_path / 'keys.txt'}\nMode v\nSyslog no\n"
    )
    (tmp_path / "message.eml").write_bytes(message)
    command = ["opendkim", "-x", str(tmp_path / "opendkim.conf"), "-t"]
    result = subprocess.run(
        [*command, str(tmp_path / "message.eml"), "-vv"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout + result.stderr


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_submitted_mail_leaves_signed_and_verifies(tmp_path, kind):
    with CaptureServer(Behaviour(), host="127.0.0.2") as server:
        daemon = daemon_for(tmp_path, server, SELECTOR[kind])
        record = keygen(daemon, kind)
        key_file = daemon.spool / "dkim" / f"example.test.{SELECTOR[kind]}.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        daemon.start()
        try:
            message = relayed(daemon, server)
            assert message.startswith(b"DKIM-Signature: v=1; a=")
            assert message.count(b"DKIM-Signature:") == 1
            assert dkim.verify(message, dnsfunc=dnsfunc_for(record))
            assert not dkim.verify(message.replace(b"Hello", b"Jello"), dnsfunc=dnsfunc_for(record))
            daemon.wait_for_log(rf"dkim: id=\w+ signed d=example\.test s={SELECTOR[kind]}")
            assert OPENDKIM, "opendkim is not installed (apt-get install opendkim)"
            verdict = opendkim_verdict(tmp_path, record, message)
            assert "dkim=pass" in verdict and "succeeded" in verdict, verdict
        finally:
            daemon.stop()


def test_signed_8bit_mail_to_a_host_without_8bitmime_bounces_unconverted(tmp_path):
    """Converting to quoted-printable would break the signature: 5.6.3."""
    with CaptureServer(Behaviour(eightbitmime=False), host="127.0.0.2") as server:
        daemon = daemon_for(tmp_path, server, "mta")
        keygen(daemon, "rsa")
        daemon.start()
        try:
            sent = (
                b"From: <alice@example.test>\r\nTo: <far@remote.example>\r\n"
                b"Subject: signed\r\n\r\ncaf\xc3\xa9\r\n"
            )
            recipient = "far@remote.example"
            options = ["BODY=8BITMIME"]
            queue_id = submit(
                daemon, "alice@example.test", [recipient], sent, login=ALICE, mail_options=options
            )
            line = wait_attempt(daemon, queue_id, recipient, "bounced")
            assert "(5.6.3 8BITMIME is required, but was not offered by host" in line
            assert "DKIM-signed" in line
            wait_notification(daemon, queue_id)
            dsn = single_dsn(daemon, "example.test", "alice", queue_id)
            assert dsn.recipient(recipient)["Status"] == "5.6.3"
            explanation = list(dsn.message.iter_parts())[0].get_content()
            assert "DKIM-signed, and converting it to 7-bit would break" in explanation
            assert "MAIL" not in server.sessions[0].verbs()
            assert "converted to quoted-printable" not in "\n".join(daemon.log)
        finally:
            daemon.stop()


def test_unauthenticated_mail_leaves_unsigned(tmp_path):
    with CaptureServer(Behaviour(), host="127.0.0.2") as server:
        daemon = daemon_for(tmp_path, server, "mta")
        keygen(daemon, "rsa")
        daemon.start()
        try:
            message = relayed(daemon, server, login=None)
            assert b"DKIM-Signature:" not in message
        finally:
            daemon.stop()


def test_keygen_prints_the_record_and_refuses_to_overwrite(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    command = [CLI, "dkim", "keygen", "Example.TEST", "--keys", str(keys), "--type", "ed25519"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    key = keys / "example.test.mta.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    last = first.stdout.splitlines()[-1]
    assert last.startswith('mta._domainkey.example.test. IN TXT "v=DKIM1; k=ed25519; p=')
    before = key.read_bytes()
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.strip() == f"twisted-mta: {key} exists; remove it first to make a new key"
    assert key.read_bytes() == before
    rsa = subprocess.run(
        [CLI, "dkim", "keygen", "example.test", "--keys", str(keys), "--selector", "s2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rsa.returncode == 0, rsa.stderr
    assert 'IN TXT "v=DKIM1; k=rsa; p=MIIBIjAN' in rsa.stdout
    bad = subprocess.run(
        [CLI, "dkim", "keygen", "../etc", "--keys", str(keys)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1 and "not a valid domain" in bad.stderr
