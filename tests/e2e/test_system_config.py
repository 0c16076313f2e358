"""A server set up with ``twisted-mta init`` in /etc/twisted-mta, and the
sendmail family used as cron and scripts use it: through links named
``sendmail``, ``mailq`` and ``newaliases``, from ``/``, with neither
``-C`` nor ``$TWISTED_MTA_CONFIG``: only the system-wide config.

The test owns /etc/twisted-mta while it runs and refuses to start if the
machine already has one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.daemon import NO_DNS, Daemon

SYSTEM = Path("/etc/twisted-mta")
BIN = Path(sys.executable).parent
LOOPBACK = {
    'smtp = ["tcp:25"]': 'smtp = ["tcp:0:interface=127.0.0.1"]',
    'submission = ["tcp:587"]': 'submission = ["tcp:0:interface=127.0.0.1"]',
    'submissions = ["tcp:465"]': 'submissions = ["tcp:0:interface=127.0.0.1"]',
    "[relay]\n": f"[relay]\n{NO_DNS}\n",
}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to write /etc")


@pytest.fixture
def system_folder():
    assert not SYSTEM.exists(), f"{SYSTEM} exists on this machine; this test would replace it"
    try:
        yield SYSTEM
    finally:
        shutil.rmtree(SYSTEM, ignore_errors=True)


def run(command: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    """As cron runs a job: from /, without TWISTED_MTA_CONFIG."""
    environ = {k: v for k, v in os.environ.items() if k != "TWISTED_MTA_CONFIG"}
    return subprocess.run(
        command, input=stdin, capture_output=True, cwd="/", env=environ, timeout=60
    )


def links(folder: Path) -> dict[str, str]:
    folder.mkdir()
    for name in ("sendmail", "mailq", "newaliases"):
        (folder / name).symlink_to(BIN / "twisted-mta-sendmail")
    return {name: str(folder / name) for name in ("sendmail", "mailq", "newaliases")}


def test_init_then_the_sendmail_family_with_only_the_system_config(tmp_path, system_folder):
    root = tmp_path / "mta"
    initialised = run(
        [str(BIN / "twisted-mta"), "init", "--user", "root", "--hostname", "mx.example.test",
         "--spool", str(root / "var"), "--postmaster", "alice@example.test"]
    )
    assert initialised.returncode == 0, initialised.stderr
    assert initialised.stdout.decode().startswith(f"wrote {SYSTEM}/mta.toml")
    config = SYSTEM / "mta.toml"
    text = config.read_text()
    for production, loopback in LOOPBACK.items():
        assert production in text
        text = text.replace(production, loopback)
    config.write_text(text)
    added = run([str(BIN / "twisted-mta"), "passwd", "alice@example.test", "--stdin"], b"pw\n")
    assert added.returncode == 0, added.stderr

    daemon = Daemon(root, config).start()
    try:
        tools = links(tmp_path / "bin")
        assert run([tools["newaliases"]]).stdout.decode() == (
            f"{SYSTEM}/aliases: 3 alias(es), all usable\n"
        )
        assert run([tools["sendmail"], "-bi"]).returncode == 0
        job = b"To: postmaster@example.test\nSubject: from cron\n\nhello\n"
        sent = run([tools["sendmail"], "-t"], job)
        assert (sent.returncode, sent.stderr) == (0, b"")
        daemon.wait_for_log(r"to=<alice@example.test>.*status=sent")
        [message] = daemon.messages("example.test", "alice")
        assert b"\nSubject: from cron\n" in message and message.endswith(b"\n\nhello\n")
        assert message.startswith(b"Return-Path: <root@mx.example.test>\n")
        assert run([tools["mailq"]]).stdout == b"the queue is empty\n"
        assert run([tools["sendmail"], "-bp"]).stdout == b"the queue is empty\n"
        assert run([tools["sendmail"], "-q"]).stdout == b"0 message(s) due now\n"
    finally:
        daemon.stop()


def test_newaliases_reports_what_cannot_be_used(tmp_path, system_folder):
    root = tmp_path / "mta"
    initialised = run(
        [str(BIN / "twisted-mta"), "init", "--user", "root", "--hostname", "mx.example.test",
         "--spool", str(root / "var")]
    )
    assert initialised.returncode == 0, initialised.stderr
    with (SYSTEM / "aliases").open("a") as aliases:
        aliases.write("info: nobody-here\nsales: |/bin/sh\nloop: loop2\nloop2: loop\n")
    checked = run([str(links(tmp_path / "bin")["newaliases"])])
    assert checked.returncode == 1
    assert checked.stdout.decode().splitlines() == [
        f"{SYSTEM}/aliases: line 8: target '|/bin/sh' ignored: not a mail address",
        f"{SYSTEM}/aliases: line 8 ignored: expected 'name: target, ...'",
        f"{SYSTEM}/aliases: info: leads to nobody-here@example.test, which is no account,"
        " alias or catch-all",
        f"{SYSTEM}/aliases: loop: goes round in a loop at loop@example.test",
        f"{SYSTEM}/aliases: loop2: goes round in a loop at loop2@example.test",
    ]
