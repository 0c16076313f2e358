"""twisted-mta-sendmail and the maildrop: flags, the drop file, pickup by the daemon."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import sys
import time
from pathlib import Path

import pytest
from twisted.internet import task

from tests.helpers.system import assembled
from tests.helpers.threads import ThreadReactor
from twisted_mta import sendmail
from twisted_mta import watch as watch_module
from twisted_mta.intake import maildrop as maildrop_module
from twisted_mta.intake.maildrop import MaildropService
from twisted_mta.storage import drop as drop_module
from twisted_mta.storage import files as files_module
from twisted_mta.storage.drop import DropEnvelope, write_drop

HOST = "mx.example.test"
LOGIN = sendmail.login_name()


# -- flags -------------------------------------------------------------------


def test_flags_that_matter():
    options = sendmail.parse_args(
        ["-t", "-i", "-f", "bob@example.test", "-F", "Bob B", "-C", "/etc/mta.toml", "a@x"]
    )
    assert options.extract and options.ignore_dots
    assert options.sender == "bob@example.test" and options.full_name == "Bob B"
    assert options.config == "/etc/mta.toml" and options.recipients == ["a@x"]


def test_clustered_and_attached_forms():
    options = sendmail.parse_args(["-ti", "-fbob@example.test", "a@x", "b@y"])
    assert options.extract and options.ignore_dots and options.sender == "bob@example.test"
    assert options.recipients == ["a@x", "b@y"]
    assert sendmail.parse_args(["-oi"]).ignore_dots
    assert sendmail.parse_args(["-r", "c@z"]).sender == "c@z"


def test_harmless_flags_are_ignored():
    harmless = ["-odi", "-oem", "-v", "-bm", "-B", "8BITMIME", "-N", "never", "-R", "hdrs",
                "-V", "envid", "-O", "DeliveryMode=b", "-L", "tag", "-h", "17", "-Am", "-U", "-m"]
    options = sendmail.parse_args([*harmless, "a@x"])
    assert options == sendmail.Options(recipients=["a@x"])


@pytest.mark.parametrize("argv", [["-bs"], ["-bd"], ["-Z"], ["--help"], ["-f"]])
def test_unsupported_flags_are_usage_errors(argv):
    with pytest.raises(sendmail.UsageError):
        sendmail.parse_args(argv)


@pytest.mark.parametrize(
    "argv, program, mode, command",
    [
        (["-bp"], "sendmail", "mailq", ["queue", "list"]),
        ([], "mailq", "mailq", ["queue", "list"]),
        (["-bi"], "sendmail", "newaliases", ["check-aliases"]),
        ([], "newaliases", "newaliases", ["check-aliases"]),
        (["-q"], "sendmail", "flush", ["queue", "flush"]),
        (["-q30m", "-C", "/etc/mta.toml"], "sendmail", "flush",
         ["queue", "flush", "--config", "/etc/mta.toml"]),
        (["-bp", "-C", "x.toml"], "sendmail", "mailq", ["queue", "list", "--config", "x.toml"]),
    ],
)
def test_queue_and_aliases_modes_hand_over_to_twisted_mta(argv, program, mode, command):
    options = sendmail.parse_args(argv, program)
    assert options.mode == mode
    assert sendmail.delegated_command(options) == [
        sys.executable, "-m", "twisted_mta.cli", *command
    ]


def test_main_replaces_itself_with_the_command(monkeypatch):
    ran = []

    def execv(path, argv):
        ran.append((path, argv))
        raise OSError(2, "No such file or directory")

    monkeypatch.setattr(sendmail.os, "execv", execv)
    monkeypatch.setattr(sendmail.sys, "argv", ["/usr/bin/mailq"])
    assert sendmail.main([], io.BytesIO()) == sendmail.EX_TEMPFAIL
    assert ran == [(sys.executable, [sys.executable, "-m", "twisted_mta.cli", "queue", "list"])]


def test_a_lone_dot_ends_input_unless_i():
    data = b"Subject: x\n\n.leading dot stays\n.\nafter\n"
    assert sendmail.read_message(io.BytesIO(data), False, 1000) == (
        b"Subject: x\n\n.leading dot stays\n"
    )
    assert sendmail.read_message(io.BytesIO(data), True, 1000) == data
    assert sendmail.read_message(io.BytesIO(b"a\r\n.\r\nb\r\n"), False, 1000) == b"a\r\n"


def test_size_limit():
    with pytest.raises(sendmail.MessageTooBig):
        sendmail.read_message(io.BytesIO(b"x" * 11), True, 10)
    with pytest.raises(sendmail.MessageTooBig):
        sendmail.read_message(io.BytesIO(b"12345\n12345\n"), False, 10)


def test_addresses_are_qualified_checked_and_deduplicated():
    recipients = sendmail.recipients_of(["alice, Bob <b@remote.example>", "alice@" + HOST], HOST)
    assert recipients == [f"alice@{HOST}", "b@remote.example"]
    assert sendmail.envelope_sender(None, "carol", HOST) == f"carol@{HOST}"
    assert sendmail.envelope_sender("<>", "carol", HOST) == ""
    assert sendmail.envelope_sender("", "carol", HOST) == ""
    assert sendmail.envelope_sender("<bob>", "carol", HOST) == f"bob@{HOST}"
    with pytest.raises(sendmail.UsageError):
        sendmail.recipients_of(["a@bad..domain"], HOST)
    with pytest.raises(sendmail.UsageError):
        sendmail.envelope_sender("a b@x", "carol", HOST)


def test_headers_prepared_like_postfix_pickup():
    data = b"From x Mon Jan 1\r\nTo: a@x\r\nBcc: b@y,\r\n c@z\r\nSubject: hi\r\n\r\nbody\r\n"
    prepared = sendmail.prepare_message(data, sender="s@h", full_name="Sé B", hostname="h",
                                        now=0)
    header, _, body = prepared.message.partition(b"\n\n")
    assert body == b"body\n"
    lines = header.split(b"\n")
    assert lines[:2] == [b"To: a@x", b"Subject: hi"]
    assert lines[2] == b"From: =?utf-8?q?S=C3=A9?= B <s@h>"
    assert lines[3].startswith(b"Date: ") and lines[4].startswith(b"Message-ID: <")
    assert prepared.header_recipients == ["a@x", "b@y", "c@z"]


def test_existing_from_date_message_id_are_kept():
    data = b"From: Me <me@x>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <1@x>\n\nhi\n"
    prepared = sendmail.prepare_message(data, sender="s@h", full_name="N", hostname="h", now=0)
    assert prepared.message == data


def test_a_message_without_header_gets_one():
    prepared = sendmail.prepare_message(b"just text", sender="", full_name=None, hostname="h",
                                        now=0)
    header, _, body = prepared.message.partition(b"\n\n")
    assert header.startswith(b"From: MAILER-DAEMON@h\nDate: ")
    assert body == b"just text\n"


# -- the command, in-process -------------------------------------------------


@pytest.fixture
def config(tmp_path) -> Path:
    (tmp_path / "var").mkdir()
    path = tmp_path / "mta.toml"
    path.write_text(f'hostname = "{HOST}"\nspool = "var"\n[limits]\nmax_message_size = 1000\n')
    return path


def run_sendmail(argv: list[str], stdin: bytes, capsys) -> tuple[int, str]:
    code = sendmail.main(argv, io.BytesIO(stdin))
    return code, capsys.readouterr().err


def drops(config: Path) -> list[tuple[dict, bytes]]:
    maildrop = config.parent / "var" / "maildrop"
    found = []
    for path in sorted(p for p in maildrop.iterdir() if p.is_file()):
        line, _, message = path.read_bytes().partition(b"\n")
        found.append((json.loads(line), message))
    return found


def test_drop_file_holds_envelope_then_message(config, capsys):
    code, err = run_sendmail(["-C", str(config), "alice@example.test"],
                             b"Subject: hi\n\nbody\n.\nnot read\n", capsys)
    assert (code, err) == (0, "")
    [(document, message)] = drops(config)
    assert document["version"] == 1
    assert document["sender"] == f"{LOGIN}@{HOST}"
    assert document["recipients"] == ["alice@example.test"]
    assert document["user"] == LOGIN
    assert abs(document["time"] - time.time()) < 60
    assert message.startswith(b"Subject: hi\nFrom: ")
    assert message.endswith(b"\n\nbody\n")
    maildrop = config.parent / "var" / "maildrop"
    assert stat.S_IMODE(maildrop.stat().st_mode) == 0o1733
    assert [stat.S_IMODE(p.stat().st_mode) for p in maildrop.iterdir()] == [0o644]


def test_t_takes_recipients_from_headers_and_removes_bcc(config, capsys):
    message = b"To: Alice <alice@example.test>\nCc: bob\nBcc: secret@remote.example\n\nhi\n"
    code, _ = run_sendmail(["-C", str(config), "-t", "-f", "s@example.test", "extra@x.test"],
                           message, capsys)
    assert code == 0
    [(document, stored)] = drops(config)
    assert document["sender"] == "s@example.test"
    assert document["recipients"] == [
        "extra@x.test", "alice@example.test", f"bob@{HOST}", "secret@remote.example"
    ]
    assert b"secret" not in stored and b"Bcc" not in stored


def test_config_from_the_environment(config, capsys, monkeypatch):
    monkeypatch.setenv("TWISTED_MTA_CONFIG", str(config))
    assert run_sendmail(["-i", "a@x.test"], b"hi\n", capsys)[0] == 0
    assert len(drops(config)) == 1


@pytest.mark.parametrize(
    ("argv", "stdin", "code", "error"),
    [
        ([], b"Subject: x\n\n", 64, "no recipients"),
        (["a b@x"], b"x\n", 64, "bad recipient address"),
        (["-bs"], b"", 64, "-bs is not supported (only -bm, -bp and -bi)"),
        (["a@x.test"], b"x" * 2000, 65, "exceeds max_message_size"),
    ],
)
def test_errors_exit_like_sendmail(config, capsys, argv, stdin, code, error):
    result, err = run_sendmail(["-C", str(config), "-i", *argv], stdin, capsys)
    assert result == code
    assert err.startswith("twisted-mta-sendmail: ") and error in err
    assert err.count("\n") == 1


def test_no_spool_is_a_temporary_failure(tmp_path, capsys):
    config = tmp_path / "mta.toml"
    config.write_text('spool = "missing"\n')
    code, err = run_sendmail(["-C", str(config), "a@x.test"], b"x\n", capsys)
    assert code == 75 and "no spool directory" in err


def test_unwritable_maildrop_is_a_temporary_failure(config, capsys):
    (config.parent / "var" / "maildrop").write_text("not a folder")
    code, err = run_sendmail(["-C", str(config), "a@x.test"], b"x\n", capsys)
    assert code == 75 and "cannot write to the maildrop" in err


def test_broken_config_is_a_temporary_failure(tmp_path, capsys):
    config = tmp_path / "mta.toml"
    config.write_text("nonsense = 1\n")
    code, err = run_sendmail(["-C", str(config), "a@x.test"], b"x\n", capsys)
    assert code == 75 and "nonsense: unknown key" in err


# -- durability of the drop --------------------------------------------------


ENVELOPE = DropEnvelope("s@example.test", ("alice@example.test",), "carol", 1.0)


def test_drop_is_fsynced_then_renamed_then_the_folder_fsynced(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(source, target):
        events.append(("rename", f"{Path(source).name} -> {Path(target).name}"))
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(files_module, "fsync_directory", lambda d: events.append(("dir", str(d))))
    final = write_drop(tmp_path, ENVELOPE, b"Subject: x\n\nbody\n")
    temporary = Path(events[0][1]).name
    assert re.fullmatch(rf"\.{re.escape(final.name)}\.[0-9a-f]{{16}}\.tmp", temporary)
    assert events == [
        ("fsync", str(tmp_path / temporary)),
        ("rename", f"{temporary} -> {final.name}"),
        ("dir", str(tmp_path)),
    ]
    assert final.read_bytes() == ENVELOPE.to_line() + b"Subject: x\n\nbody\n"


def test_a_failed_drop_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        write_drop(tmp_path, ENVELOPE, b"x\n")
    assert list(tmp_path.iterdir()) == []


# -- the daemon side, without a reactor --------------------------------------


@pytest.fixture
def reactor() -> ThreadReactor:
    return ThreadReactor()


@pytest.fixture
def service(tmp_path, reactor):
    with assembled(tmp_path, reactor, users="alice@example.test:{PLAIN}a\n") as intake:
        maildrop = tmp_path / "maildrop"
        drop_module.prepare_directory(maildrop)
        yield MaildropService(maildrop, intake.system, reactor)



def inbox(service: MaildropService, local: str) -> list[bytes]:
    new = service.system.spool.mail_root / "example.test" / local / "new"
    return [p.read_bytes() for p in new.iterdir()] if new.is_dir() else []


def test_pickup_injects_then_removes(service, reactor, logged):
    path = write_drop(service.directory, ENVELOPE, b"Subject: dropped\n\nbody\n")
    reactor.results(service.pickup(path.name))
    [stored] = inbox(service, "alice")
    assert stored.endswith(b"\nSubject: dropped\n\nbody\n")
    assert not path.exists()
    assert any("listener=sendmail user=" in line for line in logged)


def test_drop_is_kept_until_the_injection_is_durable(service, reactor, monkeypatch, logged):
    path = write_drop(service.directory, ENVELOPE, b"Subject: dropped\n\nbody\n")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)  # the committer's fsync
    reactor.results(service.pickup(path.name))
    assert path.exists() and inbox(service, "alice") == []
    assert any("not injected, will retry" in line for line in logged)


def test_refused_recipients_remove_the_drop_after_the_bounce(service, reactor):
    envelope = DropEnvelope("alice@example.test", ("nobody@example.test",), "alice", 1.0)
    path = write_drop(service.directory, envelope, b"Subject: lost\n\nbody\n")
    reactor.results(service.pickup(path.name))
    assert not path.exists()
    [bounce] = inbox(service, "alice")
    assert b"Final-Recipient: rfc822; nobody@example.test" in bounce


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not json\nmessage\n", "envelope is not JSON"),
        (b'{"version": 2}\n', "unknown envelope version"),
        (b'{"version": 1, "sender": "", "recipients": [], "user": "u", "time": 1}\n',
         "'recipients' must be a list"),
        (b'{"version": 1, "sender": 5, "recipients": ["a@b"], "user": "u", "time": 1}\n',
         "'sender' missing"),
        (b'{"version": 1, "sender": "a b", "recipients": ["a@b"], "user": "u", "time": 1}\n',
         "bad sender address"),
        (b'{"version": 1', "no complete envelope line"),
    ],
)
def test_malformed_drops_are_set_aside(service, reactor, logged, content, reason):
    (service.directory / "drop").write_bytes(content)
    reactor.results(service.pickup("drop"))
    assert (service.directory / "bad" / "drop").read_bytes() == content
    assert any(line.startswith("maildrop: drop moved to bad/: ") and reason in line
               for line in logged)


def test_links_and_fifos_are_set_aside(service, reactor, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(ENVELOPE.to_line() + b"secret\n")
    os.symlink(secret, service.directory / "symlink")
    os.link(secret, service.directory / "hardlink")
    os.mkfifo(service.directory / "fifo")
    for name in ("symlink", "hardlink", "fifo"):
        reactor.results(service.pickup(name))
    assert sorted(os.listdir(service.directory / "bad")) == ["fifo", "hardlink", "symlink"]
    assert inbox(service, "alice") == []


def settle(reactor: ThreadReactor, done) -> None:
    """Run the committer's reports until ``done()``."""
    while not done():
        function, args = reactor.calls.get(timeout=10)
        function(*args)


def test_without_inotify_drops_are_found_at_start_and_by_a_poll(service, reactor, monkeypatch):
    monkeypatch.setattr(watch_module, "inotify", None)
    clock = task.Clock()
    polling = MaildropService(service.directory, service.system, clock)
    early = write_drop(service.directory, ENVELOPE, b"Subject: early\n\n")
    polling.startService()
    settle(reactor, lambda: not early.exists())
    late = write_drop(service.directory, ENVELOPE, b"Subject: late\n\n")
    clock.advance(maildrop_module.POLL_INTERVAL)
    settle(reactor, lambda: not late.exists())
    polling.stopService()
    stored = inbox(service, "alice")
    assert len(stored) == 2
    assert b"\nSubject: early\n" in b"".join(stored) and b"\nSubject: late\n" in b"".join(stored)
