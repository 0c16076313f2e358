"""A real Dovecot serves the maildirs the daemon delivers into, with the
passwords of its users file: IMAP and POP3 read a message byte for byte,
IMAP flags and expunges it.

The daemon runs as the run user with ``[delivery] group`` set; Dovecot's
mail processes run as another account whose primary group is that group,
so everything Dovecot does to the maildirs goes through the group's
permissions.  Dovecot's config is ``etc/dovecot/dovecot.conf``, the one
the README shows, with the paths of this test, the daemon's self-signed
certificate and loopback ports.  Needs root (accounts, twistd --uid, Dovecot) and Dovecot's imap and
pop3 servers; .ci/run installs them.
"""

from __future__ import annotations

import base64
import grp
import imaplib
import os
import poplib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.daemon import Daemon, base_config, insecure_context
from tests.helpers.files import mode_and_group
from tests.helpers.run_user import (
    RUN_USER,
    drop_arguments,
    run_user,
    system_account,
    system_group,
)

TEMPLATE = Path(__file__).resolve().parents[2] / "etc" / "dovecot" / "dovecot.conf"
TWISTED_MTA = str(Path(sys.executable).with_name("twisted-mta"))
GROUP = "twisted-mta-mail"  # [delivery] group: the run user and Dovecot's mail user
MAIL_USER = "twisted-mta-imap"  # Dovecot's mail processes; not the run user
PASSWORDS = {"alice@example.test": "alice-secret", "bob@example.test": "bob-secret"}
SCHEMES = {"alice@example.test": "argon2id", "bob@example.test": "blf-crypt"}
MESSAGE = (
    b"From: sender@example.org\r\nTo: alice@example.test\r\nSubject: over IMAP\r\n\r\n"
    b"line one\r\n.a line that starts with a dot\r\n\r\nlast line\r\n"
)
START_TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")


@dataclass
class Dovecot:
    process: subprocess.Popen
    imap: int
    pop3: int
    log: Path

    def imap_client(self) -> imaplib.IMAP4:
        """Connected, after STARTTLS: plain text logins need TLS."""
        client = imaplib.IMAP4("127.0.0.1", self.imap, timeout=30)
        client.starttls(insecure_context())
        return client

    def pop3_client(self) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", self.pop3, timeout=30)
        client.stls(insecure_context())
        return client

    def stop(self) -> None:
        """The master and every process it started."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def accounts():
    """The run user in the shared group, and Dovecot's mail user of it."""
    account = run_user()
    group = system_group(GROUP, members=(RUN_USER,))
    mail_user = system_account(MAIL_USER, group=GROUP)
    assert mail_user.pw_uid != account.pw_uid and mail_user.pw_gid == group.gr_gid
    return account, mail_user, group


@pytest.fixture(scope="module")
def site(accounts) -> Iterator[Path]:
    """Config and users file as an admin makes them, the spool reachable
    by the group only."""
    account, _, group = accounts
    root = Path(tempfile.mkdtemp(prefix="mta-dovecot-"))
    root.chmod(0o755)
    extra = f'[delivery]\ngroup = "{GROUP}"\n'
    (root / "mta.toml").write_text(base_config(root, extra=extra))
    (root / "aliases").write_text("")
    spool = root / "var"
    spool.mkdir()
    os.chown(spool, account.pw_uid, group.gr_gid)
    spool.chmod(0o710)
    for address, password in PASSWORDS.items():
        result = subprocess.run(
            [TWISTED_MTA, "passwd", address, "--config", str(root / "mta.toml"),
             "--scheme", SCHEMES[address], "--stdin"],
            input=password + "\n",
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
    # The daemon reads it as its owner, Dovecot's auth process as dovecot.
    os.chown(root / "users", account.pw_uid, grp.getgrnam("dovecot").gr_gid)
    (root / "users").chmod(0o640)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(site, accounts) -> Iterator[Daemon]:
    daemon = Daemon(site, site / "mta.toml")
    daemon.start(twistd_args=drop_arguments(accounts[0]))
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def dovecot(site, daemon) -> Iterator[Dovecot]:
    installed = all(Path("/usr/lib/dovecot", name).exists() for name in ("imap", "pop3"))
    assert shutil.which("dovecot") and installed, (
        "Dovecot is not installed (apt-get install dovecot-imapd dovecot-pop3d)"
    )
    imap, pop3 = free_port(), free_port()
    config = site / "dovecot.conf"
    config.write_text(dovecot_config(site, imap, pop3))
    log = site / "dovecot.log"
    process = subprocess.Popen(
        ["dovecot", "-F", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,
    )
    server = Dovecot(process, imap, pop3, log)
    try:
        wait_for_ports(server)
        yield server
    finally:
        server.stop()


def dovecot_config(site: Path, imap: int, pop3: int) -> str:
    """The README's config with this test's paths, accounts and ports."""
    text = TEMPLATE.read_text()
    for production, here in {
        "/etc/twisted-mta/users": str(site / "users"),
        # The daemon's self-signed pair, made as it started.
        "/etc/twisted-mta/certificate.pem": str(site / "var" / "tls" / "selfsigned.pem"),
        "/etc/twisted-mta/private-key.pem": str(site / "var" / "tls" / "selfsigned.key"),
        "/var/spool/twisted-mta": str(site / "var"),
        "uid=vmail gid=mailstore": f"uid={MAIL_USER} gid={GROUP}",
    }.items():
        assert text.count(production) == 1, production
        text = text.replace(production, here)
    return text + f"""
# The test's: loopback, its own folders and ports (STARTTLS only), and
# wrong passwords answered at once.
listen = 127.0.0.1
auth_failure_delay = 0
base_dir = {site}/dovecot-run
state_dir = {site}/dovecot-state
log_path = /dev/stderr
service imap-login {{
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_ports(server: Dovecot) -> None:
    """Until both ports take connections; Dovecot's log if it stopped."""
    deadline = time.monotonic() + START_TIMEOUT
    for port in (server.imap, server.pop3):
        while True:
            if server.process.poll() is not None:
                pytest.fail("dovecot stopped:\n" + server.log.read_text()[-2000:])
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("dovecot is not listening:\n" + server.log.read_text()[-2000:])
                time.sleep(0.05)


def deliver(daemon: Daemon, recipient: str, message: bytes) -> None:
    with daemon.smtp() as client:
        client.sendmail("sender@example.org", [recipient], message)


def stored_files(daemon: Daemon, local: str) -> list[Path]:
    box = daemon.maildir("example.test", local)
    return sorted([*box.glob("new/*"), *box.glob("cur/*")])


def test_the_smtp_password_is_the_imap_and_pop3_password(daemon, dovecot):
    with daemon.smtp("submission") as client:
        client.starttls(context=insecure_context())
        token = base64.b64encode(b"\0alice@example.test\0alice-secret").decode()
        assert client.docmd("AUTH", f"PLAIN {token}")[0] == 235
    imap = dovecot.imap_client()
    assert imap.login("alice@example.test", "alice-secret")[0] == "OK"
    imap.logout()
    pop3 = dovecot.pop3_client()
    pop3.user("alice@example.test")
    assert pop3.pass_("alice-secret").startswith(b"+OK")
    pop3.quit()


def test_a_wrong_password_is_refused_by_both(dovecot):
    imap = dovecot.imap_client()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap.login("alice@example.test", "wrong")
    imap.shutdown()
    pop3 = dovecot.pop3_client()
    pop3.user("alice@example.test")
    with pytest.raises(poplib.error_proto, match="-ERR"):
        pop3.pass_("wrong")
    pop3.close()


def test_imap_and_pop3_read_what_was_delivered_imap_flags_and_expunges_it(
    daemon, dovecot, accounts
):
    account, _, group = accounts
    deliver(daemon, "alice@example.test", MESSAGE)
    [path] = stored_files(daemon, "alice")
    stored = path.read_bytes()
    assert stored.endswith(MESSAGE.replace(b"\r\n", b"\n"))
    assert path.stat().st_uid == account.pw_uid
    assert mode_and_group(path) == (0o660, group.gr_gid)  # Dovecot's only way in

    pop3 = dovecot.pop3_client()
    pop3.user("alice@example.test")
    pop3.pass_("alice-secret")
    _, lines, _ = pop3.retr(1)
    pop3.quit()
    assert b"\r\n".join(lines) + b"\r\n" == stored.replace(b"\n", b"\r\n")

    imap = dovecot.imap_client()
    imap.login("alice@example.test", "alice-secret")
    imap.select("INBOX")
    _, data = imap.fetch("1", "(BODY.PEEK[])")
    assert data[0][1] == stored.replace(b"\n", b"\r\n")
    assert imap.store("1", "+FLAGS", r"(\Flagged)")[0] == "OK"
    [flagged] = stored_files(daemon, "alice")
    # Seen by POP3's RETR, flagged by IMAP: the flags are in the file's name.
    assert flagged.parent.name == "cur" and flagged.name.endswith(":2,FS")
    assert flagged.read_bytes() == stored
    imap.store("1", "+FLAGS", r"(\Deleted)")
    imap.expunge()
    imap.logout()
    assert stored_files(daemon, "alice") == []


def test_a_user_who_logs_in_before_any_mail_gets_it_delivered_later(daemon, dovecot):
    imap = dovecot.imap_client()
    imap.login("bob@example.test", "bob-secret")  # {BLF-CRYPT}
    assert imap.select("INBOX") == ("OK", [b"0"])
    assert daemon.maildir("example.test", "bob").is_dir()  # made by Dovecot
    deliver(daemon, "bob@example.test", MESSAGE.replace(b"alice", b"bob"))
    imap.noop()
    assert imap.select("INBOX") == ("OK", [b"1"])
    imap.logout()


def test_a_run_user_outside_the_group_is_refused_at_start(accounts):
    root = Path(tempfile.mkdtemp(prefix="mta-dovecot-group-"))
    try:
        root.chmod(0o755)
        (root / "mta.toml").write_text(
            base_config(root, extra='[delivery]\ngroup = "root"\n')
            .replace('file = "users"', 'file = ""')
            .replace('file = "aliases"', 'file = ""')
        )
        (root / "var").mkdir(mode=0o700)
        os.chown(root / "var", accounts[0].pw_uid, accounts[0].pw_gid)
        daemon = Daemon(root, root / "mta.toml")
        with pytest.raises(RuntimeError):
            daemon.start(twistd_args=drop_arguments(accounts[0]))
        assert daemon.process.wait(timeout=10) != 0
        output = "\n".join(daemon.log)
        expected = (
            f"delivery.group: {RUN_USER} is not a member of group root,"
            " so it cannot give the maildirs that group"
        )
        assert expected in output
        assert "Traceback" not in output
    finally:
        shutil.rmtree(root, ignore_errors=True)
