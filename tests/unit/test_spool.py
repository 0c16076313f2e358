"""The spool: one message, written once, made durable in every place it goes."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from twisted.python.failure import Failure

from tests.helpers.files import mode_and_group
from tests.helpers.threads import ThreadReactor
from twisted_mta.intake import spool as spool_module
from twisted_mta.intake.spool import IncomingMessage, Spool, StorageError
from twisted_mta.mail.mailbox import Mailbox
from twisted_mta.storage import files as files_module
from twisted_mta.storage.committer import Committer
from twisted_mta.storage.envelope import Envelope, new_queue_id
from twisted_mta.storage.maildir import Sharing

RECEIVED = b"Received: from client.test ([192.0.2.1])\n\tby mx.test; date\n"
BODY = b"Subject: hi\n\nhello\n"
ALICE, BOB = Mailbox("example.test", "alice"), Mailbox("example.test", "bob")


@pytest.fixture
def reactor() -> ThreadReactor:
    return ThreadReactor()


@pytest.fixture
def spool(tmp_path, reactor):
    committer = Committer(reactor)
    spool = Spool(tmp_path / "mail", tmp_path / "queue", committer)
    spool.prepare()
    yield spool
    committer.stop()



def envelope(*remote: str) -> Envelope:
    return Envelope("s@example.org", remote, {"ip": "192.0.2.1"}, "8BITMIME", False)


def incoming(spool: Spool, mailboxes: dict, *remote: str) -> IncomingMessage:
    message = spool.open_message("QID", mailboxes, envelope(*remote), RECEIVED)
    for chunk in (BODY[:7], BODY[7:]):
        message.write(chunk)
    return message


def all_files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def stored(tmp_path: Path) -> dict[str, bytes]:
    """Files by a readable name: ``alice``, ``queue/QID.msg``..."""
    files = {}
    for name, content in all_files(tmp_path).items():
        parts = name.split("/")
        if parts[0] == "mail":
            assert parts[3] == "new", name
            files[parts[2]] = content
        else:
            files[name] = content
    return files


def trace(delivered_to: str) -> bytes:
    return f"Return-Path: <s@example.org>\nDelivered-To: {delivered_to}\n".encode()


def test_prepare_removes_what_was_never_acknowledged(tmp_path, logged):
    queue = tmp_path / "queue"
    queue.mkdir()
    names = ["A.msg", "A.env", "B.msg", "C.env", "D.msg.tmp", "D.env.tmp", "E.msg", "E.env.tmp"]
    for name in names:
        (queue / name).write_text(name)
    Spool(tmp_path / "mail", queue, Committer(ThreadReactor())).prepare()
    assert sorted(os.listdir(queue)) == ["A.env", "A.msg"]
    assert len([m for m in logged if "never acknowledged" in m]) == 6


def test_prepare_sweeps_stale_maildir_temporaries_in_one_line(tmp_path, logged):
    tmp = tmp_path / "mail" / "example.test" / "alice" / "tmp"
    tmp.mkdir(parents=True)
    for n in range(3):
        stale = tmp / f"1700000000.M{n}P1Q{n}.host"
        stale.write_bytes(b"half")
        os.utime(stale, (0, 0))
    Spool(tmp_path / "mail", tmp_path / "queue", Committer(ThreadReactor())).prepare()
    assert os.listdir(tmp) == []
    assert [m for m in logged if "stale" in m] == [
        "removed 3 stale temporary file(s) from maildir tmp/ folders (older than 36 hours)"
    ]


def test_one_message_for_two_mailboxes_and_a_relay(tmp_path, spool, reactor, logged):
    message = incoming(spool, {ALICE: "alice+x@example.test", BOB: "bob@example.test"},
                       "far@remote.example")
    acknowledged = message.eomReceived()
    acknowledged.addCallback(lambda queue_id: logged.append(f"acknowledged {queue_id}"))
    assert reactor.results(acknowledged) == [None]
    files = stored(tmp_path)
    assert files.pop("alice") == trace("alice+x@example.test") + RECEIVED + BODY
    assert files.pop("bob") == trace("bob@example.test") + RECEIVED + BODY
    assert files.pop("queue/QID.msg") == RECEIVED + BODY
    document = json.loads(files.pop("queue/QID.env"))
    assert files == {}
    assert document["version"] == 1 and document["id"] == "QID"
    assert document["size"] == len(BODY) and document["sender"] == "s@example.org"
    assert [(r["address"], r["state"]) for r in document["recipients"]] == [
        ("far@remote.example", "queued")
    ]
    # the server's 250 first, then one line per delivery
    start = logged.index("acknowledged QID")
    assert [line.split(" delay=")[0] for line in logged[start + 1:]] == [
        "id=QID to=<alice+x@example.test> relay=local",
        "id=QID to=<bob@example.test> relay=local",
        "id=QID to=<far@remote.example> relay=none",
    ]
    assert logged[-1].endswith(" status=deferred (queued for relay)")
    assert logged[-2].endswith(" status=sent (delivered to maildir)")


def test_shared_mailboxes_get_0660_files_of_the_group_the_queue_stays_private(
    tmp_path, reactor, shareable_group, strict_umask
):
    committer = Committer(reactor)
    spool = Spool(
        tmp_path / "mail", tmp_path / "queue", committer, sharing=Sharing(shareable_group)
    )
    spool.prepare()
    try:
        message = incoming(spool, {ALICE: "alice@example.test", BOB: "bob@example.test"},
                           "far@remote.example")
        assert reactor.results(message.eomReceived()) == ["QID"]
    finally:
        committer.stop()
    delivered = list((tmp_path / "mail").glob("*/*/new/*"))
    assert len(delivered) == 2  # the first file and a copy of it
    for path in delivered:
        assert mode_and_group(path) == (0o660, shareable_group), path
    for path in (tmp_path / "queue").iterdir():
        assert mode_and_group(path)[0] == 0o600, path


def test_a_mail_root_made_before_sharing_is_told_at_start(
    tmp_path, shareable_group, logged
):
    if shareable_group == os.getegid():
        pytest.skip("no group other than our own to share with")
    (tmp_path / "mail").mkdir(mode=0o700)
    spool = Spool(
        tmp_path / "mail", tmp_path / "queue", Committer(ThreadReactor()),
        sharing=Sharing(shareable_group),
    )
    spool.prepare()
    assert logged == [
        f"delivery.group: {tmp_path / 'mail'} and the maildirs in it predate the setting"
        " and are not shared: chgrp -R and chmod them (see the README)"
    ]


def test_remote_only_message_is_streamed_into_the_queue(tmp_path, spool, reactor):
    message = incoming(spool, {}, "far@remote.example")
    assert os.path.exists(tmp_path / "queue" / "QID.msg.tmp")
    reactor.results(message.eomReceived())
    assert sorted(stored(tmp_path)) == ["queue/QID.env", "queue/QID.msg"]


def test_copies_work_across_file_systems(tmp_path, spool, reactor, monkeypatch):
    def cross_device(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    reactor.results(incoming(spool, {ALICE: "a@example.test"}, "f@remote.example").eomReceived())
    assert stored(tmp_path)["queue/QID.msg"] == RECEIVED + BODY


def test_a_lost_connection_leaves_nothing(tmp_path, spool):
    message = incoming(spool, {ALICE: "alice@example.test"}, "far@remote.example")
    message.connectionLost()
    assert all_files(tmp_path) == {}


def assert_storage_error(result) -> None:
    assert isinstance(result, Failure) and isinstance(result.value, StorageError)
    assert result.value.code == 452 and result.value.enhanced == "4.3.1"


def test_a_failed_write_answers_452_and_leaves_nothing(tmp_path, spool, monkeypatch):
    message = spool.open_message("QID", {ALICE: "a@example.test"}, envelope(), RECEIVED)

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "write", disk_full)
    message.write(BODY)
    monkeypatch.undo()
    failures: list = []
    message.eomReceived().addErrback(failures.append)
    assert_storage_error(failures[0])
    assert all_files(tmp_path) == {}


def test_an_unusable_mail_folder_answers_452_at_once(tmp_path, spool):
    spool.mail_root.write_text("not a folder")
    with pytest.raises(StorageError):
        spool.open_message("QID", {ALICE: "a@example.test"}, envelope(), RECEIVED)
    assert sorted(all_files(tmp_path)) == ["mail"]


def test_a_failed_commit_answers_452_and_leaves_nothing(tmp_path, spool, reactor, monkeypatch):
    rename = os.rename

    def refuse_bob(source, target):
        if "/bob/" in target:
            raise OSError(errno.EROFS, "Read-only file system")
        rename(source, target)

    monkeypatch.setattr(os, "rename", refuse_bob)
    message = incoming(spool, {ALICE: "a@example.test", BOB: "b@example.test"})
    [result] = reactor.results(message.eomReceived())
    assert_storage_error(result)
    assert all_files(tmp_path) == {}


def test_queue_ids_never_repeat_and_sort_by_time():
    ids = [new_queue_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)


def test_prepare_makes_the_new_queue_folder_durable(tmp_path, monkeypatch):
    synced: list[str] = []
    monkeypatch.setattr(files_module, "fsync_directory", synced.append)
    Spool(tmp_path / "mail", tmp_path / "var" / "queue", Committer(ThreadReactor())).prepare()
    assert synced == [str(tmp_path), str(tmp_path / "var")]
