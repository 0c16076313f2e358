"""Local delivery and the queue, seen from outside: SMTP in, files and logs out.

The shared ``mta`` daemon has accounts alice and bob and the aliases of
conftest.py; ``catchall_mta`` below adds a catch-all, alias chains and a
self-referencing alias.  Every message carries a unique marker so that
tests sharing a daemon find their own files.
"""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import Daemon, make_daemon, send
from tests.helpers.tmpfs import run_or_skip, tmpfs

NAME = re.compile(
    r"^(?P<sec>\d+)\.M(?P<usec>\d{1,6})P(?P<pid>\d+)V[0-9a-f]+I[0-9a-f]+_\d+"
    r"\.[^/:,]+,S=(?P<size>\d+)$"
)
RECEIVED = re.compile(rb"Received: from client\.example\.org \(\[127\.0\.0\.1\]\)\n(\t.*\n)+")

CHAIN = "".join(f"d{i}@example.test: d{i + 1}@example.test\n" for i in range(9))
TOO_DEEP = "".join(f"e{i}@example.test: e{i + 1}@example.test\n" for i in range(10))
CATCHALL_USERS = """\
alice@example.test:{PLAIN}a
bob@example.test:{PLAIN}b
carol@example.test:{PLAIN}c
"""
CATCHALL_ALIASES = f"""\
@example.test: alice@example.test
carol: carol, carol-archive@remote.example   # keeps a copy, forwards one
team@example.test: info@example.test, alice@example.test
info@example.test: alice@example.test, bob@example.test
loop1@example.test: loop2@example.test
loop2@example.test: loop1@example.test
{CHAIN}d9@example.test: bob@example.test
{TOO_DEEP}e10@example.test: bob@example.test
"""


@pytest.fixture(scope="module")
def catchall_mta(tmp_path_factory) -> Iterator[Daemon]:
    daemon = make_daemon(
        tmp_path_factory.mktemp("catchall"), users=CATCHALL_USERS, aliases=CATCHALL_ALIASES
    )
    daemon.start()
    yield daemon
    daemon.stop()


def message(marker: str, body: bytes = b"hello\r\n") -> bytes:
    return f"Message-ID: <{marker}@test>\r\nSubject: {marker}\r\n\r\n".encode() + body


def new_marker() -> str:
    return uuid.uuid4().hex


def delivered(daemon: Daemon, domain: str, local: str, marker: str) -> list[bytes]:
    """The files in ``local@domain``'s new/ that carry ``marker``."""
    return [m for m in daemon.messages(domain, local) if marker.encode() in m]


def assert_refused(daemon: Daemon, recipient: str, code: int, enhanced: str) -> None:
    with daemon.smtp() as client:
        client.ehlo("client.example.org")
        client.mail("s@example.org")
        reply = client.rcpt(recipient)
    assert reply[0] == code and reply[1].startswith(enhanced.encode()), reply


def delivery_line(daemon: Daemon, queue_id: str, address: str) -> str:
    return daemon.wait_for_log(
        rf"id={queue_id} to=<{re.escape(address)}> relay=local delay=\d+\.\d\d "
        r"status=sent \(delivered to maildir\)$"
    )


def queued_line(daemon: Daemon, queue_id: str, address: str) -> str:
    return daemon.wait_for_log(
        rf"id={queue_id} to=<{re.escape(address)}> relay=none delay=\d+\.\d\d "
        r"status=deferred \(queued for relay\)$"
    )


def assert_no_stray_files(maildir: Path) -> None:
    assert list((maildir / "tmp").iterdir()) == []


# -- the Maildir file --------------------------------------------------


def test_file_has_trace_headers_then_the_message_with_lf(mta):
    marker = new_marker()
    body = b"line one\r\n..dot-stuffed\r\n\r\nlast\r\n"
    queue_id = send(mta, "sender@example.org", ["alice@example.test"], message(marker, body))
    [stored] = delivered(mta, "example.test", "alice", marker)
    head = b"Return-Path: <sender@example.org>\nDelivered-To: alice@example.test\n"
    assert stored.startswith(head)
    received = RECEIVED.match(stored, len(head))
    assert received and f"id {queue_id}".encode() in received.group(0)
    assert b"for <alice@example.test>" in received.group(0)
    expected = message(marker, body).replace(b"\r\n", b"\n")  # smtplib dot-stuffs
    assert stored[received.end():] == expected
    delivery_line(mta, queue_id, "alice@example.test")


def test_file_name_is_unique_and_carries_the_size(mta):
    marker = new_marker()
    send(mta, "s@example.org", ["bob@example.test"], message(marker))
    new = mta.maildir("example.test", "bob") / "new"
    [path] = [p for p in new.iterdir() if marker.encode() in p.read_bytes()]
    match = NAME.match(path.name)
    assert match, path.name
    assert int(match["size"]) == path.stat().st_size
    names = [p.name for p in new.iterdir()]
    assert len(set(names)) == len(names)
    assert_no_stray_files(mta.maildir("example.test", "bob"))


def test_maildir_is_private(mta):
    send(mta, "s@example.org", ["alice@example.test"], message(new_marker()))
    maildir = mta.maildir("example.test", "alice")
    for folder in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        assert folder.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (maildir / "new").iterdir())


def test_null_sender_and_quoted_sender_in_return_path(mta):
    marker = new_marker()
    send(mta, "<>", ["alice@example.test"], message(marker))
    [stored] = delivered(mta, "example.test", "alice", marker)
    assert stored.startswith(b"Return-Path: <>\n")
    marker = new_marker()
    send(mta, '"john doe"@example.org', ["alice@example.test"], message(marker))
    [stored] = delivered(mta, "example.test", "alice", marker)
    assert stored.startswith(b'Return-Path: <"john doe"@example.org>\n')


# -- who receives what ------------------------------------------------------


def test_local_parts_are_case_insensitive(mta):
    marker = new_marker()
    queue_id = send(mta, "s@example.org", ["ALICE@Example.TEST"], message(marker))
    [stored] = delivered(mta, "example.test", "alice", marker)
    assert b"\nDelivered-To: alice@example.test\n" in stored
    delivery_line(mta, queue_id, "alice@example.test")


def test_plus_address_goes_to_the_account(mta):
    marker = new_marker()
    queue_id = send(mta, "s@example.org", ["alice+lists@example.test"], message(marker))
    [stored] = delivered(mta, "example.test", "alice", marker)
    assert b"\nDelivered-To: alice+lists@example.test\n" in stored
    delivery_line(mta, queue_id, "alice+lists@example.test")


def test_unknown_recipient_is_refused_at_rcpt(mta):
    assert_refused(mta, "nobody@example.test", 550, "5.1.1")
    assert_refused(mta, "nobody+alice@example.test", 550, "5.1.1")


@pytest.mark.parametrize(
    "recipient, domain",
    [
        ("postmaster@example.test", "example.test"),
        ("PostMaster@localhost", "localhost"),
        ("postmaster+reports@example.test", "example.test"),
        # hostname mx.example.test is not local: the first local domain
        ("postmaster", "example.test"),
        ("POSTMASTER", "example.test"),
    ],
)
def test_postmaster_always_accepted(mta, recipient, domain):
    marker = new_marker()
    send(mta, "s@example.org", [recipient], message(marker))
    assert len(delivered(mta, domain, "postmaster", marker)) == 1


def test_alias_to_two_accounts_gives_each_its_delivered_to(mta):
    marker = new_marker()
    queue_id = send(mta, "s@example.org", ["info@example.test"], message(marker))
    [for_alice] = delivered(mta, "example.test", "alice", marker)
    [for_bob] = delivered(mta, "example.test", "bob", marker)
    assert b"\nDelivered-To: alice@example.test\n" in for_alice
    assert b"\nDelivered-To: bob@example.test\n" in for_bob
    assert for_alice.split(b"\nReceived: ", 1)[1] == for_bob.split(b"\nReceived: ", 1)[1]
    delivery_line(mta, queue_id, "alice@example.test")
    delivery_line(mta, queue_id, "bob@example.test")


def test_bare_alias_works_in_every_local_domain(mta):
    for domain in ("example.test", "localhost"):
        marker = new_marker()
        send(mta, "s@example.org", [f"sales@{domain}"], message(marker))
        [stored] = delivered(mta, "example.test", "bob", marker)
        assert b"\nDelivered-To: bob@example.test\n" in stored


def test_recipient_reached_twice_gets_one_copy(mta):
    marker = new_marker()
    recipients = ["alice@example.test", "Alice@example.test", "info@example.test"]
    queue_id = send(mta, "s@example.org", recipients, message(marker))
    assert len(delivered(mta, "example.test", "alice", marker)) == 1
    assert len(delivered(mta, "example.test", "bob", marker)) == 1
    mta.wait_for_log(rf"id={queue_id} from=<s@example.org> size=\d+ nrcpt=3 ")

    def deliveries() -> list[str]:
        return [line for line in mta.log if f"id={queue_id} to=" in line]

    # A worker's lines reach the log through the main process, after the reply.
    mta.wait_for(lambda: len(deliveries()) >= 2)
    assert len(deliveries()) == 2


def test_alias_loop_is_refused_at_rcpt(mta):
    assert_refused(mta, "loop1@example.test", 550, "5.4.6")


def test_catch_all_takes_unknown_local_parts_but_not_accounts(catchall_mta):
    marker = new_marker()
    send(catchall_mta, "s@example.org", ["whoever@example.test"], message(marker))
    [stored] = delivered(catchall_mta, "example.test", "alice", marker)
    assert b"\nDelivered-To: alice@example.test\n" in stored
    marker = new_marker()
    send(catchall_mta, "s@example.org", ["bob+x@example.test"], message(marker))
    assert len(delivered(catchall_mta, "example.test", "bob", marker)) == 1
    assert delivered(catchall_mta, "example.test", "alice", marker) == []


def test_alias_chain_of_ten_is_followed_eleven_is_a_loop(catchall_mta):
    marker = new_marker()
    send(catchall_mta, "s@example.org", ["d0@example.test"], message(marker))
    assert len(delivered(catchall_mta, "example.test", "bob", marker)) == 1
    assert_refused(catchall_mta, "e0@example.test", 550, "5.4.6")


def test_loop_is_refused_even_with_a_catch_all(catchall_mta):
    assert_refused(catchall_mta, "loop1@example.test", 550, "5.4.6")


def test_alias_reaching_a_mailbox_twice_gives_one_copy(catchall_mta):
    marker = new_marker()
    send(catchall_mta, "s@example.org", ["team@example.test"], message(marker))
    assert len(delivered(catchall_mta, "example.test", "alice", marker)) == 1
    assert len(delivered(catchall_mta, "example.test", "bob", marker)) == 1


def test_alias_to_itself_keeps_a_copy_and_forwards(catchall_mta):
    marker = new_marker()
    queue_id = send(catchall_mta, "s@example.org", ["carol@example.test"], message(marker))
    assert len(delivered(catchall_mta, "example.test", "carol", marker)) == 1
    envelope = json.loads((catchall_mta.spool / "queue" / f"{queue_id}.env").read_text())
    assert [r["address"] for r in envelope["recipients"]] == ["carol-archive@remote.example"]


@pytest.mark.parametrize(
    "recipient",
    [
        '"../../etc"@example.test',
        "a/b@example.test",
        '".hidden"@example.test',
        '"a..b"@example.test',
    ],
)
def test_local_parts_that_could_escape_the_spool_are_refused(catchall_mta, recipient):
    assert_refused(catchall_mta, recipient, 550, "5.1.3")
    assert not (catchall_mta.spool / "etc").exists()


@pytest.mark.parametrize("control", [b"\x00", b"\x01", b"\x7f", b"\t"])
def test_control_characters_in_local_parts_are_refused(catchall_mta, control):
    with catchall_mta.smtp() as client:
        client.ehlo("client.example.org")
        client.mail("s@example.org")
        client.send(b'RCPT TO:<"a' + control + b'b"@example.test>\r\n')
        code, _ = client.getreply()
    assert 500 <= code < 600


# -- remote recipients and relay policy --------------------------------------


def test_remote_recipient_from_trusted_client_is_queued(mta):
    marker = new_marker()
    queue_id = send(
        mta, "s@example.org", ["friend@remote.example", "Friend@remote.example"], message(marker)
    )
    queue = mta.spool / "queue"
    stored = (queue / f"{queue_id}.msg").read_bytes()
    assert stored.startswith(b"Received: from client.example.org")
    assert stored.endswith(message(marker).replace(b"\r\n", b"\n"))
    envelope = json.loads((queue / f"{queue_id}.env").read_text())
    assert envelope["version"] == 1 and envelope["id"] == queue_id
    assert envelope["sender"] == "s@example.org"
    # remote local parts keep their case: two recipients
    assert [r["address"] for r in envelope["recipients"]] == [
        "friend@remote.example",
        "Friend@remote.example",
    ]
    assert {r["state"] for r in envelope["recipients"]} == {"queued"}
    queued_line(mta, queue_id, "friend@remote.example")
    queued_line(mta, queue_id, "Friend@remote.example")
    assert not list(queue.glob("*.tmp"))


def test_remote_recipient_listed_twice_is_queued_once(mta):
    queue_id = send(
        mta,
        "s@example.org",
        ["friend@remote.example", "both@example.test", "friend@REMOTE.example"],
        message(new_marker()),
    )
    envelope = json.loads((mta.spool / "queue" / f"{queue_id}.env").read_text())
    assert [r["address"] for r in envelope["recipients"]] == ["friend@remote.example"]


def test_alias_with_local_and_remote_targets(mta):
    marker = new_marker()
    queue_id = send(mta, "s@example.org", ["both@example.test"], message(marker))
    [local_copy] = delivered(mta, "example.test", "alice", marker)
    queued = (mta.spool / "queue" / f"{queue_id}.msg").read_bytes()
    assert local_copy.endswith(queued)
    assert queued.startswith(b"Received: ")
    delivery_line(mta, queue_id, "alice@example.test")
    queued_line(mta, queue_id, "friend@remote.example")


def test_quoted_remote_local_part_is_kept_quoted(mta):
    queue_id = send(mta, "s@example.org", ['"john doe"@remote.example'], message(new_marker()))
    envelope = json.loads((mta.spool / "queue" / f"{queue_id}.env").read_text())
    assert envelope["recipients"][0]["address"] == '"john doe"@remote.example'


def test_untrusted_client_may_not_relay(start_mta):
    untrusted = '[relay]\nnetworks = ["192.0.2.0/24"]\n'
    daemon = start_mta(users=USERS, aliases=ALIASES, extra=untrusted)
    assert_refused(daemon, "friend@remote.example", 554, "5.7.1")
    assert_refused(daemon, "postmaster@mx.example.test", 554, "5.7.1")
    # local mail is still welcome, and so is an alias of ours that forwards
    marker = new_marker()
    send(daemon, "s@example.org", ["alice@example.test", "both@example.test"], message(marker))
    assert len(delivered(daemon, "example.test", "alice", marker)) == 1
    assert list((daemon.spool / "queue").glob("*.env"))


# -- the files are read again when they change ----------------------------


def test_users_and_aliases_are_reread_without_restart(start_mta):
    daemon = start_mta(users="alice@example.test:{PLAIN}a\n")
    assert_refused(daemon, "carol@example.test", 550, "5.1.1")
    (daemon.root / "users").write_text(
        "alice@example.test:{PLAIN}a\ncarol@example.test:{PLAIN}c\n"
    )
    (daemon.root / "aliases").write_text("news: carol@example.test\n")
    marker = new_marker()
    send(daemon, "s@example.org", ["carol@example.test", "news@localhost"], message(marker))
    assert len(delivered(daemon, "example.test", "carol", marker)) == 1
    (daemon.root / "users").write_text("alice@example.test:{PLAIN}a\n")
    assert_refused(daemon, "carol@example.test", 550, "5.1.1")
    assert_refused(daemon, "news@localhost", 550, "5.1.1")


# -- storage failures: 452 4.3.1 and nothing half-written ------------------------


def filler(size: int, char: bytes = b"x") -> bytes:
    """``size`` bytes of body in lines short enough for SMTP."""
    line = char * 76 + b"\r\n"
    return line * (size // len(line))


def data_reply(daemon: Daemon, recipients: list[str], body: bytes) -> tuple[int, bytes]:
    with daemon.smtp() as client:
        client.ehlo("client.example.org")
        client.mail("s@example.org")
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        try:
            return client.data(body)
        except smtplib.SMTPDataError as error:  # refused before the 354
            return error.smtp_code, error.smtp_error


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def assert_insufficient_storage(reply: tuple[int, bytes]) -> None:
    assert reply[0] == 452 and reply[1].startswith(b"4.3.1"), reply


def test_full_mail_disk_answers_452_and_keeps_nothing(tmp_path):
    daemon = make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES)
    with tmpfs(daemon.spool / "mail") as mail:
        daemon.start()
        try:
            # the body alone does not fit
            assert_insufficient_storage(
                data_reply(daemon, ["alice@example.test"], message("big", filler(300_000)))
            )
            # the first copy fits, the second one does not (committer's copy)
            assert_insufficient_storage(
                data_reply(daemon, ["info@example.test"], message("half", filler(150_000)))
            )
            assert all_files(mail) == []
            daemon.wait_for_log(r"not stored: No space left on device")
            marker = new_marker()
            send(daemon, "s@example.org", ["info@example.test"], message(marker))
            assert len(delivered(daemon, "example.test", "bob", marker)) == 1
        finally:
            daemon.stop()


def test_full_queue_disk_answers_452_and_keeps_nothing(tmp_path):
    daemon = make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES)
    with tmpfs(daemon.spool / "queue") as queue:
        daemon.start()
        try:
            assert_insufficient_storage(
                data_reply(daemon, ["friend@remote.example"], message("big", filler(300_000)))
            )
            # alice's copy is on another file system; the queue copy fails
            assert_insufficient_storage(
                data_reply(daemon, ["both@example.test"], message("both", filler(300_000)))
            )
            assert all_files(queue) == []
            assert daemon.messages("example.test", "alice") == []
            assert_no_stray_files(daemon.maildir("example.test", "alice"))
            # a copy across file systems works when it fits
            marker = new_marker()
            queue_id = send(daemon, "s@example.org", ["both@example.test"], message(marker))
            [local_copy] = delivered(daemon, "example.test", "alice", marker)
            assert local_copy.endswith((queue / f"{queue_id}.msg").read_bytes())
        finally:
            daemon.stop()


@contextmanager
def immutable(folder: Path) -> Iterator[None]:
    """``chattr +i``: even root cannot create or rename files in ``folder``."""
    run_or_skip(["chattr", "+i", str(folder)])
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize(
    "folder, recipients",
    [
        ("alice/tmp", ["alice@example.test"]),  # at DATA, before the 354
        ("bob/tmp", ["info@example.test"]),  # the copy for bob, at the end of data
        ("bob/new", ["info@example.test"]),  # the rename, in the committer
    ],
)
def test_unwritable_maildir_answers_452_and_keeps_nothing(start_mta, folder, recipients):
    daemon = start_mta(users=USERS, aliases=ALIASES)
    send(daemon, "s@example.org", ["info@example.test"], message(new_marker()))
    mail = daemon.spool / "mail" / "example.test"
    before = all_files(mail)
    with immutable(mail / folder):
        assert_insufficient_storage(data_reply(daemon, recipients, message("refused")))
    assert all_files(mail) == before
