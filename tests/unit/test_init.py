"""``twisted-mta init``'s files: a config every command finds and that
loads, an empty users file and role aliases, a spool for the daemon's
account, and nothing replaced."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from twisted_mta.config import load_config
from twisted_mta.config.initial import InitError, initialise, planned
from twisted_mta.directory.resolve import Directory
from twisted_mta.mail.mailbox import Mailbox

ME = pwd.getpwuid(os.getuid()).pw_name


def plan_in(tmp_path: Path, **changes):
    values = dict(
        folder=tmp_path / "etc",
        user=ME,
        hostname="mx.example.org",
        spool=tmp_path / "spool",
    )
    values.update(changes)
    return planned(**values)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_files_load_as_a_config_for_the_domain(tmp_path):
    plan = plan_in(tmp_path)
    steps = initialise(plan)
    config = load_config(tmp_path / "etc" / "mta.toml", {})
    assert (config.hostname, config.domains.local) == ("mx.example.org", ("example.org",))
    assert config.spool == tmp_path / "spool"
    assert config.listen.smtp == ("tcp:25",)
    assert config.listen.submission == ("tcp:587",)
    assert config.listen.submissions == ("tcp:465",)
    assert config.plugins.enabled == ("spf", "dkim", "dmarc")
    assert (config.users.file, config.aliases.file) == (plan.users, plan.aliases)
    assert steps[0].startswith(f"wrote {plan.config}, {plan.users} and {plan.aliases}")
    assert any("twisted-mta dkim keygen example.org" in line for line in steps)


def test_modes_and_owners(tmp_path):
    plan = plan_in(tmp_path)
    initialise(plan)
    me = (os.getuid(), pwd.getpwuid(os.getuid()).pw_gid)
    assert mode(plan.users) == 0o600 and mode(plan.aliases) == 0o640
    assert mode(plan.config) == 0o644
    assert mode(plan.spool) == 0o711 and mode(plan.spool / "dkim") == 0o700
    for path in (plan.users, plan.aliases, plan.spool, plan.spool / "dkim"):
        assert (path.stat().st_uid, path.stat().st_gid) == me
    assert plan.users.read_text().startswith("# twisted-mta users")


def test_role_addresses_go_to_postmaster_and_postmaster_where_asked(tmp_path):
    plan = plan_in(tmp_path, postmaster="admin@example.org")
    initialise(plan)
    plan.users.write_text("admin@example.org:{PLAIN}x\n")
    directory = Directory(frozenset({"example.org"}), "+", plan.users, plan.aliases)
    admin = Mailbox("example.org", "admin")
    for role in ("postmaster", "abuse", "hostmaster"):
        assert set(directory.resolve(role, "example.org").mailboxes) == {admin}


def test_the_first_step_is_the_account_postmaster_goes_to(tmp_path):
    steps = initialise(plan_in(tmp_path, postmaster="admin@example.org"))
    assert steps[2].startswith("  1. twisted-mta passwd admin@example.org ")
    steps = initialise(plan_in(tmp_path / "other"))
    assert steps[2].startswith("  1. twisted-mta passwd you@example.org ")
    assert "then point postmaster at it" in steps[2]


def test_without_a_postmaster_role_mail_stays_in_the_postmaster_maildir(tmp_path):
    plan = plan_in(tmp_path)
    initialise(plan)
    directory = Directory(frozenset({"example.org"}), "+", plan.users, plan.aliases)
    postmaster = Mailbox("example.org", "postmaster")
    assert set(directory.resolve("abuse", "example.org").mailboxes) == {postmaster}


def test_nothing_is_replaced(tmp_path):
    plan = plan_in(tmp_path)
    plan.folder.mkdir()
    plan.users.write_text("alice@example.org:{PLAIN}x\n")
    with pytest.raises(InitError, match="users exist"):
        initialise(plan)
    assert plan.users.read_text() == "alice@example.org:{PLAIN}x\n"
    assert not plan.config.exists() and not plan.spool.exists()


def test_an_unknown_account_is_named_with_how_to_make_it(tmp_path):
    with pytest.raises(InitError, match="no account 'no-such-mta'; make one with: useradd"):
        initialise(plan_in(tmp_path, user="no-such-mta"))
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize(
    "hostname, domain",
    [("mx.example.org", "example.org"), ("example.org", "example.org"), ("a.b.c.d", "b.c.d")],
)
def test_the_domain_defaults_to_the_hostname_without_its_host(hostname, domain):
    assert planned(hostname=hostname.upper() + ".").domain == domain
