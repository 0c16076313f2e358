"""twisted-mta queue show, hold/release, delete and bounce by pattern."""

import json

import pytest

from tests.helpers.capture import Behaviour, CaptureServer
from tests.helpers.daemon import make_daemon, send
from tests.helpers.queue_command import UNROUTABLE
from tests.helpers.relay_fixtures import (
    attempts,
    change_behaviour,
    message,
    queue_cli,
    relay_config,
    submit,
    wait_attempt,
    wait_gone,
)

USERS = "alice@example.test:{PLAIN}a\nbob@example.test:{PLAIN}b\n"
BUSY = "421 4.3.2 busy, come back later"


def ids_of(result):
    assert result.returncode == 0, result.stderr
    return sorted(line.split()[0].removeprefix("id=") for line in result.stdout.splitlines())


def listed(daemon):
    return {m["id"]: m for m in json.loads(queue_cli(daemon, "list", "--json").stdout)}


@pytest.fixture
def stopped(tmp_path):
    """Three queued messages, the daemon stopped: alice's to two remote
    recipients and to one, bob's to one."""
    daemon = make_daemon(tmp_path / "mta", users=USERS, extra=UNROUTABLE)
    daemon.start()
    ids = [
        send(daemon, "alice@example.test", ["one@remote.example", "two@other.example"],
             b"Subject: first\r\n\r\ncaf\xc3\xa9\r\n"),
        send(daemon, "alice@example.test", ["three@remote.example"],
             b"Subject: second\r\n\r\nx\r\n"),
        send(daemon, "bob@example.test", ["four@Remote.Example"], b"Subject: third\r\n\r\nx\r\n"),
    ]
    for queue_id in ids:
        daemon.wait_for_log(rf"id={queue_id} to=<\S+> relay=\S+ .*status=deferred")
    daemon.stop()
    yield daemon, ids
    daemon.stop()


def test_queue_help_lists_every_action(stopped):
    daemon, _ = stopped
    result = queue_cli(daemon, "--help")
    for action in ("list", "show", "flush", "hold", "release", "delete", "bounce"):
        assert f"    {action} " in result.stdout


def test_show_prints_the_envelope_then_the_message(stopped):
    daemon, ids = stopped
    result = queue_cli(daemon, "show", ids[0])
    assert result.returncode == 0, result.stderr
    envelope, _, body = result.stdout.partition("*** message ***\n")
    for line in (f"id: {ids[0]}", "sender: <alice@example.test>", "client: 127.0.0.1",
                 "listener: smtp", "authenticated: -", "body: 7BIT", "held: no",
                 "recipient: <one@remote.example>  queued", "    attempts: 1"):
        assert line in envelope.splitlines(), envelope
    assert "    last error: " in envelope and "    next try: " in envelope
    assert "Subject: first\n" in body and body.endswith("café\n")
    stored = (daemon.spool / "queue" / f"{ids[0]}.msg").read_text()
    assert body == stored


def test_show_json(stopped):
    daemon, ids = stopped
    result = queue_cli(daemon, "show", ids[0], "--json")
    document = json.loads(result.stdout)
    assert document["id"] == ids[0] and document["sender"] == "alice@example.test"
    assert document["held"] is False and document["client"]["listener"] == "smtp"
    assert [r["address"] for r in document["recipients"]] == [
        "one@remote.example", "two@other.example"]
    assert document["recipients"][0]["attempts"] == 1
    assert document["message"].endswith("café\n")


def test_show_unknown_id_exits_1_with_one_line(stopped):
    daemon, _ = stopped
    for bad in ("0000000000000FFFF", "../../etc/passwd"):
        result = queue_cli(daemon, "show", bad)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.splitlines() == [f"twisted-mta: no message {bad} in the queue"]


def test_hold_and_release_by_pattern_with_the_daemon_stopped(stopped):
    daemon, ids = stopped
    assert ids_of(queue_cli(daemon, "hold", "--to", "*@REMOTE.example")) == sorted(ids)
    assert queue_cli(daemon, "hold", ids[0]).stdout == ""  # already held
    assert all(m["held"] for m in listed(daemon).values())
    listing = queue_cli(daemon, "list").stdout
    assert listing.count("(on hold)") == 3
    assert "held: yes" in queue_cli(daemon, "show", ids[1]).stdout
    flushed = queue_cli(daemon, "flush", "--json")
    assert json.loads(flushed.stdout) == []
    released = json.loads(queue_cli(daemon, "release", "--from", "bob@*", "--json").stdout)
    assert released == [{"id": ids[2], "action": "released", "sender": "bob@example.test"}]
    assert [m["held"] for m in listed(daemon).values()] == [True, True, False]


def test_delete_by_sender_and_recipient_patterns(stopped):
    daemon, ids = stopped
    result = queue_cli(daemon, "delete", "--from", "ALICE@*", "--to", "two@*")
    assert result.stdout == f"id={ids[0]} deleted\n"
    deleted = json.loads(queue_cli(daemon, "delete", "--to", "*@remote.example", "--json").stdout)
    assert [d["id"] for d in deleted] == ids[1:] and {d["action"] for d in deleted} == {"deleted"}
    assert listed(daemon) == {}
    assert not list((daemon.spool / "queue").glob("*.msg"))


def test_a_selection_is_required_and_unknown_ids_are_reported(stopped):
    daemon, ids = stopped
    for action in ("hold", "release", "delete", "bounce"):
        result = queue_cli(daemon, action)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
        assert "needs message ids, --from, --to or --all" in result.stderr
    result = queue_cli(daemon, "delete", ids[0], "0000000000000FFFF")
    assert result.returncode == 1
    assert result.stdout == f"id={ids[0]} deleted\n"
    assert result.stderr == "twisted-mta: no message 0000000000000FFFF in the queue\n"


def test_bounce_by_pattern_returns_messages_at_the_next_start(stopped):
    daemon, ids = stopped
    result = queue_cli(daemon, "bounce", "--from", "alice@example.test", "--json")
    bounced = json.loads(result.stdout)
    assert [b["id"] for b in bounced] == ids[:2]
    daemon.start()
    for queue_id in ids[:2]:
        daemon.wait_for_log(rf"id={queue_id} sender non-delivery notification")
        wait_gone(daemon, queue_id)
    assert len(daemon.messages("example.test", "alice")) == 2
    assert daemon.messages("example.test", "bob") == []
    assert list(listed(daemon)) == [ids[2]]


def test_held_message_waits_through_restart_and_flush_until_released(tmp_path):
    with CaptureServer(Behaviour(greeting=BUSY)) as server:
        daemon = make_daemon(tmp_path / "mta", users=USERS, extra=relay_config(
            smarthost=f"{server.host}:{server.port}", smarthost_tls="none",
            retry_min="1h", retry_max="2h"))
        daemon.start()
        try:
            held = submit(daemon, "alice@example.test", ["held@remote.example"], message("h"))
            other = submit(daemon, "alice@example.test", ["other@remote.example"], message("o"))
            wait_attempt(daemon, held, "held@remote.example", "deferred")
            wait_attempt(daemon, other, "other@remote.example", "deferred")
            assert queue_cli(daemon, "hold", held).stdout == f"id={held} held\n"
            change_behaviour(server, greeting=Behaviour().greeting)
            daemon.stop()
            # Due now and held: the start must leave it alone.
            assert queue_cli(daemon, "release", held).returncode == 0
            assert queue_cli(daemon, "hold", held).returncode == 0
            assert queue_cli(daemon, "flush").stdout == "1 message(s) due now\n"
            daemon.start()
            wait_attempt(daemon, other, "other@remote.example", "sent")
            wait_gone(daemon, other)
            assert queue_cli(daemon, "flush").stdout == "0 message(s) due now\n"
            assert listed(daemon)[held]["recipients"][0]["attempts"] == 1
            assert not [t for t in server.transactions if "held@remote.example" in t.recipients]
            assert queue_cli(daemon, "release", held).stdout == f"id={held} released\n"
            wait_attempt(daemon, held, "held@remote.example", "sent")
            wait_gone(daemon, held)
            [delivered] = [t for t in server.transactions if "held@remote.example" in t.recipients]
            assert delivered.reply.startswith("250")
        finally:
            daemon.stop()


def test_held_message_is_not_retried_while_the_daemon_runs(tmp_path):
    with CaptureServer(Behaviour(greeting=BUSY)) as server:
        daemon = make_daemon(tmp_path / "mta", users=USERS, extra=relay_config(
            smarthost=f"{server.host}:{server.port}", smarthost_tls="none",
            retry_min="1s", retry_max="1s"))
        daemon.start()
        try:
            held = submit(daemon, "alice@example.test", ["held@remote.example"], message("h"))
            other = submit(daemon, "alice@example.test", ["other@remote.example"], message("o"))
            wait_attempt(daemon, held, "held@remote.example", "deferred")
            assert queue_cli(daemon, "hold", "--to", "HELD@*").stdout == f"id={held} held\n"
            def tries(queue_id, address):
                return len(attempts(daemon, queue_id, address))

            # An attempt under way when held may still be recorded; none after.
            seen = tries(other, "other@remote.example")
            assert daemon.wait_for(lambda: tries(other, "other@remote.example") >= seen + 2)
            tried = tries(held, "held@remote.example")
            assert daemon.wait_for(lambda: tries(other, "other@remote.example") >= seen + 4)
            assert tries(held, "held@remote.example") == tried
            change_behaviour(server, greeting=Behaviour().greeting)
            assert queue_cli(daemon, "release", "--all").stdout == f"id={held} released\n"
            wait_attempt(daemon, held, "held@remote.example", "sent")
            wait_gone(daemon, held)
        finally:
            daemon.stop()
