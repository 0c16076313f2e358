"""Maildir names, folders and the checks on names taken from addresses."""

from __future__ import annotations

import os
import re
import stat
import time

import pytest

from tests.helpers.files import mode_and_group
from twisted_mta.mail.mailbox import UnsafeMailboxName, check_path_component
from twisted_mta.storage import files, maildir
from twisted_mta.storage.maildir import (
    Sharing,
    ensure_maildir,
    mailbox_path,
    may_share,
    open_temporary,
    prepare_mail_root,
    sweep_stale_temporaries,
)

TEMPORARY = re.compile(r"^(\d+)\.M(\d{1,6})P(\d+)Q(\d+)\.([^/:,]+)$")
FINAL = re.compile(r"^(\d+)\.M(\d{1,6})P(\d+)V([0-9a-f]+)I([0-9a-f]+)_(\d+)\.([^/:,]+),S=(\d+)$")


@pytest.mark.parametrize("name", ["alice", "alice+tag", "a.b", "jöhn", "x" * 255, "o'neil"])
def test_safe_names_are_kept(name):
    assert check_path_component(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "a..b", "a/b", "/", "a\\b", "a\x00b", "a\nb", "a\x1fb", "a\x7fb",
     "é" * 128],
)
def test_names_that_could_escape_or_confuse_are_refused(name):
    with pytest.raises(UnsafeMailboxName):
        check_path_component(name)


def test_mailbox_path_is_domain_then_local(tmp_path):
    assert mailbox_path(tmp_path, "example.test", "alice") == tmp_path / "example.test" / "alice"
    with pytest.raises(UnsafeMailboxName):
        mailbox_path(tmp_path, "example.test", "../alice")
    with pytest.raises(UnsafeMailboxName):
        mailbox_path(tmp_path, "..", "alice")


def test_ensure_maildir_creates_private_folders_and_syncs_them(tmp_path, monkeypatch):
    synced: list[str] = []
    monkeypatch.setattr(maildir, "fsync_directory", synced.append)
    monkeypatch.setattr(files, "fsync_directory", synced.append)
    box = tmp_path / "mail" / "example.test" / "alice"
    ensure_maildir(box)
    for folder in (tmp_path / "mail", box.parent, box, box / "tmp", box / "new", box / "cur"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    # each new folder's entry in its parent, then the maildir's own entries
    assert synced == [str(tmp_path), str(tmp_path / "mail"), str(box.parent), str(box)]
    synced.clear()
    ensure_maildir(box)
    assert synced == []


def test_a_shared_maildir_and_the_folders_above_it_are_2770_of_the_group(
    tmp_path, shareable_group, strict_umask
):
    box = tmp_path / "mail" / "example.test" / "alice"
    ensure_maildir(box, Sharing(shareable_group))
    for folder in (tmp_path / "mail", box.parent, box, box / "tmp", box / "new", box / "cur"):
        assert mode_and_group(folder) == (0o2770, shareable_group), folder
    assert mode_and_group(tmp_path)[0] != 0o2770  # above the mail root: not ours to share


def test_a_shared_message_file_is_0660_of_the_group(tmp_path, shareable_group, strict_umask):
    box = tmp_path / "alice"
    ensure_maildir(box, Sharing(shareable_group))
    temporary = open_temporary(box, Sharing(shareable_group))
    os.close(temporary.fd)
    assert mode_and_group(temporary.path) == (0o660, shareable_group)


def test_a_file_in_a_maildir_made_before_sharing_still_gets_the_group(tmp_path, shareable_group):
    box = tmp_path / "alice"
    ensure_maildir(box)
    temporary = open_temporary(box, Sharing(shareable_group))
    os.close(temporary.fd)
    assert mode_and_group(temporary.path) == (0o660, shareable_group)
    assert mode_and_group(box / "tmp") == (0o700, os.getegid())  # the admin's chgrp -R


def test_without_sharing_folders_are_0700_and_files_0600_of_ours(tmp_path):
    box = tmp_path / "mail" / "example.test" / "alice"
    ensure_maildir(box)
    temporary = open_temporary(box)
    os.close(temporary.fd)
    for folder in (tmp_path / "mail", box.parent, box, box / "tmp", box / "new", box / "cur"):
        assert mode_and_group(folder) == (0o700, os.getegid())
    assert mode_and_group(temporary.path) == (0o600, os.getegid())


def test_a_shared_mail_root_is_made_at_start_a_private_one_at_first_delivery(
    tmp_path, shareable_group
):
    assert prepare_mail_root(tmp_path / "private", Sharing())
    assert not (tmp_path / "private").exists()
    assert prepare_mail_root(tmp_path / "shared", Sharing(shareable_group))
    assert mode_and_group(tmp_path / "shared") == (0o2770, shareable_group)


def test_a_mail_root_made_before_sharing_is_left_as_it_is_and_told(tmp_path, shareable_group):
    if shareable_group == os.getegid():
        pytest.skip("no group other than our own to share with")
    ensure_maildir(tmp_path / "mail" / "example.test" / "alice")
    assert not prepare_mail_root(tmp_path / "mail", Sharing(shareable_group))
    assert mode_and_group(tmp_path / "mail") == (0o700, os.getegid())


def test_only_a_member_of_the_group_or_root_may_share(monkeypatch):
    monkeypatch.setattr(os, "getegid", lambda: 100)
    monkeypatch.setattr(os, "getgroups", lambda: [100, 200])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert may_share(Sharing())
    assert may_share(Sharing(100)) and may_share(Sharing(200))
    assert not may_share(Sharing(300))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert may_share(Sharing(300))


def test_ensure_maildir_completes_a_partial_one(tmp_path):
    box = tmp_path / "alice"
    (box / "new").mkdir(parents=True)
    ensure_maildir(box)
    assert sorted(p.name for p in box.iterdir()) == ["cur", "new", "tmp"]


def test_temporary_and_final_names(tmp_path):
    ensure_maildir(tmp_path)
    temporary = open_temporary(tmp_path)
    try:
        name = os.path.basename(temporary.path)
        seconds, micro, pid, sequence, host = TEMPORARY.match(name).groups()
        assert os.path.dirname(temporary.path) == str(tmp_path / "tmp")
        assert int(pid) == os.getpid()
        final = temporary.final_path(1234)
        assert os.path.dirname(final) == str(tmp_path / "new")
        match = FINAL.match(os.path.basename(final))
        assert match, final
        info = os.fstat(temporary.fd)
        assert match.groups() == (
            seconds, micro, pid, f"{info.st_dev:x}", f"{info.st_ino:x}", sequence, host, "1234"
        )
        assert stat.S_IMODE(info.st_mode) == 0o600
        # readable: the copies for other mailboxes are taken from this file
        os.write(temporary.fd, b"body")
        assert os.pread(temporary.fd, 4, 0) == b"body"
    finally:
        os.close(temporary.fd)


def test_names_are_unique_within_a_process(tmp_path):
    ensure_maildir(tmp_path)
    files = [open_temporary(tmp_path) for _ in range(200)]
    for temporary in files:
        os.close(temporary.fd)
    assert len({t.path for t in files}) == len({t.final_path(1) for t in files}) == 200


def test_hostname_cannot_break_the_name():
    assert maildir._maildir_safe("a/b:c,d\\e") == "a\\057b\\072c\\054d\\134e"


HOUR = 3600.0


def aged(path, hours: float, now: float):
    path.write_bytes(b"partial message")
    os.utime(path, (now - hours * HOUR, now - hours * HOUR))
    return path


def test_the_sweep_removes_only_our_temporary_files_older_than_36_hours(tmp_path):
    now = time.time()
    box = mailbox_path(tmp_path, "example.test", "alice")
    ensure_maildir(box)
    ours = open_temporary(box)
    os.close(ours.fd)
    stale = aged(box / "tmp" / os.path.basename(ours.path), 36.5, now)
    fresh = aged(box / "tmp" / "1700000000.M1P2Q3.host", 35, now)
    foreign = aged(box / "tmp" / "1700000000.M1P2.dovecot-host", 72, now)
    delivered = aged(box / "new" / "1700000000.M1P2Q4.host", 72, now)
    other_box = mailbox_path(tmp_path, "example.org", "bob")
    ensure_maildir(other_box)
    also_stale = aged(other_box / "tmp" / "1600000000.M999999P77Q0.a\\057b", 100, now)
    assert sweep_stale_temporaries(tmp_path, now) == 2
    assert not stale.exists() and not also_stale.exists()
    assert fresh.exists() and foreign.exists() and delivered.exists()
    assert sweep_stale_temporaries(tmp_path, now) == 0


def test_the_sweep_of_a_missing_mail_folder_finds_nothing(tmp_path):
    assert sweep_stale_temporaries(tmp_path / "mail") == 0
