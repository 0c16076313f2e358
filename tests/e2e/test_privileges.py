"""Started as root with ``--uid/--gid``: ports bound as root, everything else
as the run user, a real system account.

These tests need root (to create the account and to start twistd as root)
and a checkout and venv the account can read; .ci/run provides both.
"""

from __future__ import annotations

import base64
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.daemon import (
    Daemon,
    base_config,
    insecure_context,
    with_loopback_resolver,
)
from tests.helpers.run_user import drop_arguments, run_user

TWISTED_MTA = str(Path(sys.executable).with_name("twisted-mta"))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")


@pytest.fixture(scope="module")
def account() -> pwd.struct_passwd:
    """A system account, made if missing, that can run our code."""
    return run_user()


def privileged_free_port() -> int:
    """A port below 1024 that only root may bind, free right now."""
    for port in random.sample(range(600, 1024), 424):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free privileged port")


@pytest.fixture
def site(account, tmp_path_factory):
    """A folder as an admin sets it up: config, users and aliases by root,
    an empty spool folder owned by the run user."""
    root = Path(tempfile.mkdtemp(prefix="mta-privileges-"))
    root.chmod(0o755)
    port = privileged_free_port()
    config = base_config(root, extra=with_loopback_resolver(""))
    (root / "mta.toml").write_text(config.replace('smtp = ["tcp:0:', f'smtp = ["tcp:{port}:'))
    (root / "aliases").write_text("info: alice@example.test\n")
    (root / "var").mkdir(mode=0o700)
    os.chown(root / "var", account.pw_uid, account.pw_gid)
    result = subprocess.run(
        [TWISTED_MTA, "passwd", "alice@example.test", "--config", str(root / "mta.toml"),
         "--scheme", "plain", "--stdin"],
        input="alice-secret\n",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    yield Daemon(root, root / "mta.toml"), port
    shutil.rmtree(root, ignore_errors=True)


def login(daemon: Daemon) -> tuple[int, bytes]:
    with daemon.smtp("submission") as client:
        client.ehlo("client.example.org")
        client.starttls(context=insecure_context())
        client.ehlo("client.example.org")
        token = base64.b64encode(b"\0alice@example.test\0alice-secret").decode()
        return client.docmd("AUTH", f"PLAIN {token}")


def rcpt(daemon: Daemon, recipient: str) -> tuple[int, bytes]:
    with daemon.smtp() as client:
        client.ehlo("client.example.org")
        client.mail("sender@example.org")
        return client.rcpt(recipient)


def test_a_file_the_run_user_cannot_read_stops_the_start_naming_it(site, account):
    daemon, _ = site
    users = daemon.root / "users"
    assert users.stat().st_uid == 0 and users.stat().st_mode & 0o777 == 0o600  # as passwd made it
    with pytest.raises(RuntimeError):
        daemon.start(twistd_args=drop_arguments(account))
    output = "\n".join(daemon.log)
    assert f"users.file: cannot read {users}: Permission denied" in output
    assert "Traceback" not in output
    assert daemon.process.wait(timeout=10) != 0


def test_runs_as_the_user_on_a_privileged_port(site, account):
    daemon, port = site
    os.chown(daemon.root / "users", account.pw_uid, account.pw_gid)
    daemon.start(twistd_args=drop_arguments(account))
    try:
        assert daemon.ports["smtp"] == port
        status = Path(f"/proc/{daemon.process.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uid_line.split()[1:]) == {str(account.pw_uid)}
        assert login(daemon)[0] == 235
        with daemon.smtp() as client:
            client.sendmail("sender@example.org", ["info@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
        [message] = daemon.messages("example.test", "alice")
        assert b"Subject: hi\n" in message
        for path in [daemon.spool, *daemon.spool.rglob("*")]:
            assert path.stat().st_uid == account.pw_uid, path
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for_log(r"reload: config .* re-read")
    finally:
        daemon.stop()
    assert daemon.process.returncode == 0


def test_a_users_file_unreadable_later_is_a_temporary_failure(site, account):
    daemon, _ = site
    users = daemon.root / "users"
    os.chown(users, account.pw_uid, account.pw_gid)
    daemon.start(twistd_args=drop_arguments(account))
    try:
        assert rcpt(daemon, "alice@example.test")[0] == 250
        os.chown(users, 0, 0)  # e.g. replaced by hand as root
        code, text = rcpt(daemon, "alice@example.test")
        assert (code, text) == (451, b"4.3.0 Temporary lookup failure")
        assert rcpt(daemon, "info@example.test")[0] == 451
        assert login(daemon) == (454, b"4.7.0 Temporary authentication failure")
        daemon.wait_for_log(f"cannot read {users}: Permission denied")
        os.chown(users, account.pw_uid, account.pw_gid)
        assert rcpt(daemon, "alice@example.test")[0] == 250
        assert login(daemon)[0] == 235
    finally:
        daemon.stop()


def test_metrics_on_a_privileged_port_are_bound_before_the_drop(site, account):
    daemon, smtp_port = site
    os.chown(daemon.root / "users", account.pw_uid, account.pw_gid)
    port = next(p for p in iter(privileged_free_port, None) if p != smtp_port)
    metrics = f'\n[metrics]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
    daemon.config.write_text(daemon.config.read_text() + metrics)
    daemon.start(twistd_args=drop_arguments(account))
    try:
        assert daemon.ports["metrics"] == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert (response.status, response.read()) == (200, b"ok\n")
    finally:
        daemon.stop()
    assert daemon.process.returncode == 0
