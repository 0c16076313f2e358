"""The directory: accounts, aliases, and the lookup order for a recipient."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from twisted_mta.directory.aliases import parse_aliases
from twisted_mta.directory.resolve import (
    MAX_DEPTH,
    AliasLoop,
    Directory,
    UnknownRecipient,
)
from twisted_mta.directory.users import parse_users
from twisted_mta.directory.watched import DirectoryUnavailable
from twisted_mta.mail.mailbox import Mailbox, UnsafeMailboxName

USERS = """\
# accounts
alice@example.test:{PLAIN}a:1000:1000::/home/alice   # extra fields are ignored
bob@example.test:{PLAIN}b
Carol+Work@Example.Test:{PLAIN}c
dave@example.test:{PLAIN}d
john doe@example.test:{PLAIN}j
alice@other.test:{PLAIN}a2
.hidden@example.test:{PLAIN}h
"""

ALIASES = """\
exact@example.test: alice@example.test
exact: bob@example.test                  # loses to the exact alias in example.test
dave: alice@example.test                 # a bare alias comes before the account
alice+spam@example.test: bob@example.test
carol: bob@example.test
INFO@Example.Test: alice@example.test, bob@example.test
team@example.test: info@example.test, alice@example.test
fwd: Someone@Remote.Example, alice@example.test
sales: bob                               # bare target: the alias's domain
alice@other.test: alice, Alice@Remote.Example
@example.test: alice@example.test
loop1@example.test: loop2@example.test
loop2@example.test: loop1@example.test
ghost: ghost, alice@example.test
postmaster: postmaster, bob@example.test
hidden: .hidden@example.test
"""

EXAMPLE, OTHER = "example.test", "other.test"


def mailbox(address: str) -> Mailbox:
    local, domain = address.split("@")
    return Mailbox(domain, local)


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    users, aliases = tmp_path / "users", tmp_path / "aliases"
    users.write_text(USERS)
    aliases.write_text(ALIASES)
    return users, aliases


@pytest.fixture
def directory(files) -> Directory:
    return Directory(frozenset({"Example.Test", OTHER}), "+", *files)


def delivered(directory: Directory, address: str) -> dict[str, str]:
    """``mailbox address -> Delivered-To`` for ``address``."""
    local, domain = address.rsplit("@", 1)
    resolution = directory.resolve(local, domain)
    return {box.address: to for box, to in resolution.mailboxes.items()}


@pytest.mark.parametrize(
    "recipient, expected",
    [
        # exact alias, then bare alias, then account
        ("exact@example.test", {"alice@example.test": "alice@example.test"}),
        ("exact@other.test", {"bob@example.test": "bob@example.test"}),
        ("dave@example.test", {"alice@example.test": "alice@example.test"}),
        # an account comes before the catch-all
        ("bob@example.test", {"bob@example.test": "bob@example.test"}),
        # the full local part first, then without the +tag
        ("alice+spam@example.test", {"bob@example.test": "bob@example.test"}),
        ("alice+news@example.test", {"alice@example.test": "alice+news@example.test"}),
        ("carol+work@example.test", {"carol+work@example.test": "carol+work@example.test"}),
        ("carol+home@example.test", {"bob@example.test": "bob@example.test"}),
        # case-insensitive local parts, keys and accounts
        ("ALICE@EXAMPLE.TEST", {"alice@example.test": "alice@example.test"}),
        ("Info+x@example.test", {"alice@example.test": "alice@example.test",
                                 "bob@example.test": "bob@example.test"}),
        # the catch-all takes the rest of its domain, postmaster included
        ("whoever@example.test", {"alice@example.test": "alice@example.test"}),
        # a bare target stays in the domain of the alias
        ("sales@example.test", {"bob@example.test": "bob@example.test"}),
        # Delivered-To is written as SMTP would write the address
        ("John Doe@example.test", {"john doe@example.test": '"john doe"@example.test'}),
    ],
)
def test_lookup_order(directory, recipient, expected):
    assert delivered(directory, recipient) == expected


def test_postmaster_always_exists(directory):
    # other.test has no catch-all: postmaster gets its own maildir
    assert delivered(directory, "postmaster@other.test") == {
        "postmaster@other.test": "postmaster@other.test",
        "bob@example.test": "bob@example.test",
    }
    no_aliases = Directory(frozenset({OTHER}), "+")
    assert delivered(no_aliases, "PostMaster+reports@other.test") == {
        "postmaster@other.test": "postmaster+reports@other.test"
    }


def test_unknown_recipient(directory):
    with pytest.raises(UnknownRecipient):
        directory.resolve("nobody", OTHER)
    with pytest.raises(UnknownRecipient):  # the bare alias's target is bob@other.test
        directory.resolve("sales", OTHER)


def test_remote_targets_keep_their_local_part(directory):
    resolution = directory.resolve("fwd", OTHER)
    assert resolution.remote == {"Someone@remote.example"}
    assert set(resolution.mailboxes) == {mailbox("alice@example.test")}


def test_alias_to_itself_delivers_to_the_account(directory):
    resolution = directory.resolve("alice", OTHER)
    assert set(resolution.mailboxes) == {mailbox("alice@other.test")}
    assert resolution.remote == {"Alice@remote.example"}


def test_a_mailbox_reached_twice_is_listed_once(directory):
    assert delivered(directory, "team@example.test") == {
        "alice@example.test": "alice@example.test",
        "bob@example.test": "bob@example.test",
    }


def test_loops_are_refused(directory):
    with pytest.raises(AliasLoop):
        directory.resolve("loop1", EXAMPLE)
    with pytest.raises(AliasLoop):  # comes back to itself without an account
        directory.resolve("ghost", OTHER)


def chain(tmp_path: Path, length: int) -> Directory:
    """``a0 -> a1 -> ... -> a<length>``, which is an account."""
    aliases = tmp_path / "chain"
    aliases.write_text("".join(f"a{n}: a{n + 1}\n" for n in range(length)))
    users = tmp_path / "chain-users"
    users.write_text(f"a{length}@example.test:{{PLAIN}}x\n")
    return Directory(frozenset({EXAMPLE}), "+", users, aliases)


def test_aliases_expand_ten_deep(tmp_path):
    resolution = chain(tmp_path, MAX_DEPTH).resolve("a0", EXAMPLE)
    assert set(resolution.mailboxes) == {Mailbox(EXAMPLE, f"a{MAX_DEPTH}")}


def test_eleven_deep_is_a_loop(tmp_path):
    with pytest.raises(AliasLoop):
        chain(tmp_path, MAX_DEPTH + 1).resolve("a0", EXAMPLE)


@pytest.mark.parametrize("local", ["../x", "a/b", ".x", "a..b", "a\x00b", "a\rb", "a\\b"])
def test_names_that_could_escape_the_spool_are_refused(directory, local):
    with pytest.raises(UnsafeMailboxName):
        directory.resolve(local, EXAMPLE)  # even though the catch-all would take it


def test_unsafe_account_reached_through_an_alias_is_refused(directory):
    with pytest.raises(UnsafeMailboxName):
        directory.resolve("hidden", EXAMPLE)


def test_targets_that_are_not_addresses_are_dropped():
    lines = ['p: |/bin/sh, /etc/passwd, "q"@x.test, a b, :include:/x, alice@example.test\n']
    assert parse_aliases(lines) == {"p": ("alice@example.test",)}


def test_malformed_alias_lines_are_skipped():
    assert parse_aliases(["no colon here\n", ": alice\n", "empty:\n", "ok: bob # note\n"]) == {
        "ok": ("bob",)
    }


def test_users_file_format():
    assert parse_users(["# c\n", "\n", "A@Example.Test:{PLAIN}x:1:2\n", "b@x.test:{X}y\n"]) == {
        "a@example.test": "{PLAIN}x",
        "b@x.test": "{X}y",
    }


def test_files_are_read_again_when_they_change(directory, files):
    users, aliases = files
    assert not directory.is_account("erin@example.test")
    users.write_text(USERS + "erin@example.test:{PLAIN}e\n")
    aliases.write_text("exact: erin@example.test\n")
    assert directory.is_account("erin@example.test")
    assert delivered(directory, "exact@example.test") == {
        "erin@example.test": "erin@example.test"
    }


def test_a_rewrite_within_the_same_tick_is_seen(directory, files):
    """Same size, same inode, and possibly the same mtime: still re-read."""
    _, aliases = files
    aliases.write_text("x: alice@example.test\n")
    assert set(directory.resolve("x", EXAMPLE).mailboxes) == {mailbox("alice@example.test")}
    stamp = aliases.stat().st_mtime_ns
    aliases.write_text("x: dave1@example.test\n")  # unknown; this file has no catch-all
    os.utime(aliases, ns=(stamp, stamp))
    with pytest.raises(UnknownRecipient):
        directory.resolve("x", EXAMPLE)


@pytest.mark.parametrize("which", [0, 1], ids=["users", "aliases"])
def test_an_unreadable_file_is_a_temporary_failure_said_once(directory, files, which, logged):
    assert directory.is_account("bob@example.test")
    path = files[which]
    path.rename(path.with_name("moved"))
    for _ in range(2):
        with pytest.raises(DirectoryUnavailable):
            directory.resolve("bob", EXAMPLE)
    path.with_name("moved").rename(path)
    assert set(directory.resolve("bob", EXAMPLE).mailboxes) == {mailbox("bob@example.test")}
    assert len([m for m in logged if f"cannot read {path}" in m]) == 1


def test_a_file_that_is_not_utf8_is_a_temporary_failure(directory, files):
    users, _ = files
    users.write_bytes(b"bob@example.test:{PLAIN}\xff\xfe\n")
    with pytest.raises(DirectoryUnavailable):
        directory.users()


def test_postmaster_domain():
    assert Directory(frozenset({"b.test", "a.test"})).postmaster_domain("mx.test") == "a.test"
    assert Directory(frozenset({"b.test", "mx.test"})).postmaster_domain("MX.test") == "mx.test"
    assert Directory(frozenset()).postmaster_domain("mx.test") == "mx.test"
