"""twisted-mta-sendmail, then the daemon: drops picked up while down and up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import Daemon, make_daemon

SENDMAIL = str(Path(sys.executable).with_name("twisted-mta-sendmail"))


def start_with_maildrop(daemon: Daemon) -> Daemon:
    """The real daemon, once its maildrop is watched."""
    daemon.log.clear()
    daemon.start()
    daemon.wait_for_log(r"maildrop: watching .* \(inotify\)")
    return daemon


def drop(daemon: Daemon, recipient: str, subject: str) -> None:
    result = subprocess.run(
        [SENDMAIL, "-C", str(daemon.config), "-i", recipient],
        input=f"Subject: {subject}\n\nhello\n".encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, b"")


def accepted(daemon: Daemon) -> int:
    return sum("listener=sendmail" in line for line in daemon.log)


def test_dropped_while_down_delivered_at_start_and_while_up_within_a_second(tmp_path):
    daemon = make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES)
    daemon.spool.mkdir()  # as installed; the daemon has never run
    try:
        drop(daemon, "bob@example.test", "while down")
        assert daemon.messages("example.test", "bob") == []

        start_with_maildrop(daemon)
        assert daemon.wait_for(lambda: accepted(daemon) == 1, timeout=10)
        daemon.wait_for_log(r"to=<bob@example\.test> relay=local .* status=sent")
        [first] = daemon.messages("example.test", "bob")
        assert b"Subject: while down\n" in first and b"via sendmail from user" in first

        drop(daemon, "info@example.test", "while up")
        assert daemon.wait_for(lambda: accepted(daemon) == 2, timeout=1.0)
        daemon.wait_for_log(r"to=<alice@example\.test> relay=local .* status=sent", timeout=5)
        assert any(b"Subject: while up\n" in m for m in daemon.messages("example.test", "alice"))
        assert list((daemon.spool / "maildrop").iterdir()) == []
    finally:
        daemon.stop()
