"""Injection of messages that did not come over SMTP: policy, storage, bounces."""

from __future__ import annotations

import email
import email.policy
import email.utils
import io
import json

import pytest

from tests.helpers.system import assembled
from tests.helpers.threads import ThreadReactor
from twisted_mta.intake import inject as inject_module
from twisted_mta.intake.acceptance import MailSystem
from twisted_mta.intake.inject import (
    BOUNCE,
    SENDMAIL,
    InjectionRefused,
    inject,
    send_dsn,
)
from twisted_mta.intake.refusal import Refusal
from twisted_mta.intake.spool import Spool, StorageError
from twisted_mta.mail.address import PathError
from twisted_mta.mail.dsn import RecipientFailure
from twisted_mta.queue.bounces import dsn_reporter
from twisted_mta.queue.store import QueueStore
from twisted_mta.storage.envelope import QueuedMessage, RecipientState

HOST = "mx.example.test"
USERS = "alice@example.test:{PLAIN}a\nbob@example.test:{PLAIN}b\n"
ALIASES = "both@example.test: alice@example.test, friend@remote.example\n"
MESSAGE = b"Subject: hi\r\nFrom: bob@example.test\r\n\r\nline one\r\nline two\rlast"
STORED = b"Subject: hi\nFrom: bob@example.test\n\nline one\nline two\nlast\n"


@pytest.fixture
def reactor() -> ThreadReactor:
    return ThreadReactor()


@pytest.fixture
def system(tmp_path, reactor):
    # No relay networks at all: local submission may relay anyway.
    with assembled(tmp_path, reactor, users=USERS, aliases=ALIASES, hostname=HOST) as intake:
        yield intake.system



def run(reactor: ThreadReactor, d):
    """The result of ``d`` (a value, or the Failure) once the committer reported."""
    return reactor.results(d)[0]


def maildir(system: MailSystem, local: str) -> list[bytes]:
    new = system.spool.mail_root / "example.test" / local / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def envelope(system: MailSystem, queue_id: str) -> dict:
    return json.loads((system.spool.queue_dir / f"{queue_id}.env").read_bytes())


def split_trace(stored: bytes) -> tuple[list[bytes], bytes]:
    """The Return-Path, Delivered-To and Received lines, and the rest."""
    lines = stored.split(b"\n")
    received_end = next(i for i in range(3, len(lines)) if not lines[i].startswith(b"\t"))
    return lines[:received_end], b"\n".join(lines[received_end:])


def test_local_recipient_gets_the_message_with_lf_endings(system, reactor):
    queue_id = run(reactor, inject(
        system, "carol@remote.example", ["alice@example.test"], MESSAGE,
        origin=SENDMAIL, user="carol",
    ))
    [stored] = maildir(system, "alice")
    trace, rest = split_trace(stored)
    assert trace[0] == b"Return-Path: <carol@remote.example>"
    assert trace[1] == b"Delivered-To: alice@example.test"
    received = b"\n".join(trace[2:]).decode()
    assert received.startswith(f"Received: by {HOST} (twisted-mta, via sendmail from user carol)")
    assert f"with local id {queue_id}" in received
    assert "for <alice@example.test>;" in received
    assert rest == STORED


def test_remote_recipient_is_queued_without_relay_networks(system, reactor):
    queue_id = run(reactor, inject(
        system, "alice@example.test", ["far@remote.example"], b"Subject: x\n\nbody\n",
        origin=SENDMAIL,
    ))
    document = envelope(system, queue_id)
    assert document["sender"] == "alice@example.test"
    assert [r["address"] for r in document["recipients"]] == ["far@remote.example"]
    assert document["client"] == {"ip": "127.0.0.1", "listener": "sendmail"}
    assert document["body"] == "7BIT" and document["smtputf8"] is False
    data = (system.spool.queue_dir / f"{queue_id}.msg").read_bytes()
    assert data.startswith(b"Received: by mx.example.test (twisted-mta, via sendmail)\n")
    assert data.endswith(b"\nSubject: x\n\nbody\n")


def test_aliases_resolve_as_at_rcpt(system, reactor):
    queue_id = run(reactor, inject(
        system, "bob@example.test", ["both@example.test"], b"Subject: x\n\nbody\n",
        origin=SENDMAIL,
    ))
    assert len(maildir(system, "alice")) == 1
    assert [r["address"] for r in envelope(system, queue_id)["recipients"]] == [
        "friend@remote.example"
    ]


def test_eight_bit_and_utf8_are_recorded_for_the_relay(system, reactor):
    queue_id = run(reactor, inject(
        system, "alice@example.test", ["jörg@remote.example"], "Subject: café\n\n".encode(),
        origin=SENDMAIL,
    ))
    document = envelope(system, queue_id)
    assert document["body"] == "8BITMIME" and document["smtputf8"] is True


def test_a_file_is_read_from_its_position_whatever_the_chunks(system, reactor, monkeypatch):
    monkeypatch.setattr(inject_module, "CHUNK", 3)  # cuts CRLF pairs apart
    stream = io.BytesIO(b'{"envelope": 1}\n' + MESSAGE)
    stream.readline()
    run(reactor, inject(system, "bob@example.test", ["alice@example.test"], stream,
                        origin=SENDMAIL))
    [stored] = maildir(system, "alice")
    assert split_trace(stored)[1] == STORED


def test_log_lines_like_smtp(system, reactor, logged):
    queue_id = run(reactor, inject(
        system, "bob@example.test", ["alice@example.test", "far@remote.example"], MESSAGE,
        origin=SENDMAIL, user="bob",
    ))
    mine = [line for line in logged if line.startswith(f"id={queue_id} ")]
    assert mine[0] == (
        f"id={queue_id} from=<bob@example.test> size={len(STORED)} nrcpt=2 "
        "client=localhost[127.0.0.1] listener=sendmail user=bob"
    )
    assert mine[1].startswith(f"id={queue_id} to=<alice@example.test> relay=local ")
    assert mine[2].startswith(f"id={queue_id} to=<far@remote.example> relay=none ")


def test_a_login_name_unfit_for_a_header_is_left_out(system, reactor):
    run(reactor, inject(system, "bob@example.test", ["alice@example.test"], b"x\n",
                        origin=SENDMAIL, user="evil\nX-Forged: 1"))
    [stored] = maildir(system, "alice")
    assert b"X-Forged" not in stored
    assert b"(twisted-mta, via sendmail)" in stored


def test_refused_recipients_are_bounced_and_the_rest_delivered(system, reactor, logged):
    queue_id = run(reactor, inject(
        system, "bob@example.test", ["alice@example.test", "nobody@example.test"], MESSAGE,
        origin=SENDMAIL,
    ))
    assert len(maildir(system, "alice")) == 1
    [bounce] = maildir(system, "bob")
    trace, rest = split_trace(bounce)
    assert trace[0] == b"Return-Path: <>"
    assert b"via bounce" in b"\n".join(trace)
    report = email.message_from_bytes(rest, policy=email.policy.default)
    assert report["To"] == "bob@example.test"
    recipient = report.get_payload()[1].get_payload()[1]
    assert recipient["Final-Recipient"] == "rfc822; nobody@example.test"
    assert recipient["Status"] == "5.1.1" and recipient["Action"] == "failed"
    assert recipient["Diagnostic-Code"].startswith("smtp; 550 5.1.1 <nobody@example.test>")
    headers = report.get_payload()[2].get_payload(decode=True)
    assert headers == b"Subject: hi\nFrom: bob@example.test\n"
    assert any(
        line.startswith(f"id={queue_id} to=<nobody@example.test> relay=none ")
        and line.endswith("status=bounced (550 5.1.1 <nobody@example.test>: "
                          "Recipient address rejected: User unknown)")
        for line in logged
    )
    assert any(line.startswith(f"id={queue_id} sender non-delivery notification: ")
               for line in logged)


def test_no_recipient_accepted_fails_after_the_bounce(system, reactor):
    failure = run(reactor, inject(
        system, "bob@example.test", ["nobody@example.test", "not an address"], MESSAGE,
        origin=SENDMAIL,
    ))
    assert failure.check(InjectionRefused)
    refusal = failure.value
    assert [(r.recipient, r.refusal.code, r.refusal.enhanced) for r in refusal.refused] == [
        ("nobody@example.test", 550, "5.1.1"),
        ("not an address", 501, "5.1.3"),
    ]
    assert refusal.bounce_id is not None
    assert len(maildir(system, "bob")) == 1
    assert maildir(system, "alice") == []


def test_null_sender_is_not_bounced(system, reactor, logged):
    failure = run(reactor, inject(system, "", ["nobody@example.test"], MESSAGE, origin=BOUNCE))
    assert failure.check(InjectionRefused) and failure.value.bounce_id is None
    assert any(line.endswith("no notification: the sender is null") for line in logged)
    assert not (system.spool.mail_root / "example.test").exists()


def test_bounce_to_an_unknown_local_sender_is_dropped_with_a_log_line(system, reactor, logged):
    failure = run(reactor, inject(
        system, "ghost@example.test", ["nobody@example.test"], MESSAGE, origin=SENDMAIL
    ))
    assert failure.value.bounce_id is None
    assert any("sender notification refused: 550 5.1.1 <ghost@example.test>" in line
               for line in logged)


def test_bad_sender_is_refused(system, reactor):
    failure = run(reactor, inject(system, "no spaces@x", ["alice@example.test"], MESSAGE,
                                  origin=SENDMAIL))
    assert failure.check(PathError)


def test_storage_failure_fails_the_injection(system, reactor, tmp_path):
    broken = MailSystem(
        HOST, system.directory, Spool(tmp_path / "users", system.spool.queue_dir,
                                      system.spool.committer), ()
    )
    failure = run(reactor, inject(broken, "bob@example.test", ["alice@example.test"], MESSAGE,
                                  origin=SENDMAIL))
    assert failure.check(StorageError)


def test_an_unreadable_users_file_fails_the_injection_without_a_bounce(system, reactor):
    """A temporary lookup failure: the drop is tried again, nobody is told
    their mail failed."""
    users = system.directory.users_file
    users.rename(users.with_name("users.away"))
    failure = run(reactor, inject(system, "bob@example.test", ["alice@example.test"], MESSAGE,
                                  origin=SENDMAIL))
    assert failure.check(Refusal) and failure.value.code == 451
    assert maildir(system, "alice") == [] and maildir(system, "bob") == []
    assert list(system.spool.queue_dir.glob("*.env")) == []


def test_send_dsn_for_the_queue(system, reactor):
    failure = RecipientFailure("far@remote.example", "5.1.1", diagnostic="550 5.1.1 no such user",
                               remote_mta="mx.remote.example", last_attempt=2.0)
    bounce_id = run(reactor, send_dsn(system, "0123ABCD", 1.0, "alice@example.test", [failure],
                                      b"Subject: hi\n"))
    [stored] = maildir(system, "alice")
    assert f"with local id {bounce_id}".encode() in stored
    report = email.message_from_bytes(split_trace(stored)[1], policy=email.policy.default)
    blocks = report.get_payload()[1].get_payload()
    assert blocks[0]["X-Twisted-MTA-Queue-ID"] == "0123ABCD"
    assert blocks[1]["Remote-MTA"] == "dns; mx.remote.example"
    assert run(reactor, send_dsn(system, "0123ABCD", 1.0, "", [failure], b"")) is None



def test_dsn_reporter_for_the_scheduler(system, reactor):
    queue = system.spool.queue_dir
    (queue / "0123ABCD.msg").write_bytes(b"Received: by x\nSubject: queued\n\nsecret body\n")
    failed = RecipientState("far@remote.example", "failed", 3, 0.0, "550 5.1.1 no such user",
                            "5.1.1", "mx.remote.example[192.0.2.7]:25", 1000.0)
    slow = RecipientState("slow@remote.example", "queued", 1, 2000.0, "connection refused",
                          None, None, 900.0)
    message = QueuedMessage("0123ABCD", 100.0, 10, "alice@example.test", [failed, slow])
    report = dsn_reporter(system, QueueStore(queue), lifetime=86400.0)
    assert run(reactor, report(message, [failed], "failed")) is None
    assert run(reactor, report(message, [slow], "delayed")) is None
    reports = [
        email.message_from_bytes(split_trace(m)[1], policy=email.policy.default)
        for m in maildir(system, "alice")
    ]
    by_subject = {r["Subject"]: r for r in reports}
    bounce = by_subject["Undelivered Mail Returned to Sender"]
    recipient = bounce.get_payload()[1].get_payload()[1]
    assert recipient["Remote-MTA"] == "dns; mx.remote.example"
    assert recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert bounce.get_payload()[2].get_payload(decode=True) == b"Received: by x\nSubject: queued\n"
    warning = by_subject["Delayed Mail (still being retried)"]
    recipient = warning.get_payload()[1].get_payload()[1]
    assert recipient["Action"] == "delayed" and recipient["Status"] == "4.0.0"
    until = email.utils.parsedate_to_datetime(recipient["Will-Retry-Until"]).timestamp()
    assert until == 100.0 + 86400.0


def test_failed_bounce_goes_to_the_postmaster_once(system, reactor):
    queue = system.spool.queue_dir
    (queue / "0123ABCE.msg").write_bytes(b"Subject: Undelivered Mail Returned to Sender\n\nx\n")
    failed = RecipientState("gone@remote.example", "failed", 1, 0.0, "550 5.1.1 no such user",
                            "5.1.1", "mx.remote.example[192.0.2.7]:25", 1000.0)
    bounce = QueuedMessage("0123ABCE", 100.0, 10, "", [failed], client={"listener": "bounce"})
    report = dsn_reporter(system, QueueStore(queue), lifetime=86400.0)
    run(reactor, report(bounce, [failed], "failed"))
    [notice] = maildir(system, "postmaster")
    assert b"Final-Recipient: rfc822; gone@remote.example" in notice
    double = QueuedMessage("0123ABCF", 100.0, 10, "", [failed], client={"listener": "double-bounce"})
    (queue / "0123ABCF.msg").write_bytes(b"Subject: x\n\nx\n")
    run(reactor, report(double, [failed], "failed"))
    assert len(maildir(system, "postmaster")) == 1


def test_a_looping_message_is_refused_like_at_data(system, reactor):
    import dataclasses
    import io

    looping = dataclasses.replace(system, max_hops=3)
    hops = b"".join(b"Received: by hop%d\n" % n for n in range(4))
    failure = run(reactor, inject(
        looping, "bob@example.test", ["alice@example.test"], io.BytesIO(hops + b"Subject: l\n\nx\n"),
        origin=SENDMAIL,
    ))
    assert failure.check(InjectionRefused)
    assert [(r.refusal.code, r.refusal.enhanced) for r in failure.value.refused] == [(554, "5.4.6")]
    assert maildir(system, "alice") == []
    accepted = run(reactor, inject(
        looping, "bob@example.test", ["alice@example.test"], io.BytesIO(hops[18:] + b"\nx\n"),
        origin=SENDMAIL,
    ))
    assert isinstance(accepted, str)
    assert maildir(system, "alice")[0].endswith(hops[18:] + b"\nx\n")
