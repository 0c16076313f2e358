"""twisted-mta queue list|flush|delete|bounce, daemon stopped and running."""

import json
import subprocess

import pytest

from tests.helpers.daemon import make_daemon
from tests.helpers.queue_command import CLI, UNROUTABLE


def queue_cli(daemon, *args):
    return subprocess.run([CLI, "queue", *args, "--config", str(daemon.config)], capture_output=True, text=True)


def send_remote(daemon, count=1):
    ids = []
    with daemon.smtp() as client:
        client.ehlo("client.example.org")
        for n in range(count):
            client.mail("sender@example.test")
            client.rcpt(f"friend{n}@remote.example")
            code, text = client.data(f"Subject: n{n}\r\n\r\nbody\r\n".encode())
            assert code == 250
            ids.append(text.decode().rsplit(" ", 1)[1])
    return ids


@pytest.fixture
def queued(tmp_path):
    daemon = make_daemon(tmp_path / "mta", users="sender@example.test:{PLAIN}x\n", extra=UNROUTABLE)
    daemon.start()
    ids = send_remote(daemon, 2)
    yield daemon, ids
    daemon.stop()


def test_list_shows_messages_with_recipients(queued):
    daemon, ids = queued
    result = queue_cli(daemon, "list")
    assert result.returncode == 0, result.stderr
    for queue_id in ids:
        assert queue_id in result.stdout
    assert "<friend0@remote.example>" in result.stdout and "<sender@example.test>" in result.stdout
    document = json.loads(queue_cli(daemon, "list", "--json").stdout)
    assert sorted(m["id"] for m in document) == sorted(ids)


def test_unknown_id_exits_1(queued):
    daemon, _ = queued
    for action in ("delete", "bounce"):
        result = queue_cli(daemon, action, "0000000000000FFFF")
        assert result.returncode == 1
        assert queue_cli(daemon, action, "../../etc/passwd").returncode == 1


def test_delete_while_running_and_while_stopped(queued):
    daemon, ids = queued
    assert queue_cli(daemon, "delete", ids[0]).returncode == 0
    daemon.stop()
    assert queue_cli(daemon, "delete", ids[1]).returncode == 0
    assert json.loads(queue_cli(daemon, "list", "--json").stdout) == []
    assert not list((daemon.spool / "queue").glob("*.msg"))


def test_bounce_returns_the_message_to_the_local_sender(queued):
    daemon, ids = queued
    assert queue_cli(daemon, "bounce", ids[0]).returncode == 0
    daemon.wait_for(lambda: not (daemon.spool / "queue" / f"{ids[0]}.env").exists(), timeout=10)
    daemon.wait_for_log(rf"id={ids[0]} sender non-delivery notification")
    [bounce] = daemon.messages("example.test", "sender")
    assert b"Subject: Undelivered Mail Returned to Sender" in bounce
    assert b"Status: 5.0.0" in bounce and b"Final-Recipient: rfc822; friend0@remote.example" in bounce


def test_flush_works_with_daemon_stopped(queued):
    daemon, ids = queued
    daemon.stop()
    result = queue_cli(daemon, "flush")
    assert result.returncode == 0 and "2 message(s)" in result.stdout


def test_unreadable_envelope_with_daemon_stopped(queued):
    daemon, ids = queued
    daemon.stop()
    (daemon.spool / "queue" / f"{ids[0]}.env").write_text("{not json")
    listing = queue_cli(daemon, "list")
    assert listing.returncode == 0 and f"{ids[0]}  unreadable envelope" in listing.stdout
    flushed = queue_cli(daemon, "flush")
    assert flushed.returncode == 0 and "1 message(s)" in flushed.stdout
    bounced = queue_cli(daemon, "bounce", ids[0])
    assert bounced.returncode == 1 and "Traceback" not in bounced.stderr
    assert len(bounced.stderr.splitlines()) == 1
